"""Command line for the stages, for scripts and ``accelerate launch``; notebooks call the same
functions directly.

    python -m almost_utils.cli setup --config data/configs/cpu.yaml
    python -m almost_utils.cli queries --config data/configs/cpu.yaml --set queries.num_queries=40
    python -m almost_utils.cli comparisons --config data/configs/cpu.yaml
    python -m almost_utils.cli reward_model --config data/configs/cpu.yaml
    python -m almost_utils.cli splits --config data/configs/cpu.yaml        # fresh queries for Steps 3+
    python -m almost_utils.cli rmsp --config data/configs/cpu.yaml          # Step 3, RM-guided self-play
    python -m almost_utils.cli sft --config data/configs/cpu.yaml           # Step 4, ALMoST-SFT
    python -m almost_utils.cli sft_norm --config data/configs/cpu.yaml      # Step 4, SFT-noRM (no RM)
    python -m almost_utils.cli sft_answers --config data/configs/cpu.yaml   # held-out answers, RM-scored
    python -m almost_utils.cli ppo --config data/configs/cpu.yaml           # Step 5 (accelerate launch: several processes)
    python -m almost_utils.cli ppo_answers --config data/configs/cpu.yaml   # ALMoST-PPO's held-out answers
    python -m almost_utils.cli check --config data/configs/cpu.yaml     # would a rerun reuse, resume or stop?
    python -m almost_utils.cli queries --config data/configs/cpu.yaml --fresh   # recompute in a new folder
    python -m almost_utils.cli reproduce --reference results/cpu --run results/cpu-fresh-1a2b3c4d

Every stage validates the recipe and its input files, and checks that its folder holds nothing
computed with another recipe (see :mod:`almost_utils.fingerprint`), before it loads a model.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from .config import ConfigError, RunConfig, load_config
from .fingerprint import check_run, fresh_output_dir
from .models import check_models, check_source, convert_packaged


def parse_sets(items: list[str]) -> dict:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}`` (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def setup(cfg: RunConfig) -> None:
    """Everything a run needs offline: packaged models converted once, benchmark data cached.

    A recipe whose ``reward_model.hhh_dir`` names its own HHH folder (tiny: a fixture) never
    fetches the BIG-bench archive; the folder only has to exist.
    """
    for name, spec in cfg.models.items():
        source = spec.source.removeprefix("tiny:")
        if check_source(source, f"models.{name}.source") == "packaged":
            convert_packaged(source.removeprefix("packaged:"))
    rm = cfg.reward_model
    if rm is not None and rm.hhh_dir:
        if not cfg.path(rm.hhh_dir).is_dir():
            raise ConfigError(f"reward_model.hhh_dir: folder not found: {cfg.path(rm.hhh_dir)}")
        print(f"HHH pairs from {cfg.path(rm.hhh_dir)} (reward_model.hhh_dir): BIG-bench not fetched", flush=True)
    elif rm is not None:
        from .bigbench import ensure_tasks
        ensure_tasks()


def run_stage(stage: str, cfg: RunConfig) -> None:
    check_models(cfg)
    if stage == "setup":
        setup(cfg)
    elif stage == "check":
        for name, status in check_run(cfg).items():
            print(f"{name}: {STATUS_WORDS[status]} ({cfg.run_dir / name})")
    elif stage == "where":
        print(cfg.run_dir)
    elif stage == "notebooks":
        print(" ".join(nb for nb, sections in NOTEBOOKS.items() if all(getattr(cfg, s) is not None for s in sections)))
    elif stage == "queries":
        from .queries import generate_queries
        print(f"{len(generate_queries(cfg))} queries in {cfg.run_dir / 'queries'}")
    elif stage == "comparisons":
        from .comparisons import build_comparisons
        print(f"{len(build_comparisons(cfg))} pairs in {cfg.run_dir / 'comparisons'}")
    elif stage == "reward_model":
        if cfg.reward_model is None:
            raise ConfigError("reward_model: section missing from the recipe")
        from . import distributed
        from .models import resolve_device
        from .reward_stage import run_reward_model_stage
        # under `accelerate launch`: the recipe's device picks the process group's backend (gloo / nccl)
        distributed.init(cpu=resolve_device(cfg.device) == "cpu")
        if run_reward_model_stage(cfg) is not None:    # None: a helper process of `accelerate launch`
            print(f"reward model and metrics in {cfg.run_dir / 'reward_model'}")
    elif stage == "splits":
        from .queries import generate_splits
        print(f"{len(generate_splits(cfg))} fresh queries in {cfg.run_dir / 'splits'}")
    elif stage == "rmsp":
        from .rmsp import run_rmsp
        print(f"{len(run_rmsp(cfg))} self-play dialogues in {cfg.run_dir / 'rmsp'}")
    elif stage in ("sft", "sft_norm"):
        from .sft import run_sft_stage
        summary = run_sft_stage(cfg, stage)
        print(f"{stage}: {summary['optimizer_steps']} steps, loss {summary['first_loss']} -> "
              f"{summary['final_loss']}; adapter in {cfg.run_dir / stage / 'adapter'}")
    elif stage == "ppo":
        from . import distributed
        from .models import resolve_device
        from .ppo import run_ppo_stage
        accelerator = None
        if distributed.world_size() > 1:                # under accelerate launch: the loop runs in every process
            from accelerate import Accelerator
            accelerator = Accelerator(cpu=resolve_device(cfg.device) == "cpu")
        log = run_ppo_stage(cfg, accelerator=accelerator)
        if accelerator is None or accelerator.is_main_process:
            print(f"ppo: {len(log)} steps, RM score {log[0]['rm_score']:+.3f} -> {log[-1]['rm_score']:+.3f}, "
                  f"KL {log[-1]['kl']:.3f}; adapter in {cfg.run_dir / 'ppo' / 'adapter'}")
    elif stage in ("sft_answers", "ppo_answers"):
        from .answers import run_answers_stage
        print(f"{len(run_answers_stage(cfg, stage=stage))} answers in {cfg.run_dir / stage}")
    elif stage == "evaluation":
        from .evaluation import run_evaluation_stage
        run_evaluation_stage(cfg)
        print(f"evaluation tables in {cfg.run_dir / 'evaluation' / 'summary.json'}")


# The numbered notebooks and the recipe sections each needs: `run_all.sh` runs those a recipe has.
NOTEBOOKS = {"01_synthetic_comparisons": (), "02_reward_model": ("reward_model",),
             "03_rmsp": ("reward_model", "splits", "rmsp"), "04_sft": ("sft", "answers"), "05_ppo": ("ppo", "answers"),
             "06_evaluation": ("evaluation",), "07_analysis": ("reward_model",)}
STATUS_WORDS = {"new": "nothing computed yet", "resume": "started with this recipe: resumes",
                "done": "finished with this recipe: reused"}
STAGES = ("setup", "check", "where", "notebooks", "queries", "comparisons", "reward_model", "splits", "rmsp", "sft", "sft_norm",
          "sft_answers", "ppo", "ppo_answers", "evaluation")


def load_run_config(path: str, overrides: str | None, sets: list[str], fresh: bool) -> RunConfig:
    """The recipe with ``--overrides`` (YAML/JSON mapping) and ``--set`` applied; ``--fresh`` moves the
    run into its own new folder (see :func:`almost_utils.fingerprint.fresh_output_dir`)."""
    extra = dict(yaml.safe_load(overrides) or {}) if overrides else {}
    extra.update(parse_sets(sets))
    cfg = load_config(path, extra)
    if fresh:
        cfg = load_config(path, {**extra, "output_dir": fresh_output_dir(cfg)})
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m almost_utils.cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES + ("reproduce",),
                    help="a stage; 'check' vets every stage's folder against the recipe, 'where' prints the "
                         "run folder, 'notebooks' the notebooks the recipe runs, 'reproduce' compares two run folders")
    ap.add_argument("--config", help="recipe YAML, e.g. data/configs/cpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set queries.num_queries=40")
    ap.add_argument("--overrides", help='overrides as one YAML/JSON mapping, e.g. \'{"queries.num_queries": 40}\'')
    ap.add_argument("--fresh", action="store_true",
                    help="recompute the recipe from nothing in a new folder results/<run_name>-fresh-<fingerprint>")
    ap.add_argument("--reference", help="reproduce: the reference run folder, e.g. results/cpu")
    ap.add_argument("--run", help="reproduce: the recomputed run folder")
    args = ap.parse_args(argv)
    try:
        if args.stage == "reproduce":
            if not (args.reference and args.run):
                ap.error("reproduce needs --reference and --run")
            from .reproduction import write_report
            print(write_report(args.reference, args.run))
            return 0
        if not args.config:
            ap.error("--config is required")
        run_stage(args.stage, load_run_config(args.config, args.overrides, args.set, args.fresh))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
