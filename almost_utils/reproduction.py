"""Reproduction report: every headline number of a reference run next to a recomputed run's.

``FRESH=1 bash run_all.sh`` recomputes a recipe from nothing into a new folder and ends with this
report against the recipe's usual folder (the committed reference run)::

    python -m almost_utils.cli reproduce --reference results/cpu --run results/cpu-fresh-1a2b3c4d

It writes ``reproduction.json`` (rows ``{"metric", "reference", "run", "difference"}``) and
``reproduction.md`` into the recomputed run's folder. Numbers are read from the stages' manifests
and metrics only; a number one run lacks (an older run, a stage not run) shows as missing.
"""
from __future__ import annotations

import re
from pathlib import Path

from .artifacts import atomic_write_text, read_json, write_json
from .fingerprint import FINGERPRINT_FILE, differences

RM_SCORERS = ("rm", "rm_no_hf", "untrained", "longer")


def _read(path: Path):
    return read_json(path) if path.is_file() else None


def headline_numbers(run_dir: str | Path) -> dict[str, float]:
    """``{metric: value}``: counts as integers, rates and accuracies as fractions."""
    run_dir = Path(run_dir)
    out: dict[str, float] = {}
    q = _read(run_dir / "queries" / "manifest.json")
    if q:
        out["Step 0: queries generated"] = q["counts"]["generated"]
        out["Step 0: queries kept"] = q["counts"]["kept"]
    c = _read(run_dir / "comparisons" / "manifest.json")
    if c:
        counts = c["counts"]
        out["Step 1: responses"] = sum(counts["responses"].values())
        for name, n_bad in counts["bad_responses"].items():
            out[f"Step 1: bad-response rate, {name}"] = n_bad / max(1, counts["responses"][name])
        out["Step 1: pairs before the Heuristic Filter"] = counts["pairs_before_filter"]
        out["Step 1: pairs after the Heuristic Filter"] = counts["pairs"]
        for rule, n in (counts.get("pairs_by_rule") or {}).items():
            for when, value in n.items():
                out[f"Step 1: pairs, {rule} rule, {when.replace('_', ' ')}"] = value
    m = _read(run_dir / "reward_model" / "metrics.json")
    if m:
        for a in m["accuracy"]:
            wanted = a["scorer"] in RM_SCORERS and (a["subset"] == "all" or (a["benchmark"] == "hhh"
                                                                               and a["scorer"] == "rm"))
            if wanted:
                out[f"Step 2: accuracy, {a['benchmark']} {a['subset']}, {a['scorer']}"] = a["accuracy"]
        diff = (m.get("ablation") or {}).get("hhh_rm_minus_rm_no_hf")
        if diff:
            out["Step 2: HHH accuracy, rm minus rm_no_hf"] = diff["difference"]
    return out


def _is_fraction(metric: str) -> bool:
    return re.search(r"\b(rate|accuracy)\b", metric) is not None


def _fmt(metric: str, value) -> str:
    if value is None:
        return "missing"
    if _is_fraction(metric):
        return f"{100 * value:.1f}%"
    return f"{value:,}"


def _fmt_diff(metric: str, d) -> str:
    if d is None:
        return ""
    if d == 0:
        return "0 (same)"
    return f"{100 * d:+.1f} pp" if _is_fraction(metric) else f"{d:+,}"


def compare(reference: str | Path, run: str | Path) -> list[dict]:
    """One row per headline number of either run, in the reference's order."""
    ref, new = headline_numbers(reference), headline_numbers(run)
    rows = []
    for metric in list(ref) + [k for k in new if k not in ref]:
        a, b = ref.get(metric), new.get(metric)
        diff = None if a is None or b is None else b - a
        rows.append({"metric": metric, "reference": a, "run": b, "difference": diff})
    return rows


def recipe_differences(reference: str | Path, run: str | Path) -> dict[str, list]:
    """Per stage: the recorded inputs that differ between the two runs (``None``: a run has no record)."""
    out = {}
    for stage in ("queries", "comparisons", "reward_model"):
        a = _read(Path(reference) / stage / FINGERPRINT_FILE)
        b = _read(Path(run) / stage / FINGERPRINT_FILE)
        if a is None and b is None:
            continue
        out[stage] = None if a is None or b is None else [
            [k, x, y] for k, x, y in differences(a["inputs"], b["inputs"])]
    return out


def report_markdown(rows: list[dict], recipes: dict[str, list], reference: str, run: str) -> str:
    lines = [f"Reproduction report: `{run}` (recomputed) against `{reference}` (reference)", ""]
    for stage, diffs in recipes.items():
        if diffs is None:
            lines.append(f"- {stage}: one of the runs records no fingerprint (made by an older version)")
        elif diffs:
            lines.append(f"- {stage}: recipes differ in {', '.join(d[0] for d in diffs)}")
        else:
            lines.append(f"- {stage}: same recipe (same fingerprint)")
    same = sum(r["difference"] == 0 for r in rows)
    both = sum(r["difference"] is not None for r in rows)
    lines += ["", f"{same} of {both} numbers present in both runs are identical.", "",
              "| number | reference | recomputed | difference |", "| --- | --- | --- | --- |"]
    for r in rows:
        m = r["metric"]
        lines.append(f"| {m} | {_fmt(m, r['reference'])} | {_fmt(m, r['run'])} | {_fmt_diff(m, r['difference'])} |")
    return "\n".join(lines) + "\n"


def write_report(reference: str | Path, run: str | Path) -> str:
    """Compare, write ``reproduction.{json,md}`` into ``run`` and return the Markdown."""
    reference, run = Path(reference), Path(run)
    for folder in (reference, run):
        if not folder.is_dir():
            raise FileNotFoundError(f"no run folder at {folder}")
    rows = compare(reference, run)
    if not rows:
        raise ValueError(f"neither {reference} nor {run} holds a finished stage to compare")
    recipes = recipe_differences(reference, run)
    text = report_markdown(rows, recipes, str(reference), str(run))
    write_json(run / "reproduction.json", {"reference": str(reference), "run": str(run), "rows": rows,
                                           "recipe_differences": recipes})
    atomic_write_text(run / "reproduction.md", text)
    return text
