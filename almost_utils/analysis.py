"""Step 7: the paper's tables and figures, and our verdict on its claims, from a run's files only.

Nothing here loads a model or samples: every number comes from the stages' artifacts (their
summaries are recomputed from the stored rows where that is cheap, and checked), and every
bootstrap is seeded, so rerunning notebook 07 on the same artifacts rewrites the same tables,
byte for byte. Outputs under ``results/<run>/analysis/``::

    rm_accuracy.{md,csv}     policies.{md,csv}    hhh_by_category.{md,csv}   pairwise.{md,csv}
    claims.{md,csv}          stage_times.{md,csv}    figures/*.png

Usage::

    data = collect("results/cpu")
    tables = build_tables(data)          # {name: DataFrame}
    write_tables(tables, "results/cpu/analysis")
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .artifacts import atomic_write_text, read_json, read_jsonl, save_figure
from .evaluation_report import ci, focus_rows, hhh_table, label, policies_table, winrate_table

STAGES = ("queries", "comparisons", "reward_model", "splits", "rmsp", "sft", "sft_norm", "sft_answers", "ppo",
          "ppo_answers", "evaluation")
RM_SCORERS = {"rm": "ALMoST RM", "rm_no_hf": "RM without Heuristic Filter", "longer": "longer response",
              "untrained": "untrained RM", "random": "random"}


def collect(run_dir: str | Path) -> dict:
    """Every artifact the tables need (missing later stages are simply absent)."""
    from . import evaluation_report, ppo_report
    run_dir = Path(run_dir)
    recipe = read_json(run_dir / "reward_model" / "manifest.json")["config"]
    data: dict = {"run_dir": run_dir, "metrics": read_json(run_dir / "reward_model" / "metrics.json"),
                  "seed": recipe["seed"], "bootstrap_samples": recipe["reward_model"]["bootstrap_samples"]}
    if (run_dir / "rmsp" / "candidates.jsonl").is_file():
        data["candidates"] = read_jsonl(run_dir / "rmsp" / "candidates.jsonl")
    if (run_dir / "sft_answers" / "summary.json").is_file():
        data["sft_summary"] = read_json(run_dir / "sft_answers" / "summary.json")
        data["answers"] = read_jsonl(run_dir / "sft_answers" / "answers.jsonl")
    if (run_dir / "ppo_answers" / "summary.json").is_file():
        ppo = ppo_report.load(run_dir)
        data.update(ppo_log=ppo["log"], ppo_summary=ppo["summary"], answers=ppo["answers"])
    if (run_dir / "evaluation" / "summary.json").is_file():
        data["evaluation"] = evaluation_report.load(run_dir)
    return data


# --------------------------------------------------------------------------- tables
def rm_accuracy_table(metrics: dict) -> pd.DataFrame:
    """Pairwise accuracy of the RMs and baselines: held-out synthetic pairs and HHH by category."""
    rows = metrics["accuracy"]
    where = list(dict.fromkeys((r["benchmark"], r["subset"]) for r in rows))
    out = {}
    for bench, subset in where:
        got = {r["scorer"]: r for r in rows if (r["benchmark"], r["subset"]) == (bench, subset)}
        name = {"heldout": "held-out synthetic (filtered)", "heldout_no_hf": "held-out synthetic (unfiltered)",
                "hhh": "BIG-bench HHH"}.get(bench, bench)
        n = next(iter(got.values()))["n"]
        out[f"{name}, {subset} (n={n})"] = {RM_SCORERS.get(s, s): ci(r["accuracy"], r["ci_low"], r["ci_high"])
                                            for s, r in got.items()}
    return pd.DataFrame(out).T


def stage_times(run_dir: Path) -> pd.DataFrame:
    """Seconds per stage from its manifest: the last session's total and, where the stage was
    resumed or reused, the work summed over every session that computed it."""
    rows = []
    for stage in STAGES:
        path = run_dir / stage / "manifest.json"
        if not path.is_file():
            continue
        t = read_json(path).get("timings_s", {})
        parts = {k: v for k, v in t.items() if k.endswith("_all_sessions") or k.endswith("_all_steps")}
        rows.append({"stage": stage, "last session (s)": round(t.get("total", 0.0)),
                     "compute, all sessions (s)": round(sum(parts.values())) if parts else round(t.get("total", 0.0))})
    return pd.DataFrame(rows)


# The RM picked the self-play turns and rewarded PPO: as a judge of those policies it is not independent.
RM_JUDGE = "the Step-2 RM (trained against)"


def _verdict(lo: float, hi: float, null: float) -> str:
    if lo > null:
        return "supported"
    if hi < null:
        return "contradicted"
    return f"not shown (interval includes {null:g})"


def _diff(d: dict, key: str = "mean") -> str:
    return f"{d[key]:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def _winrate_claim(claim: str, r: dict) -> dict:
    return {"claim": claim, "measured by": RM_JUDGE + ", our 80 questions", "evidence": f"RM-judged win rate {ci(r['win_rate'], r['ci_low'], r['ci_high'])}, "
                                        f"length-controlled {ci(r['lc_win_rate'], r['lc_ci_low'], r['lc_ci_high'])}",
            "verdict": f"raw: {_verdict(r['ci_low'], r['ci_high'], 0.5)}; length-controlled: "
                       f"{_verdict(r['lc_ci_low'], r['lc_ci_high'], 0.5)}"}


def claims_table(data: dict) -> pd.DataFrame:
    """The paper's claims, our evidence at this scale (95% intervals), and a verdict by one rule:
    supported when the interval lies on the claimed side of no-effect, contradicted when it lies
    on the other side, not shown otherwise."""
    from .answers import matched_length_gain
    m, rows = data["metrics"], []
    hhh = next(r for r in m["accuracy"] if (r["benchmark"], r["subset"], r["scorer"]) == ("hhh", "all", "rm"))
    rows.append({"claim": "the synthetic RM beats random on HHH", "measured by": "BIG-bench HHH labels", "evidence": f"accuracy {ci(hhh['accuracy'], hhh['ci_low'], hhh['ci_high'])}",
                 "verdict": _verdict(hhh["ci_low"], hhh["ci_high"], 0.5)})
    d = m["paired"]["hhh"]["rm_minus_longer"]
    rows.append({"claim": "the synthetic RM beats the length baseline on HHH", "measured by": "BIG-bench HHH labels",
                 "evidence": f"RM minus longer-response accuracy {_diff(d, 'difference')}",
                 "verdict": _verdict(d["ci_low"], d["ci_high"], 0.0)})
    d = m.get("ablation", {}).get("hhh_rm_minus_rm_no_hf")       # absent when the ablation is off
    if d:
        rows.append({"claim": "the Heuristic Filter helps (RM trained with it vs without, HHH)",
                     "measured by": "BIG-bench HHH labels", "evidence": f"accuracy difference {_diff(d, 'difference')}",
                     "verdict": _verdict(d["ci_low"], d["ci_high"], 0.0)})
    pairwise = data["evaluation"]["summary"]["pairwise"]["rm"] if "evaluation" in data else []

    def lc(a: str, b: str) -> dict | None:
        return next((r for r in focus_rows(pairwise, a) if r["b"] == b), None)

    for a, b, claim in (("sft", "sft_norm", "RM-guided self-play beats unguided self-play (ALMoST-SFT vs SFT-noRM)"),
                        ("ppo", "sft", "PPO improves on SFT (ALMoST-PPO vs ALMoST-SFT)")):
        summary = data.get("ppo_summary" if a == "ppo" else "sft_summary")
        if summary and f"{a} - {b}" in summary["differences"]:
            d = summary["differences"][f"{a} - {b}"]["score"]
            gain = matched_length_gain(data["answers"], a, b, data["bootstrap_samples"], data["seed"])
            eq = gain["at_equal_length"]
            rows.append({"claim": claim, "measured by": RM_JUDGE + ", held-out queries",
                         "evidence": f"held-out RM score {_diff(d)}; at equal length {_diff(eq)}",
                         "verdict": f"raw: {_verdict(d['ci_low'], d['ci_high'], 0.0)}; at equal length: "
                                    f"{_verdict(eq['ci_low'], eq['ci_high'], 0.0)}"})
        if lc(a, b):
            rows.append(_winrate_claim(claim, lc(a, b)))
    aligned = "ppo" if lc("ppo", "vanilla") else "sft"
    for b, claim in (("vanilla", f"the aligned model ({label(aligned)}) beats the prompted baseline"),
                     ("instruct", f"{label(aligned)} against an instruction-tuned model trained on human data "
                                  "(paper: preferred 55-58.5% over Alpaca and Dolly)")):
        if lc(aligned, b):
            rows.append(_winrate_claim(claim, lc(aligned, b)))
    if "evaluation" in data:
        from .rm_eval import paired_difference
        units = data["evaluation"]["units"]["hhh_judge"]
        for a, b in (("sft", "sft_norm"), ("ppo", "sft"), (aligned, "vanilla"), (aligned, "instruct")):
            if a not in units or b not in units:
                continue
            other = {r["id"]: r for r in units[b]}
            mine = [r for r in units[a] if r["id"] in other]
            d = paired_difference([r["correct"] for r in mine], [other[r["id"]]["correct"] for r in mine],
                                  data["bootstrap_samples"], data["seed"], [r["cluster"] for r in mine])
            rows.append({"claim": f"{label(a)} judges HHH better than {label(b)}",
                         "measured by": "BIG-bench HHH labels, the policy as judge (no RM)",
                         "evidence": f"accuracy difference {_diff(d, 'difference')} on {d['n']} pairs",
                         "verdict": _verdict(d["ci_low"], d["ci_high"], 0.0)})
    return pd.DataFrame(rows)


def build_tables(data: dict) -> dict[str, pd.DataFrame]:
    """Every table of notebook 07 (see the module docstring)."""
    tables = {"rm_accuracy": rm_accuracy_table(data["metrics"])}
    if "evaluation" in data:
        s = data["evaluation"]["summary"]
        tables["policies"] = policies_table(s)
        tables["hhh_by_category"] = pd.concat({"as judge": hhh_table(s, "hhh_judge"),
                                               "likelihood": hhh_table(s, "hhh_likelihood")})
        tables["pairwise"] = winrate_table(s["pairwise"]["rm"])
    tables["claims"] = claims_table(data)
    tables["stage_times"] = stage_times(data["run_dir"])
    return tables


def markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A pipe table (GitHub Markdown) of ``df``, cells as strings; a MultiIndex joins its levels."""
    frame = df.reset_index() if index else df
    if index:
        head = df.index.names if any(n is not None for n in df.index.names) else [""] * df.index.nlevels
        frame.columns = [*(n or "" for n in head), *df.columns]
    cells = [[str(c) for c in frame.columns]] + [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(" --- " for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> dict[str, Path]:
    """Each table as Markdown and CSV (atomic writes); returns the Markdown paths."""
    folder = Path(folder)
    paths = {}
    for name, df in tables.items():
        index = not isinstance(df.index, pd.RangeIndex)
        atomic_write_text(folder / f"{name}.csv", df.to_csv(index=index))
        paths[name] = atomic_write_text(folder / f"{name}.md", markdown(df, index))
    return paths


def check_summary(data: dict) -> bool:
    """Whether the evaluation summary on disk equals one recomputed from its stored rows."""
    import json
    from .evaluation import summarize
    ev = data["evaluation"]
    cfg = ev["manifest"]["config"]
    again = summarize(ev["units"], cfg["evaluation"]["bootstrap_samples"], cfg["seed"])
    return json.loads(json.dumps(again)) == ev["summary"]


# --------------------------------------------------------------------------- figures
def make_figures(data: dict, folder: str | Path) -> dict[str, Path]:
    """The paper-style figures: win rates, PPO reward and KL, best of N, lengths, HHH by category."""
    import matplotlib.pyplot as plt
    from . import evaluation_report as er
    from .ppo_report import curves_figure
    from .rmsp_report import best_of_n_curve, best_of_n_figure
    figs = {}
    if "evaluation" in data:
        ev = data["evaluation"]
        focus = [p for p in ("ppo", "sft") if p in ev["policies"]] or ev["policies"][:1]
        figs["win_rates"] = er.winrate_figure(ev["summary"]["pairwise"]["rm"], focus)
        figs["answer_lengths"] = er.lengths_figure(ev["units"])
        figs["hhh_by_category"] = er.hhh_figure(ev["summary"])
    if "ppo_log" in data:
        figs["ppo_curves"] = curves_figure(data["ppo_log"])
    if "candidates" in data:
        figs["best_of_n"] = best_of_n_figure(best_of_n_curve(data["candidates"]))
    paths = {}
    for name, fig in figs.items():
        paths[name] = save_figure(fig, Path(folder) / f"{name}.png")
        plt.close(fig)
    return paths
