"""Human-preference benchmarks from BIG-bench: ``hhh_alignment`` and ``truthful_qa``.

The task files come from the source archive of the ``bigbench`` package on PyPI (the package is
never installed: the sdist is fetched, only the two tasks' JSON files are extracted, and the
archive is deleted). They are cached under ``data/bigbench/`` (or ``$ALMOST_BIGBENCH``)::

    data/bigbench/
      hhh_alignment/{harmless,helpful,honest,other}/task.json
      truthful_qa/task_mc.json, questions.json
      SOURCE.json                      # where the files came from (archive, sha256)

``hhh_alignment`` ``task.json`` (one per category) holds examples of the form::

    {"input": "Can you tell me ...",                          # the human turn(s)
     "target_scores": {"<better response>": 1, "<worse response>": 0}}

where a multi-turn ``input`` continues with ``\\n\\nAssistant: ...\\n\\nHuman: ...`` lines.
:func:`load_hhh` turns each example into one pair::

    {"id": "harmless-0", "category": "harmless", "input": str,
     "history": [("Human", str), ("Assistant", str), ...],   # ends with a Human turn
     "cluster": "3f2a9c0d1e4b",                               # the conversation (hash of history)
     "chosen": str, "rejected": str}

Many examples reuse one conversation with other response pairs (221 pairs, 102 conversations,
up to 15 pairs each); ``cluster`` lets evaluation resample them together.

and :func:`load_truthful_qa` gives one record per question::

    {"id": 0, "question": str, "category": str, "best_answer": str,
     "mc1_choices": [str], "mc1_labels": [1, 0, ...],        # one true answer (task_mc.json)
     "mc2_choices": [str], "mc2_labels": [1, 1, 0, ...]}     # every true and false answer

Usage::

    pairs = load_hhh()                      # downloads once, 221 pairs
    records = load_truthful_qa()            # 299 questions
    pairs = load_hhh("data/fixtures/bigbench")    # any folder laid out like the cache
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from .config import REPO_ROOT
from .dialogue import Turn

HHH_CATEGORIES = ("harmless", "helpful", "honest", "other")
HHH_COUNTS = {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}   # 221 pairs
TRUTHFULQA_COUNT = 299

SDIST_NAME, SDIST_VERSION = "bigbench", "1.0.0"
PYPI_SIMPLE = f"https://pypi.org/simple/{SDIST_NAME}/"
TASK_FILES = {
    "hhh_alignment": ["task.json"] + [f"{c}/task.json" for c in HHH_CATEGORIES],
    "truthful_qa": ["task_mc.json", "questions.json"],
}


class BigBenchError(RuntimeError):
    """The benchmark files are missing, unreachable or malformed; the message says which."""


# --------------------------------------------------------------------------- cache and download
def bigbench_dir() -> Path:
    return Path(os.environ.get("ALMOST_BIGBENCH", REPO_ROOT / "data" / "bigbench"))


def _cached(root: Path, task: str) -> bool:
    return all((root / task / f).is_file() for f in TASK_FILES[task])


def _fetch_sdist(work: Path) -> Path:
    """Download the ``bigbench`` sdist into ``work``: PyPI's simple index first, ``pip download`` second.

    ``$ALMOST_BIGBENCH_SDIST`` may name an already downloaded archive (offline machines).
    """
    local = os.environ.get("ALMOST_BIGBENCH_SDIST")
    if local:
        if not Path(local).is_file():
            raise BigBenchError(f"ALMOST_BIGBENCH_SDIST={local} is not a file")
        return Path(local)
    errors = []
    try:   # the simple index (PEP 691 JSON), as pip reads it: no package code runs
        req = urllib.request.Request(PYPI_SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        name = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
        sdist = next((f for f in files if f["filename"] == name), None)
        if sdist is None:
            raise BigBenchError(f"{name} not listed at {PYPI_SIMPLE}")
        target = work / name
        print(f"downloading {sdist['url']} ({sdist.get('size', 0) / 1e6:.0f} MB, once)", flush=True)
        digest = hashlib.sha256()
        with urllib.request.urlopen(sdist["url"], timeout=120) as r, open(target, "wb") as fh:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != sdist["hashes"]["sha256"]:
            raise BigBenchError(f"sha256 mismatch for {name}")
        return target
    except Exception as e:            # no network, a mirror without the JSON API, ...
        errors.append(f"PyPI simple index: {type(e).__name__}: {e}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(work.glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
    if proc.returncode == 0 and found:
        return found[0]
    errors.append(f"pip download: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    raise BigBenchError(
        f"BIG-bench task files are not cached in {bigbench_dir()} and the {SDIST_NAME}=={SDIST_VERSION} "
        "source archive could not be fetched from PyPI (" + "; ".join(errors) + "). On an offline machine, "
        f"copy the folder data/bigbench/ from a machine that has it, or set ALMOST_BIGBENCH_SDIST to a "
        f"downloaded {SDIST_NAME}-{SDIST_VERSION}.tar.gz.")


def _extract(archive: Path, tasks, dest: Path) -> None:
    """Extract only ``TASK_FILES`` of ``tasks`` (no code, no other task) into ``dest``."""
    pattern = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(" + "|".join(map(re.escape, tasks)) + r")/(.+)$")
    wanted = {(t, f) for t in tasks for f in TASK_FILES[t]}
    got = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            m = pattern.match(member.name)
            if not m or (m.group(1), m.group(2)) not in wanted or not member.isfile():
                continue
            out = dest / m.group(1) / m.group(2)
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as fh:
                shutil.copyfileobj(src, fh)
            got.add((m.group(1), m.group(2)))
    missing = sorted(wanted - got)
    if missing:
        raise BigBenchError(f"{archive.name} lacks {['/'.join(x) for x in missing]}")


def ensure_tasks(tasks=("hhh_alignment", "truthful_qa"), root: str | Path | None = None) -> Path:
    """Make sure the task files are cached under ``root`` (download once); return ``root``.

    Both tasks come from one 360 MB archive, so a missing task fetches every task of ``TASK_FILES``.
    Files are extracted into a temporary folder and moved into place only when complete.
    """
    root = Path(root) if root is not None else bigbench_dir()
    if all(_cached(root, t) for t in tasks):
        return root
    root.mkdir(parents=True, exist_ok=True)
    all_tasks = list(TASK_FILES)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        archive = _fetch_sdist(tmp)
        _extract(archive, all_tasks, tmp / "tasks")
        for task in all_tasks:
            if not _cached(root, task):
                shutil.rmtree(root / task, ignore_errors=True)
                os.replace(tmp / "tasks" / task, root / task)
        source = {"archive": archive.name, "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                  "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 1),
                  "files": {t: TASK_FILES[t] for t in all_tasks}}
        (root / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"cached BIG-bench tasks {all_tasks} in {root}", flush=True)
    return root


# --------------------------------------------------------------------------- parsing
def _read_task(path: Path) -> dict:
    if not path.is_file():
        raise BigBenchError(f"not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BigBenchError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise BigBenchError(f"{path}: expected a JSON object with a non-empty 'examples' list")
    return data


def _scored_choices(ex, where: str) -> dict:
    if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not ex["input"].strip():
        raise BigBenchError(f"{where}: expected an object with a non-empty string 'input'")
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise BigBenchError(f"{where}: 'target_scores' must map at least two responses to scores")
    for resp, s in scores.items():
        if not isinstance(resp, str) or not resp.strip() or isinstance(s, bool) or s not in (0, 1):
            raise BigBenchError(f"{where}: 'target_scores' must map non-empty responses to 0 or 1, "
                                f"got {str(resp)[:40]!r}: {s!r}")
    if sum(scores.values()) < 1 or sum(scores.values()) == len(scores):
        raise BigBenchError(f"{where}: 'target_scores' needs a response scored 1 and one scored 0")
    return scores


_TURN = re.compile(r"\n+\s*(Human|Assistant):")


def hhh_history(text: str) -> list[Turn]:
    """``"q\\n\\nAssistant: a\\n\\nHuman: q2"`` -> ``[("Human", q), ("Assistant", a), ("Human", q2)]``."""
    text = text.strip()
    if not text.startswith("Human:"):
        text = "Human: " + text
    parts = _TURN.split("\n" + text)          # ["", "Human", " q", "Assistant", " a", ...]
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def hhh_cluster(history: list[Turn]) -> str:
    """A short stable key of a conversation: pairs with the same turns (whitespace aside) share it."""
    return hashlib.sha256(json.dumps([list(t) for t in history]).encode()).hexdigest()[:12]


def parse_hhh(data: dict, category: str, source: str = "<hhh>") -> list[dict]:
    """One category's ``task.json`` (already parsed) -> pairs; raises :class:`BigBenchError` on bad data."""
    pairs = []
    for i, ex in enumerate(data["examples"]):
        where = f"{source}: example {i}"
        scores = _scored_choices(ex, where)
        if len(scores) != 2:
            raise BigBenchError(f"{where}: hhh_alignment examples compare exactly two responses, got {len(scores)}")
        (chosen,) = [r for r, s in scores.items() if s == 1]
        (rejected,) = [r for r, s in scores.items() if s == 0]
        history = hhh_history(ex["input"])
        if not history or history[-1][0] != "Human" or any(
                role != ("Human", "Assistant")[j % 2] for j, (role, _) in enumerate(history)):
            raise BigBenchError(f"{where}: 'input' must alternate Human/Assistant turns and end with a Human turn")
        pairs.append({"id": f"{category}-{i}", "category": category, "input": ex["input"],
                      "history": history, "cluster": hhh_cluster(history), "chosen": chosen,
                      "rejected": rejected})
    return pairs


def load_hhh(root: str | Path | None = None, check_counts: bool | None = None) -> list[dict]:
    """All hhh_alignment pairs, category by category (see the module docstring for the format).

    ``root=None`` uses the cache (downloading once) and checks the published counts
    (58/59/61/43); any other folder laid out like the cache is read as is.
    """
    if root is None:
        root = ensure_tasks(("hhh_alignment",))
        check_counts = True if check_counts is None else check_counts
    root = Path(root)
    pairs = []
    for cat in HHH_CATEGORIES:
        path = root / "hhh_alignment" / cat / "task.json"
        got = parse_hhh(_read_task(path), cat, str(path))
        if check_counts and len(got) != HHH_COUNTS[cat]:
            raise BigBenchError(f"{path}: {len(got)} pairs, expected {HHH_COUNTS[cat]}")
        pairs.extend(got)
    return pairs


def load_truthful_qa(root: str | Path | None = None, check_counts: bool | None = None) -> list[dict]:
    """TruthfulQA as BIG-bench ships it: mc1 from ``task_mc.json``, mc2 from ``questions.json``."""
    if root is None:
        root = ensure_tasks(("truthful_qa",))
        check_counts = True if check_counts is None else check_counts
    folder = Path(root) / "truthful_qa"
    mc_path, q_path = folder / "task_mc.json", folder / "questions.json"
    mc, qs = _read_task(mc_path), _read_task(q_path)
    if len(mc["examples"]) != len(qs["examples"]):
        raise BigBenchError(f"{folder}: task_mc.json has {len(mc['examples'])} questions, "
                            f"questions.json {len(qs['examples'])}")
    records = []
    for i, (m, q) in enumerate(zip(mc["examples"], qs["examples"])):
        scores = _scored_choices(m, f"{mc_path}: example {i}")
        where = f"{q_path}: example {i}"
        keys = ("Question", "Category", "True answers", "False answers", "Best answer")
        if not isinstance(q, dict) or any(k not in q for k in keys):
            raise BigBenchError(f"{where}: expected the keys {list(keys)}")
        if not q["True answers"] or not q["False answers"]:
            raise BigBenchError(f"{where}: needs at least one true and one false answer")
        if q["Question"].strip() != m["input"].strip():
            raise BigBenchError(f"{where}: question {q['Question'][:50]!r} does not match task_mc.json's "
                                f"{m['input'][:50]!r}")
        if sum(scores.values()) != 1:
            raise BigBenchError(f"{mc_path}: example {i}: mc1 needs exactly one true answer")
        records.append({
            "id": i, "question": q["Question"], "category": q["Category"], "best_answer": q["Best answer"],
            "mc1_choices": list(scores), "mc1_labels": [int(s) for s in scores.values()],
            "mc2_choices": list(q["True answers"]) + list(q["False answers"]),
            "mc2_labels": [1] * len(q["True answers"]) + [0] * len(q["False answers"])})
    if check_counts and len(records) != TRUTHFULQA_COUNT:
        raise BigBenchError(f"{folder}: {len(records)} questions, expected {TRUTHFULQA_COUNT}")
    return records
