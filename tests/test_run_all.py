"""``run_all.sh`` as a user runs it, on the tiny recipe: progress in the terminal, clean executed
notebooks, reuse on a rerun, a stop before any notebook on a changed recipe, and ``FRESH=1`` ending
with a reproduction report."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

NOTEBOOK = "01_synthetic_comparisons"


def run_all(tmp_path, overrides: dict, fresh: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIG": "data/configs/tiny.yaml", "NOTEBOOKS": NOTEBOOK,
           "OVERRIDES": json.dumps(overrides), "FRESH": "1" if fresh else "0"}
    env.pop("ALMOST_PROGRESS_LOG", None)
    return subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all") / "ref"
    proc = run_all(out, {"output_dir": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_progress_reaches_the_terminal_and_not_the_notebook(first_run):
    out, proc = first_run
    assert "queries:" in proc.stdout and "units sampled" in proc.stdout          # stage lines, live
    assert "prompt/s" in proc.stdout or "prompt]" in proc.stdout                   # the sampler's bar
    nb = json.loads((out / "notebooks" / f"{NOTEBOOK}.ipynb").read_text())
    streams = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])
                      if o.get("output_type") == "stream")
    assert "\r" not in streams and "it/s" not in streams and "prompt/s" not in streams
    assert "units sampled" in streams           # the one-line messages stay, for the reader
    assert (out / "notebooks" / "wall_times.tsv").is_file()


def test_rerun_reuses_and_changed_recipe_stops_before_any_notebook(first_run):
    out, _ = first_run
    proc = run_all(out, {"output_dir": str(out)})
    assert proc.returncode == 0
    assert "queries: reusing" in proc.stdout and "comparisons: reusing" in proc.stdout
    before = (out / "queries" / "queries.jsonl").read_bytes()
    proc = run_all(out, {"output_dir": str(out), "queries.temperature": 0.5})
    assert proc.returncode != 0
    assert "queries.temperature: 1.2 -> 0.5" in proc.stderr and "FRESH=1" in proc.stderr
    assert "== notebook" not in proc.stdout
    assert (out / "queries" / "queries.jsonl").read_bytes() == before


def test_fresh_recomputes_into_a_new_folder_and_reports(first_run):
    out, _ = first_run
    proc = run_all(out, {"output_dir": str(out)}, fresh=True)
    fresh = next(line.split("outputs in ", 1)[1] for line in proc.stdout.splitlines() if "== outputs in" in line)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "tiny-fresh-" in fresh and os.path.realpath(fresh) != os.path.realpath(out)
        report = json.loads((ROOT / fresh / "reproduction.json").read_text())
        assert report["rows"] and all(r["difference"] == 0 for r in report["rows"])   # tiny is deterministic
        assert "Reproduction report" in proc.stdout
    finally:
        shutil.rmtree(ROOT / fresh, ignore_errors=True)
