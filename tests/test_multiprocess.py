"""Step 2 under `accelerate launch` with two processes (DDP over gloo, on CPU), end to end.

Step-1 pairs come from the real Step 0/1 functions on the tiny recipe with stand-in samplers
(seconds instead of minutes of tiny-model sampling); the RM stage then runs through the CLI in
two processes. What must hold: the run succeeds, the batches were sharded over both processes,
one process wrote exactly one coherent set of artifacts, the manifest says so, and the scores
it stored are what the saved RM gives when reloaded here, in this single process.

Why ``--multi_gpu`` on a CPU machine: in accelerate 1.x ``accelerate launch --cpu
--num_processes 2`` starts ONE process (its multi-CPU path needs ``mpirun``); the ``--multi_gpu``
launcher is torchrun, and with ``ACCELERATE_USE_CPU`` and the recipe's ``device: cpu`` every
process trains on CPU over gloo.
"""
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from almost_utils.artifacts import read_json, read_jsonl
from conftest import ROOT, TINY, EchoEngine, mine_queries

FIXTURE = ROOT / "data" / "fixtures" / "bigbench"
PROCESSES = 2
WORDS = "yes no maybe river sea tax garden engine".split()


def test_helpers_answer_from_the_launcher_environment(monkeypatch):
    from almost_utils import distributed
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.backend() == "none"
    distributed.barrier()                       # one process: returns at once, starts no process group
    with distributed.main_first():
        pass
    # a launched helper process before any process group exists: the environment answers
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, 1, False)


def _answer(prefix, prompt, seed):
    # responses whose length grows with the shots, with some spread: the Heuristic Filter drops a
    # few pairs, so both variants (rm, rm_no_hf) are trained
    query = prompt.split("Human:")[-1].split("\n")[0].strip()
    shots = prefix.count("-----")
    rng = random.Random(f"{seed}|{query}|{shots}")
    return f"Reply {shots} to {query!r}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 4 + 6 * shots)))


def _launch(out: Path) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = shutil.which("accelerate", path=env["PATH"])
    assert accelerate, f"no accelerate executable in {venv_bin} or on PATH"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",   # 0: a free port
           "-m", "almost_utils.cli", "reward_model", "--config", str(TINY),
           "--set", f"output_dir={out}", "--set", f"reward_model.hhh_dir={FIXTURE}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from almost_utils.comparisons import build_comparisons
    from almost_utils.config import load_config
    out = tmp_path_factory.mktemp("ddp") / "run"
    cfg = load_config(TINY, {"output_dir": str(out), "reward_model.hhh_dir": str(FIXTURE)})
    mine_queries(cfg)
    build_comparisons(cfg, {k: EchoEngine(_answer) for k in cfg.models}, progress=False)
    proc = _launch(out)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return cfg, out / "reward_model"


def test_two_processes_trained_and_one_wrote(launched):
    cfg, stage = launched
    man = read_json(stage / "manifest.json")
    assert man["notes"]["world_size"] == PROCESSES
    assert man["notes"]["process_backend"] == "gloo"
    metrics = read_json(stage / "metrics.json")
    rm = cfg.reward_model
    for v in ("rm", "rm_no_hf"):
        train = read_json(stage / v / "reward_model.json")["train"]
        # the trainer sharded the pairs: each optimizer step took a batch from every process
        assert train["optimizer_steps"] == math.ceil(train["train_pairs"] / (rm.batch_size * rm.grad_accum * PROCESSES))
        assert metrics["training"][v]["train_id"] == train["train_id"]      # one training run, one record

    # exactly one coherent artifact set: one adapter per variant, one metrics.json, no leftovers
    assert sorted(p.parent.name for p in stage.rglob("adapter_model.safetensors")) == ["rm", "rm_no_hf"]
    assert [p.name for p in stage.rglob("metrics.json")] == ["metrics.json"]
    assert [p.name for p in stage.rglob("manifest.json")] == ["manifest.json"]
    leftovers = [p for p in stage.rglob("*") if ".tmp" in p.name or p.name.startswith(".") or p.name == "trainer"]
    assert leftovers == []
    assert {p.stem for p in (stage / "scores").iterdir()} == {
        f"{b}__{s}" for b in ("heldout", "hhh") for s in ("rm", "rm_no_hf", "untrained")}


def test_stored_scores_equal_the_reloaded_models(launched):
    from almost_utils.bigbench import load_hhh
    from almost_utils.reward import load_reward_model
    _, stage = launched
    benches = {"heldout": read_jsonl(stage / "heldout_pairs.jsonl"), "hhh": load_hhh(FIXTURE)}
    stored = {}
    for v in ("rm", "rm_no_hf"):
        scorer = load_reward_model(stage / v, "cpu")            # afresh, in this single process
        for b, rows in benches.items():
            got = read_jsonl(stage / "scores" / f"{b}__{v}.jsonl")
            assert [g["id"] for g in got] == [r["id"] for r in rows]
            chosen, rejected = scorer.score_pairs(rows, progress=False)
            np.testing.assert_allclose([g["chosen_score"] for g in got], chosen, rtol=0, atol=1e-5)
            np.testing.assert_allclose([g["rejected_score"] for g in got], rejected, rtol=0, atol=1e-5)
            stored[(b, v)] = [g["chosen_score"] for g in got]
    untrained = [g["chosen_score"] for g in read_jsonl(stage / "scores" / "hhh__untrained.jsonl")]
    assert not np.allclose(stored[("hhh", "rm")], untrained, atol=1e-4)     # training changed the model
