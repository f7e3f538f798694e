"""What every numbered notebook does first, before any model loads."""
from __future__ import annotations

import os

from .config import REPO_ROOT, RunConfig, load_config


def open_run(config_path: str, overrides: dict | str | None = None) -> RunConfig:
    """The recipe with its overrides, checked: models known, and every stage's folder either new,
    started or finished *with this recipe* (outputs of another recipe stop here, naming the fields
    that changed). Paths in the recipes are relative to the repository root, which becomes the
    working directory."""
    from .fingerprint import check_run
    from .models import check_models
    os.chdir(REPO_ROOT)
    cfg = load_config(config_path, overrides)
    check_models(cfg)
    print(f"run '{cfg.run_name}' -> {cfg.run_dir}  (seed {cfg.seed}, device {cfg.device})")
    print("stages:", check_run(cfg))
    return cfg
