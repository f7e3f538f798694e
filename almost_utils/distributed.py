"""Which process am I under ``accelerate launch``, and a barrier - the same in one plain process.

``accelerate launch`` starts one process per device and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the process group itself only exists once
something starts it (the Trainer's ``TrainingArguments``, or :func:`barrier` here). So every
question is answered from the process group when it exists and from the environment before.
In a notebook or a plain ``python -m`` run there is no launcher: rank 0 of 1, and :func:`barrier`
does nothing, so single-process behaviour is untouched.

    if distributed.is_main():
        write_json(path, obj)          # one writer
    distributed.barrier()              # the others read ``path`` only after this
"""
from __future__ import annotations

import contextlib
import os


def _group_started() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if _group_started():
        import torch.distributed as dist
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if _group_started():
        import torch.distributed as dist
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the one process that writes files (rank 0); always True without a launcher."""
    return rank() == 0


def _wants_cpu() -> bool:
    # `accelerate launch --cpu` says so in the environment; without CUDA there is no other choice
    import torch
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def init(cpu: bool | None = None) -> None:
    """Start the launcher's process group if nothing has yet (no-op for a single process).

    accelerate's ``PartialState`` picks the backend as the Trainer would (gloo on CPU, nccl on
    CUDA, and binds each process to its GPU); the Trainer later finds the group started and reuses
    it. Pass ``cpu`` from the recipe's device when known: a CPU recipe on a GPU machine must get
    gloo, as its Trainer (``use_cpu``) will.
    """
    if world_size() == 1 or _group_started():
        return
    from accelerate import PartialState
    PartialState(cpu=_wants_cpu() if cpu is None else cpu)


def backend() -> str:
    """The process group's backend (``gloo``, ``nccl``...), or ``none`` for a single process."""
    if world_size() == 1:
        return "none"
    init()
    import torch.distributed as dist
    return str(dist.get_backend())


def barrier() -> None:
    """Wait until every process gets here; a no-op for a single process."""
    if world_size() == 1:
        return
    init()
    import torch.distributed as dist
    dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block in the main process first, then in the others (e.g. the main one claims a
    folder, the others then find it claimed and write nothing)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
