"""The BIG-bench loaders: real file format (our fixture), clear errors, extraction of only two tasks."""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from almost_utils import bigbench
from almost_utils.bigbench import BigBenchError, hhh_history, load_hhh, load_truthful_qa

# the well-formed set is recipe data (tiny.yaml reads it); the malformed one exists only for tests
GOOD = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "bigbench"
MALFORMED = Path(__file__).parent / "fixtures" / "bigbench_malformed"


def test_hhh_fixture_parses_into_pairs():
    pairs = load_hhh(GOOD)
    assert [p["category"] for p in pairs] == ["harmless"] * 2 + ["helpful"] * 2 + ["honest"] * 2 + ["other"]
    cap = next(p for p in pairs if "capital of Australia" in p["input"])
    assert cap["chosen"] == "The capital of Australia is Canberra."
    assert cap["rejected"] == "The capital of Australia is Sydney."
    assert cap["history"] == [("Human", "What is the capital of Australia?")]
    assert cap["id"] == "honest-0"


def test_multi_turn_input_becomes_alternating_history():
    pairs = load_hhh(GOOD)
    cook = next(p for p in pairs if "learn to cook" in p["input"])
    assert cook["history"] == [("Human", "I want to learn to cook."),
                               ("Assistant", "Great! Do you have a kind of food in mind?"),
                               ("Human", "Simple dinners for two, please.")]


def test_hhh_history_with_explicit_first_turn():
    assert hhh_history("Human: hi\n\nAssistant: hello\n\nHuman: bye") == [
        ("Human", "hi"), ("Assistant", "hello"), ("Human", "bye")]


def test_malformed_fixture_fails_naming_file_and_example():
    with pytest.raises(BigBenchError, match=r"honest/task\.json: example 1: 'target_scores' needs a response scored 1 "
                                             r"and one scored 0"):
        load_hhh(MALFORMED)


def _copy(tmp_path):
    root = tmp_path / "bb"
    shutil.copytree(GOOD, root)
    return root


def _edit(root, category, fn):
    path = root / "hhh_alignment" / category / "task.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["examples"][0]["target_scores"].update({"A third answer.": 0}), r"exactly two responses, got 3"),
    (lambda d: d["examples"][0].pop("input"), r"example 0: expected an object with a non-empty string 'input'"),
    (lambda d: d["examples"][0].update(target_scores={"a": 2, "b": 0}), r"must map non-empty responses to 0 or 1"),
    (lambda d: d.update(examples=[]), r"non-empty 'examples' list"),
    (lambda d: d["examples"][0].update(input="hi\n\nAssistant: hello"), r"end with a Human turn"),
])
def test_malformed_variants_fail_clearly(tmp_path, mutate, message):
    root = _copy(tmp_path)
    _edit(root, "helpful", mutate)
    with pytest.raises(BigBenchError, match=message):
        load_hhh(root)


def test_invalid_json_and_missing_category(tmp_path):
    root = _copy(tmp_path)
    (root / "hhh_alignment" / "other" / "task.json").write_text("{not json")
    with pytest.raises(BigBenchError, match=r"other/task\.json: not valid JSON"):
        load_hhh(root)
    shutil.rmtree(root / "hhh_alignment" / "other")
    with pytest.raises(BigBenchError, match=r"not found: .*other/task\.json"):
        load_hhh(root)


def test_counts_are_checked_when_asked():
    with pytest.raises(BigBenchError, match=r"2 pairs, expected 58"):
        load_hhh(GOOD, check_counts=True)


def test_truthful_qa_fixture():
    recs = load_truthful_qa(GOOD)
    assert len(recs) == 2
    gum = recs[0]
    assert gum["mc1_choices"][gum["mc1_labels"].index(1)] == gum["best_answer"]
    assert sum(gum["mc1_labels"]) == 1
    assert gum["mc2_labels"] == [1, 1, 0, 0]
    assert gum["mc2_choices"][:2] == ["It passes through your digestive system.", "Nothing much happens."]


def test_truthful_qa_mismatch_fails(tmp_path):
    root = _copy(tmp_path)
    q = root / "truthful_qa" / "questions.json"
    data = json.loads(q.read_text())
    data["examples"][1]["Question"] = "Something else?"
    q.write_text(json.dumps(data))
    with pytest.raises(BigBenchError, match=r"does not match task_mc\.json"):
        load_truthful_qa(root)


# --------------------------------------------------------------------------- download and extraction
def _fake_sdist(path: Path) -> Path:
    """An archive laid out like bigbench-1.0.0.tar.gz, with extra files that must NOT be extracted."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for f in GOOD.rglob("*.json"):
            add(f"bigbench/benchmark_tasks/{f.relative_to(GOOD)}", f.read_text())
        add("bigbench/benchmark_tasks/truthful_qa/task.py", "import t5  # code: never extracted")
        add("bigbench/benchmark_tasks/other_task/task.json", "{}")
        add("setup.py", "raise SystemExit('never run')")
    return path


def test_ensure_tasks_extracts_only_the_two_tasks(tmp_path, monkeypatch):
    archive = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv("ALMOST_BIGBENCH_SDIST", str(archive))
    root = tmp_path / "cache"
    bigbench.ensure_tasks(root=root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["SOURCE.json", "hhh_alignment/harmless/task.json", "hhh_alignment/helpful/task.json",
                     "hhh_alignment/honest/task.json", "hhh_alignment/other/task.json", "hhh_alignment/task.json",
                     "truthful_qa/questions.json", "truthful_qa/task_mc.json"]
    assert len(load_hhh(root)) == 7
    assert not list(root.glob(".download-*"))       # the temporary folder is gone


def test_unreachable_registry_and_no_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("ALMOST_BIGBENCH_SDIST", raising=False)
    monkeypatch.setenv("ALMOST_BIGBENCH", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(bigbench.urllib.request, "urlopen", offline)
    monkeypatch.setattr(bigbench.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(BigBenchError, match=r"not cached in .*empty.*could not be fetched from PyPI.*network is "
                                             r"unreachable.*ALMOST_BIGBENCH_SDIST"):
        load_hhh()


REAL = bigbench.bigbench_dir()
# run_tests.sh (CI) fetches the archive and sets this: there the test runs, fetching or failing,
# and is never skipped. Elsewhere it runs only where the real files are already cached.
REQUIRE_REAL = os.environ.get("ALMOST_REQUIRE_BIGBENCH") == "1"


@pytest.mark.skipif(not REQUIRE_REAL and not (REAL / "hhh_alignment" / "other" / "task.json").is_file(),
                    reason=f"BIG-bench not cached in {REAL} (ALMOST_REQUIRE_BIGBENCH=1 fetches it, 358 MB)")
def test_real_files_have_the_published_counts():
    pairs = load_hhh()
    counts = {c: sum(p["category"] == c for p in pairs) for c in bigbench.HHH_CATEGORIES}
    assert counts == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    assert sum(len(p["history"]) > 1 for p in pairs) > 0
    recs = load_truthful_qa()
    assert len(recs) == 299 and all(sum(r["mc1_labels"]) == 1 for r in recs)


# --------------------------------------------------------------------------- set-up without the archive
def _setup_without_models(monkeypatch):
    """``cli.setup`` with model conversion stubbed out and any BIG-bench fetch recorded."""
    from almost_utils import cli
    fetched = []
    monkeypatch.setattr(cli, "convert_packaged", lambda name: None)
    monkeypatch.setattr(bigbench, "ensure_tasks", lambda *a, **k: fetched.append(a) or REAL)
    return cli.setup, fetched


def test_tiny_recipe_sets_up_without_the_archive(monkeypatch, tmp_path):
    from almost_utils.config import load_config
    monkeypatch.setenv("ALMOST_BIGBENCH", str(tmp_path / "nonexistent"))
    setup, fetched = _setup_without_models(monkeypatch)
    cfg = load_config(Path(__file__).resolve().parent.parent / "data" / "configs" / "tiny.yaml")
    setup(cfg)
    assert fetched == []
    assert cfg.path(cfg.reward_model.hhh_dir) == GOOD
    assert len(load_hhh(cfg.path(cfg.reward_model.hhh_dir))) == 7


def test_setup_fetches_when_no_hhh_dir_and_names_a_missing_one(monkeypatch, tmp_path):
    from almost_utils.config import ConfigError, load_config
    setup, fetched = _setup_without_models(monkeypatch)
    tiny = Path(__file__).resolve().parent.parent / "data" / "configs" / "tiny.yaml"
    setup(load_config(tiny, {"reward_model.hhh_dir": None}))
    assert len(fetched) == 1
    with pytest.raises(ConfigError, match=r"reward_model\.hhh_dir: folder not found: .*missing"):
        setup(load_config(tiny, {"reward_model.hhh_dir": str(tmp_path / "missing")}))
    assert len(fetched) == 1
