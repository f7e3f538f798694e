"""PPO rollouts: our engine against transformers' ``generate``, on the same policy and prompts,
and the time split of one whole PPO step.

One process. The policy is the run's ALMoST-SFT with a PPO LoRA adapter (as the stage builds it,
``almost_utils.ppo.build_policy``). Rollouts sample ``--prompts`` queries of the ``ppo`` split,
``max_new_tokens`` each at the recipe's temperature (EOS ignored, so every method produces the
same number of tokens):

  engine    our TransformersEngine on the plain copy synced to W0 + BA (what the stage does)
  generate  ``model.generate`` on the peft model (LoRA applied on the fly), batched, left padded
  generate1 ``model.generate`` on the peft model, one prompt at a time

Each method runs ``--rounds`` times in turn; the median tokens/s is reported with the ratios.
Then one PPO step (rollout, RM scoring, update) runs with the stage's trainer and its time split
is recorded.

    python benchmarks/bench_ppo.py                       # the cpu run -> results/benchmarks/ppo.json
    python benchmarks/bench_ppo.py --tiny --out /tmp/b   # the tiny recipe (needs a finished tiny run)
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from almost_utils.artifacts import package_versions, write_json  # noqa: E402
from almost_utils.config import REPO_ROOT, load_config  # noqa: E402
from almost_utils.ppo import PPOTrainer, RolloutWeights, build_policy, rm_reward, step_queries  # noqa: E402
from almost_utils.queries import load_split  # noqa: E402
from almost_utils.sampling import SamplingParams, TransformersEngine  # noqa: E402
from almost_utils.sft import prompt_piece  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hf_generate(model, tok, prompts: list[str], new: int, temperature: float, batch: int) -> None:
    tok.padding_side = "left"
    for s in range(0, len(prompts), batch):
        enc = tok(prompts[s:s + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=tok.pad_token_id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="data/configs/cpu.yaml")
    ap.add_argument("--tiny", action="store_true", help="the tiny recipe (results/tiny must hold a finished SFT)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmarks"))
    args = ap.parse_args(argv)
    cfg = load_config("data/configs/tiny.yaml" if args.tiny else args.config)
    p = cfg.ppo
    policy, plain, tok = build_policy(cfg, cfg.run_dir / p.start_from, "cpu")
    weights = RolloutWeights(plain, policy.peft)
    with torch.no_grad():                                    # an adapter that is not the identity
        for name, w in policy.peft.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 1e-3)
    weights.sync()
    queries = load_split(cfg, p.split)[:args.prompts]
    prompts = [prompt_piece(q["query"]) for q in queries]
    new = p.max_new_tokens
    engine = TransformersEngine(plain, tok, batch_size=cfg.sampling.batch_size, progress=False)
    params = SamplingParams(max_new_tokens=new, temperature=p.temperature, top_p=1.0, seed=1, ignore_eos=True)
    methods = {
        "engine": lambda: engine.generate_tokens(prompts, params),
        "generate": lambda: hf_generate(policy.peft, tok, prompts, new, p.temperature, cfg.sampling.batch_size),
        "generate1": lambda: hf_generate(policy.peft, tok, prompts, new, p.temperature, 1),
    }
    secs: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m, fn in methods.items():
            secs[m].append(timed(fn))
            print(f"round {r + 1}: {m} {secs[m][-1]:.1f} s ({len(prompts) * new / secs[m][-1]:.1f} tok/s)", flush=True)
    tokens = len(prompts) * new
    results = {m: {"seconds": statistics.median(v), "tok_s": round(tokens / statistics.median(v), 2),
                   "all_seconds": [round(x, 2) for x in v]} for m, v in secs.items()}
    ratios = {f"engine/{m}": round(results["engine"]["tok_s"] / results[m]["tok_s"], 2) for m in ("generate", "generate1")}

    from almost_utils.reward import load_reward_model
    reward = rm_reward(load_reward_model(cfg.run_dir / "reward_model", "cpu", cfg.reward_model.score_batch_size))
    trainer = PPOTrainer(p, policy, tok, engine, weights, reward, seed=cfg.seed)
    row = trainer.step(step_queries(load_split(cfg, p.split), 0, p.rollout_batch, cfg.seed))
    split = {k: row[k] for k in ("rollout_s", "scoring_s", "update_s")}
    out = {"command": "python benchmarks/bench_ppo.py" + (" --tiny" if args.tiny else ""), "config": cfg.run_name,
           "prompts": len(prompts), "new_tokens": new, "temperature": p.temperature, "batch_size": cfg.sampling.batch_size,
           "results": results, "ratios": ratios, "ppo_step_time_split_s": split,
           "ppo_step": {"rollout_batch": p.rollout_batch, "ppo_epochs": p.ppo_epochs, "minibatch": p.minibatch},
           "machine": {"cpu_count": torch.get_num_threads(), "python": platform.python_version(), **package_versions()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(args.out) / ("ppo_tiny.json" if args.tiny else "ppo.json")
    write_json(path, out)
    print(f"engine {results['engine']['tok_s']} tok/s; generate (batched) {results['generate']['tok_s']}; "
          f"generate one at a time {results['generate1']['tok_s']}; ratios {ratios}; PPO step {split} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
