"""Recipe fingerprints: a rerun reuses or resumes only what the same recipe computed, and stops,
before any model loads, naming what changed, when a folder holds another recipe's outputs."""
import shutil

import pytest

from almost_utils import cli
from almost_utils.artifacts import read_json, read_jsonl, write_jsonl
from almost_utils.comparisons import build_comparisons
from almost_utils.config import ConfigError, load_config
from almost_utils.fingerprint import (FINGERPRINT_FILE, StaleOutputError, check_run, fresh_output_dir,
                                      stage_fingerprint, stage_inputs)
from almost_utils.queries import generate_queries
from almost_utils.reproduction import compare, write_report
from conftest import ROOT, TINY, EchoEngine, mine_queries, mined_query


def _reply(prefix, prompt, seed):
    q = prompt.split("Human:")[-1].split("\n")[0].strip()
    n = prefix.count("-----")
    return f"A reply of {n} parts to '{q}', seed {seed % 5}." + " And more." * n


def _engines(cfg):
    return {k: EchoEngine(_reply) for k in cfg.models}


def _cfg(out, **extra):
    return load_config(TINY, {"output_dir": str(out), "queries.num_queries": 6, **extra})


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a real model fails the test: checks must come first."""
    import almost_utils.engines as engines

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the recipe check")
    monkeypatch.setattr(engines, "load_engine", refuse)


def test_changed_field_after_finished_stage_stops_and_names_it(tmp_path, no_model_loads):
    cfg = _cfg(tmp_path / "run")
    mine_queries(cfg)
    before = (cfg.run_dir / "queries" / "queries.jsonl").read_bytes()
    changed = _cfg(tmp_path / "run", **{"queries.temperature": 0.7})
    with pytest.raises(StaleOutputError) as err:
        generate_queries(changed, progress=False)          # no engine given: it would have to load one
    msg = str(err.value)
    assert "queries.temperature: 1.2 -> 0.7" in msg
    assert "run_name" in msg and "FRESH=1" in msg and "--fresh" in msg
    with pytest.raises(StaleOutputError, match="queries.temperature"):
        check_run(changed)
    assert (cfg.run_dir / "queries" / "queries.jsonl").read_bytes() == before   # nothing overwritten


def test_downstream_change_stops_before_a_model_loads_and_upstream_is_reused(tmp_path, capsys, no_model_loads):
    cfg = _cfg(tmp_path / "run")
    mine_queries(cfg)
    pairs = build_comparisons(cfg, _engines(cfg), progress=False)
    status = check_run(cfg)
    assert status["queries"] == status["comparisons"] == "done"
    assert {s: v for s, v in status.items() if s not in ("queries", "comparisons")} == {
        s: "new" for s in status if s not in ("queries", "comparisons")} and "reward_model" in status
    capsys.readouterr()
    assert mine_queries(cfg) == read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")
    assert build_comparisons(cfg, progress=False) == pairs             # reused: no engine needed
    out = capsys.readouterr().out
    assert f"queries: reusing 6 queries of {cfg.run_dir} (recipe unchanged)" in out
    assert f"comparisons: reusing {len(pairs)} pairs of {cfg.run_dir} (recipe unchanged)" in out

    changed = _cfg(tmp_path / "run", **{"comparisons.max_new_tokens.hhh": 99})
    assert mine_queries(changed)                                       # Step 0 read nothing that changed
    with pytest.raises(StaleOutputError, match=r"comparisons.max_new_tokens.hhh: 12 -> 99"):
        build_comparisons(changed, progress=False)


def test_units_carry_the_fingerprint_and_foreign_units_are_never_mixed(tmp_path):
    cfg = _cfg(tmp_path / "run")
    mine_queries(cfg)
    build_comparisons(cfg, _engines(cfg), progress=False)
    fp = read_json(cfg.run_dir / "comparisons" / FINGERPRINT_FILE)["fingerprint"]
    assert read_json(cfg.run_dir / "comparisons" / "manifest.json")["fingerprint"] == fp
    units = sorted((cfg.run_dir / "comparisons" / "responses").glob("*.jsonl"))
    assert units and all(r["fingerprint"] == fp for u in units for r in read_jsonl(u))

    # an interrupted run's folder into which a unit of another recipe was copied by hand
    other = _cfg(tmp_path / "other")
    mine_queries(other)
    (other.run_dir / "comparisons").mkdir()
    shutil.copy(cfg.run_dir / "comparisons" / FINGERPRINT_FILE, other.run_dir / "comparisons" / FINGERPRINT_FILE)
    rows = [dict(r, fingerprint="0000000000000000") for r in read_jsonl(units[0])]
    write_jsonl(other.run_dir / "comparisons" / "responses" / units[0].name, rows)
    with pytest.raises(ConfigError, match="never mixed"):
        build_comparisons(other, _engines(other), progress=False)


def test_edited_demonstration_file_changes_the_fingerprint(tmp_path):
    demos = tmp_path / "hhh.txt"
    shutil.copy(ROOT / "data" / "demonstrations" / "hhh.txt", demos)
    cfg = _cfg(tmp_path / "run", **{"comparisons.demonstrations.hhh": str(demos)})
    before = {s: stage_fingerprint(cfg, s) for s in ("queries", "comparisons", "reward_model")}
    demos.write_text(demos.read_text().replace("Assistant:", "Assistant: Sure.", 1))
    after = {s: stage_fingerprint(cfg, s) for s in before}
    assert after["queries"] == before["queries"]             # Step 0 does not read demonstrations
    assert after["comparisons"] != before["comparisons"]
    assert after["reward_model"] != before["reward_model"]   # through its upstream
    assert "file:comparisons.demonstrations.hhh" in stage_inputs(cfg, "comparisons")


def test_folder_without_a_fingerprint_is_not_trusted(tmp_path):
    cfg = _cfg(tmp_path / "run")
    write_jsonl(cfg.stage_dir("queries") / "queries.jsonl", [{"id": 0, "query": "hand-made"}])
    with pytest.raises(StaleOutputError, match="without a fingerprint.json"):
        check_run(cfg)


def test_resumed_step0_equals_an_uninterrupted_run(tmp_path):
    full = mine_queries(_cfg(tmp_path / "a", **{"queries.num_queries": 12}))    # two rounds of 8
    cfg = _cfg(tmp_path / "b", **{"queries.num_queries": 12})
    with pytest.raises(KeyboardInterrupt):
        generate_queries(cfg, EchoEngine(mined_query, fail_after=1), progress=False)
    assert check_run(cfg)["queries"] == "resume"
    assert read_json(cfg.run_dir / "queries" / "progress.json")["fingerprint"] == stage_fingerprint(cfg, "queries")
    assert mine_queries(cfg) == full


def test_cli_check_names_the_field_and_fresh_gets_its_own_folder(tmp_path, capsys):
    out = tmp_path / "run"
    mine_queries(_cfg(out))
    base = ["--config", str(TINY), "--set", f"output_dir={out}", "--set", "queries.num_queries=6"]
    assert cli.main(["check", *base]) == 0
    assert "queries: finished with this recipe: reused" in capsys.readouterr().out
    assert cli.main(["check", *base, "--set", "queries.top_p=0.5"]) == 2
    assert "queries.top_p: 0.9 -> 0.5" in capsys.readouterr().err

    fresh = fresh_output_dir(_cfg(out))
    assert "tiny-fresh-" in fresh
    assert fresh_output_dir(_cfg(out, **{"queries.top_p": 0.5})) != fresh       # another recipe, another folder
    assert cli.main(["where", "--config", str(TINY), "--overrides", '{"queries.num_queries": 6}', "--fresh"]) == 0
    assert capsys.readouterr().out.strip() == str(ROOT / fresh)


def test_reproduction_report_compares_every_headline_number(tmp_path):
    runs = []
    for name in ("ref", "again"):
        cfg = _cfg(tmp_path / name)
        mine_queries(cfg)
        build_comparisons(cfg, _engines(cfg), progress=False)
        runs.append(cfg.run_dir)
    rows = compare(*runs)
    metrics = {r["metric"] for r in rows}
    assert {"Step 0: queries kept", "Step 1: pairs after the Heuristic Filter"} <= metrics
    assert any(m.startswith("Step 1: bad-response rate") for m in metrics)
    assert all(r["difference"] == 0 for r in rows)
    text = write_report(*runs)
    assert "same recipe (same fingerprint)" in text and (runs[1] / "reproduction.json").is_file()
    assert "| Step 0: queries generated | 8 | 8 | 0 (same) |" in text          # a count, not a rate

    other = _cfg(tmp_path / "other", **{"queries.num_queries": 4})
    mine_queries(other)
    row = next(r for r in compare(runs[0], other.run_dir) if r["metric"] == "Step 0: queries kept")
    assert (row["reference"], row["run"], row["difference"]) == (6, 4, -2)
