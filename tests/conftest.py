"""Shared fixtures: the tiny recipe pointed at a fresh output folder."""
from pathlib import Path

import pytest

from almost_utils.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "configs" / "tiny.yaml"


@pytest.fixture
def tiny_cfg(tmp_path):
    return load_config(TINY, {"output_dir": str(tmp_path / "run")})


class EchoEngine:
    """A stand-in sampler: deterministic text per prompt, counting its calls.

    ``fail_after`` raises KeyboardInterrupt on that call, as a user's Ctrl-C would.
    """

    def __init__(self, make_text, fail_after=None):
        self.make_text = make_text
        self.calls = 0
        self.fail_after = fail_after

    def generate(self, prompts, params, prefix="", desc=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [self.make_text(prefix, p, params.seed) for p in prompts]


@pytest.fixture
def echo_engine():
    return EchoEngine


def mined_query(prefix, prompt, seed):
    """A stand-in for Step 0's model: a varied, deterministic query line per (prompt, seed)."""
    import random
    rng = random.Random(f"{seed}|{prompt}")
    words = "river garden engine violin tax recipe galaxy bicycle poem router winter lawyer puppy".split()
    numbers = " ".join(str(rng.randrange(10**6)) for _ in range(5))   # distinct tokens: no near duplicates
    return f" How does a {' '.join(rng.sample(words, 3))} work with {numbers}?"


def claim_upstream(cfg, stages=("queries", "comparisons")):
    """Mark Steps 0-1 of ``cfg``'s folder as finished with this recipe, for a later stage's test that
    starts from hand-made files (write them after this call: a folder with outputs but no
    fingerprint is refused)."""
    from almost_utils.artifacts import Manifest
    from almost_utils.fingerprint import begin_stage
    for stage in stages:
        _, fp = begin_stage(cfg, stage)
        with Manifest(cfg, stage, fp):
            pass


def mine_queries(cfg, engine_cls=EchoEngine):
    """Run Step 0 on ``cfg`` with the stand-in model (fast; a real, fingerprinted stage)."""
    from almost_utils.queries import generate_queries
    return generate_queries(cfg, engine_cls(mined_query), progress=False)


def run_notebook(name: str, out_dir, config=TINY, **overrides):
    """Execute a numbered notebook with papermill on a recipe; returns the executed copy's path."""
    import papermill as pm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(executed), cwd=str(ROOT),
                        parameters={"config_path": str(config), "overrides": overrides},
                        progress_bar=False, kernel_name="python3")
    return executed


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Notebook 01 executed once on the tiny scale; later notebooks' tests build on its run."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_notebook("01_synthetic_comparisons", run_dir / "notebooks", output_dir=str(run_dir))
    return run_dir
