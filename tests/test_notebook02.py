"""Notebook 02 runs end to end on the tiny recipe (papermill), and the stage resumes without retraining.

Step-1 output: notebook 01's pairs on the tiny recipe (the session fixture ``tiny_run``). HHH is
read from the fixture in data/fixtures/bigbench (no network).
"""
import json
import shutil
from pathlib import Path

import pytest

from almost_utils.artifacts import read_json
from almost_utils.config import load_config
from conftest import ROOT, TINY

NOTEBOOK = ROOT / "notebooks" / "02_reward_model.ipynb"
FIXTURE = ROOT / "data" / "fixtures" / "bigbench"


def _overrides(out: Path) -> dict:
    return {"output_dir": str(out), "reward_model.hhh_dir": str(FIXTURE), "reward_model.eval_steps": 3,
            "reward_model.logging_steps": 1}


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory, tiny_run):
    """Notebook 02 on the Step-1 pairs that notebook 01 produced on the tiny scale."""
    import papermill
    out = tmp_path_factory.mktemp("nb02") / "run"
    shutil.copytree(tiny_run / "comparisons", out / "comparisons")
    executed = out.parent / "02_executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(executed), cwd=str(ROOT / "notebooks"), kernel_name="python3",
                               parameters={"config_path": str(TINY), "overrides": _overrides(out)},
                               progress_bar=False)
    return out, executed


def test_notebook_writes_metrics_figures_and_manifest(notebook_run):
    out, executed = notebook_run
    stage = out / "reward_model"
    metrics = read_json(stage / "metrics.json")
    scorers = {(a["benchmark"], a["scorer"]) for a in metrics["accuracy"]}
    for bench in ("heldout", "hhh"):
        for s in ("rm", "rm_no_hf", "untrained", "longer", "random"):
            assert (bench, s) in scorers
    hhh_subsets = {a["subset"] for a in metrics["accuracy"] if a["benchmark"] == "hhh"}
    assert hhh_subsets == {"all", "harmless", "helpful", "honest", "other"}
    assert "hhh_rm_minus_rm_no_hf" in metrics["ablation"]
    assert set(metrics["paired"]["hhh"]) == {"rm_minus_longer", "rm_minus_untrained", "rm_no_hf_minus_longer",
                                             "rm_no_hf_minus_untrained"}
    for name in ("training_curves", "reward_distributions", "hhh_accuracy", "heldout_accuracy"):
        assert (stage / "figures" / f"{name}.png").stat().st_size > 1000
    man = read_json(stage / "manifest.json")
    assert man["stage"] == "reward_model" and man["counts"]["hhh_pairs"] == 7
    assert (stage / "rm" / "adapter_model.safetensors").is_file()
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                   for c in nb["cells"] for o in c.get("outputs", []))
    assert "Ablation" in text or "ablation" in text


def test_rerun_with_the_same_recipe_reuses_the_stage(notebook_run, capsys):
    from almost_utils.reward_stage import run_reward_model_stage
    out, _ = notebook_run
    stage = out / "reward_model"
    before = {p: p.read_bytes() for p in (stage / "manifest.json", stage / "metrics.json")}
    cfg = load_config(TINY, _overrides(out))
    metrics = run_reward_model_stage(cfg, progress=False)
    assert metrics == read_json(stage / "metrics.json")
    assert {p: p.read_bytes() for p in before} == before                  # nothing recomputed or rewritten
    assert "reward_model: reusing" in capsys.readouterr().out


def test_half_finished_stage_resumes_to_the_same_metrics(notebook_run, tmp_path):
    """Trained RMs and stored scores survive an interruption; the rerun trains nothing."""
    from almost_utils.reward_stage import run_reward_model_stage
    out, _ = notebook_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stage = copy / "reward_model"
    (stage / "manifest.json").unlink()                                   # killed before the end
    for p in (stage / "scores").glob("hhh__*.jsonl"):
        p.unlink()
    metrics = run_reward_model_stage(load_config(TINY, _overrides(copy)), progress=False)
    man = read_json(stage / "manifest.json")
    assert sorted(man["notes"]["reused_models"]) == ["rm", "rm_no_hf"]
    assert metrics["accuracy"] == read_json(out / "reward_model" / "metrics.json")["accuracy"]


def test_changed_training_recipe_stops_and_keeps_the_old_stage(notebook_run, tmp_path):
    from almost_utils.fingerprint import StaleOutputError
    from almost_utils.reward_stage import run_reward_model_stage
    out, _ = notebook_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    old = read_json(copy / "reward_model" / "rm" / "reward_model.json")["train"]["train_id"]
    cfg = load_config(TINY, {**_overrides(copy), "reward_model.learning_rate": 5e-4})
    with pytest.raises(StaleOutputError, match=r"reward_model.learning_rate: 0.001 -> 0.0005"):
        run_reward_model_stage(cfg, progress=False)
    assert read_json(copy / "reward_model" / "rm" / "reward_model.json")["train"]["train_id"] == old
