"""Command line for the stages, for scripts and ``accelerate launch``; notebooks call the same
functions directly.

    python -m almost_utils.cli setup --config data/configs/cpu.yaml
    python -m almost_utils.cli queries --config data/configs/cpu.yaml --set queries.num_queries=40
    python -m almost_utils.cli comparisons --config data/configs/cpu.yaml
    python -m almost_utils.cli reward_model --config data/configs/cpu.yaml

Every stage validates the recipe and its input files before it loads a model.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from .config import ConfigError, RunConfig, load_config
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
    """Everything a run needs offline: packaged models converted once, benchmark data cached."""
    for name, spec in cfg.models.items():
        source = spec.source.removeprefix("tiny:")
        if check_source(source, f"models.{name}.source") == "packaged":
            convert_packaged(source.removeprefix("packaged:"))
    if cfg.reward_model is not None:
        from .bigbench import ensure_tasks
        ensure_tasks()


def run_stage(stage: str, cfg: RunConfig) -> None:
    check_models(cfg)
    if stage == "setup":
        setup(cfg)
    elif stage == "queries":
        from .queries import generate_queries
        print(f"{len(generate_queries(cfg))} queries in {cfg.run_dir / 'queries'}")
    elif stage == "comparisons":
        from .comparisons import build_comparisons
        print(f"{len(build_comparisons(cfg))} pairs in {cfg.run_dir / 'comparisons'}")
    elif stage == "reward_model":
        if cfg.reward_model is None:
            raise ConfigError("reward_model: section missing from the recipe")
        from .reward_stage import run_reward_model_stage
        run_reward_model_stage(cfg)
        print(f"reward model and metrics in {cfg.run_dir / 'reward_model'}")


STAGES = ("setup", "queries", "comparisons", "reward_model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m almost_utils.cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--config", required=True, help="recipe YAML, e.g. data/configs/cpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set queries.num_queries=40")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_sets(args.set))
        run_stage(args.stage, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
