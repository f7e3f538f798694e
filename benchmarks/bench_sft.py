"""SFT training throughput with and without the masked output layer, side by side.

One process, the same recipe, data, seed and LoRA initialisation for every mode; each mode
trains a fresh copy of the model for a few optimizer steps:

  masked  ours (almost_utils/sft.py): the decoder runs on every token, the output layer only
          where the loss counts (answer tokens), in row chunks
  trl     trl's SFTTrainer as shipped: its fused head scores *every* position on CPU (its
          compact path needs Triton, i.e. CUDA), plus entropy and accuracy for its logs
  full    the model's own forward: full ``[batch, length, vocab]`` logits and HF's loss

Throughput is training tokens (every non-pad token of a batch) per second of wall time over
the steps after the first (``--warmup``), the median over ``--rounds`` rounds that visit the
modes in turn (a shared machine drifts; alternating spreads the drift over all modes). The
first step's loss is recorded per mode: the same batch, so the three must agree.

    python benchmarks/bench_sft.py                      # gemma-3-270m, the cpu recipe -> results/benchmarks/sft.json
    python benchmarks/bench_sft.py --tiny               # the tiny recipe: proves the script runs (seconds)
    python benchmarks/bench_sft.py --modes masked trl --steps 4 --rounds 1

Data: ``--dialogues FILE`` (Step-3 JSONL) or, by default, the project's own demonstration
dialogues (data/demonstrations), repeated to fill the batches.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from almost_utils.artifacts import package_versions, write_json  # noqa: E402
from almost_utils.config import REPO_ROOT, load_config  # noqa: E402
from almost_utils.dialogue import load_dialogues  # noqa: E402
from almost_utils.sft import LOSS_MODES, build_trainer, read_dialogues, sft_dataset  # noqa: E402

DEMOS = REPO_ROOT / "data" / "demonstrations"


def dialogue_rows(path: str | None, n: int) -> list[dict]:
    """``n`` dialogue rows from a Step-3 file, or from our demonstration dialogues, cycled."""
    if path:
        base = read_dialogues(path)
    else:
        demos = load_dialogues(DEMOS / "faithful.txt") + load_dialogues(DEMOS / "hhh.txt")
        base = [{"id": i, "turns": d} for i, d in enumerate(demos)]
    return [{"id": i, "turns": base[i % len(base)]["turns"]} for i in range(n)]


class StepClock:
    """Wall time and tokens seen at the end of every optimizer step (a TrainerCallback)."""

    def __init__(self):
        from transformers import TrainerCallback
        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                trainer = clock.trainer
                clock.marks.append((time.perf_counter(), trainer.tokens_seen, trainer.assistant_tokens_seen))

        self.callback, self.marks, self.trainer = _Callback(), [], None

    def rates(self, warmup: int) -> dict:
        (t0, n0, a0), (t1, n1, a1) = self.marks[warmup - 1] if warmup else (self.start, 0, 0), self.marks[-1]
        steps = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
        return {"tokens_per_s": (n1 - n0) / (t1 - t0), "assistant_tokens_per_s": (a1 - a0) / (t1 - t0),
                "timed_steps": len(self.marks) - warmup, "step_s": [round(s, 3) for s in steps]}


def run_mode(cfg, mode: str, data, steps: int, warmup: int, out_dir: Path) -> dict:
    """Train a fresh model for ``warmup + steps`` optimizer steps in ``mode``; its rates and first loss."""
    import gc

    from almost_utils.models import load_model
    model, tok = load_model(cfg.models[cfg.sft.model], cfg.device, cfg.seed)
    clock = StepClock()
    trainer = build_trainer(cfg, model, tok, data, out_dir / mode, loss_mode=mode, max_steps=warmup + steps,
                            save_steps=0, progress=False, callbacks=[clock.callback], desc=f"bench {mode}")
    clock.trainer = trainer
    clock.start = time.perf_counter()
    cpu0 = time.process_time()
    trainer.train()
    result = clock.rates(warmup)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result.update(first_loss=losses[0], process_cpu_s=round(time.process_time() - cpu0, 1))
    del trainer, model
    gc.collect()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny recipe (random 2-layer model): a quick proof run")
    ap.add_argument("--config", default=None, help="recipe (default: data/configs/cpu.yaml, or tiny.yaml with --tiny)")
    ap.add_argument("--dialogues", default=None, help="a Step-3 dialogues JSONL (default: our demonstrations)")
    ap.add_argument("--modes", nargs="+", default=list(LOSS_MODES), choices=LOSS_MODES)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per mode and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="dialogues per step (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="JSON output (default: results/benchmarks/sft.json; "
                                                "with --tiny a file in the temp folder)")
    args = ap.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    config = args.config or str(REPO_ROOT / "data" / "configs" / ("tiny.yaml" if args.tiny else "cpu.yaml"))
    overrides = {"sft.batch_size": args.batch_size} if args.batch_size else {}
    cfg = load_config(config, {**overrides, "sft.grad_accum": 1}, check_files=False)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "bench_sft_tiny.json" if args.tiny
                            else REPO_ROOT / "results" / "benchmarks" / "sft.json"))

    from almost_utils.models import load_tokenizer
    rows = dialogue_rows(args.dialogues, cfg.sft.batch_size * (args.steps + args.warmup))
    data, counts = sft_dataset(rows, load_tokenizer(cfg.models[cfg.sft.model]), cfg.sft.max_length)
    print(f"{len(data)} dialogues, {counts['tokens']} tokens ({counts['assistant_tokens']} answer tokens), "
          f"batch {cfg.sft.batch_size}, modes {args.modes}, {args.rounds} round(s)", flush=True)
    runs = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for m in (args.modes if r % 2 == 0 else args.modes[::-1]):
                res = run_mode(cfg, m, data, args.steps, args.warmup, Path(tmp))
                runs[m].append(res)
                print(f"round {r + 1} {m:>6}: {res['tokens_per_s']:8.1f} tokens/s, first loss {res['first_loss']:.5f}",
                      flush=True)
    summary = {m: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                   "assistant_tokens_per_s": statistics.median(x["assistant_tokens_per_s"] for x in rs),
                   "first_loss": rs[0]["first_loss"], "runs": rs} for m, rs in runs.items()}
    ratios = {f"masked_over_{m}": round(summary["masked"]["tokens_per_s"] / summary[m]["tokens_per_s"], 3)
              for m in summary if m != "masked" and "masked" in summary}
    losses = [s["first_loss"] for s in summary.values()]
    result = {"recipe": config, "model": cfg.models[cfg.sft.model].source, "device": cfg.device,
              "batch_size": cfg.sft.batch_size, "max_length": cfg.sft.max_length, "lora_layers": cfg.sft.lora_layers,
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "data": {"source": args.dialogues or "data/demonstrations (faithful + hhh, cycled)", **counts},
              "modes": summary, "speedup": ratios, "first_loss_spread": max(losses) - min(losses),
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
              "versions": package_versions()}
    write_json(out, result)
    print(f"speedup {ratios}; first-step losses agree within {result['first_loss_spread']:.2e}; -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
