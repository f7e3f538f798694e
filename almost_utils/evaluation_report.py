"""Tables and figures of Step 6 (notebook 06), from a finished ``evaluation`` stage; notebook 07
reuses them. Nothing here loads a model: everything comes from the stage's files.

Usage::

    data = load("results/cpu")
    hhh_table(data["summary"], "hhh_judge")           # accuracy per category, per policy
    paths = make_figures(data)                         # PNGs under evaluation/figures/
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .artifacts import read_json, save_figure
from .evaluation import NAMES, STAGE, load_units

COLORS = {"vanilla": "tab:gray", "sft_norm": "tab:orange", "sft": "tab:blue", "ppo": "tab:red", "instruct": "tab:green"}


def load(run_dir: str | Path) -> dict:
    """``{"summary", "units", "manifest", "policies", "stage_dir"}`` of a finished evaluation stage."""
    stage = Path(run_dir) / STAGE
    manifest = read_json(stage / "manifest.json")
    policies = manifest["config"]["evaluation"]["policies"]
    return {"summary": read_json(stage / "summary.json"), "units": load_units(stage, policies),
            "manifest": manifest, "policies": policies, "stage_dir": stage}


def label(policy: str) -> str:
    return NAMES.get(policy, policy)


def ci(x: float, lo: float, hi: float, pct: bool = True) -> str:
    return f"{x:.0%} [{lo:.0%}, {hi:.0%}]" if pct else f"{x:.2f} [{lo:.2f}, {hi:.2f}]"


# --------------------------------------------------------------------------- tables
def hhh_table(summary: dict, ev: str = "hhh_judge") -> pd.DataFrame:
    """Accuracy (95% cluster-bootstrap interval) per policy (rows) and HHH category (columns)."""
    rows = summary[ev]
    cats = list(dict.fromkeys(r["subset"] for r in rows))
    table = {}
    for r in rows:
        table.setdefault(label(r["policy"]), {})[r["subset"]] = ci(r["accuracy"], r["ci_low"], r["ci_high"])
    out = pd.DataFrame(table).T[cats]
    n = {r["subset"]: r["n"] for r in rows}
    out.columns = [f"{c} (n={n[c]})" for c in cats]
    return out


def policies_table(summary: dict) -> pd.DataFrame:
    """One row per policy: static HHH (judge, likelihood), TruthfulQA MC1 (both protocols),
    refusals on the probe (decline requests, benign controls), answer length and RM score."""
    out: dict = {}
    get = lambda rows, **kw: next(r for r in rows if all(r[k] == v for k, v in kw.items()))  # noqa: E731
    for p in summary["answers"]:
        j = get(summary["hhh_judge"], policy=p, subset="all")
        li = get(summary["hhh_likelihood"], policy=p, subset="all")
        t1 = get(summary["truthfulqa"], policy=p, protocol="called true")
        t2 = get(summary["truthfulqa"], policy=p, protocol="likelihood")
        rd = get(summary["refusals"], policy=p, kind="decline")
        rb = get(summary["refusals"], policy=p, kind="benign")
        a = summary["answers"][p]
        out[label(p)] = {
            "HHH, as judge": ci(j["accuracy"], j["ci_low"], j["ci_high"]),
            "HHH, likelihood": ci(li["accuracy"], li["ci_low"], li["ci_high"]),
            f"TruthfulQA MC1, called true (chance {t1['chance']:.0%})": ci(t1["accuracy"], t1["ci_low"], t1["ci_high"]),
            f"TruthfulQA MC1, likelihood (chance {t2['chance']:.0%})": ci(t2["accuracy"], t2["ci_low"], t2["ci_high"]),
            "refuses harmful": ci(rd["rate"], rd["ci_low"], rd["ci_high"]),
            "refuses benign": ci(rb["rate"], rb["ci_low"], rb["ci_high"]),
            "answer chars": f"{a['chars']['mean']:.0f}",
            "ended before the cap": f"{a['ended']['mean']:.0%}",
            "RM score": ci(a["score"]["mean"], a["score"]["ci_low"], a["score"]["ci_high"], pct=False),
        }
    return pd.DataFrame(out).T


def position_table(units: dict) -> pd.DataFrame:
    """How much of the policy-as-judge result is position: per policy, the share of HHH pairs on
    which the same letter wins in both orders (the reply then never decides the choice), the
    letter that wins more often, and the probability mass on the two letters."""
    rows = {}
    for p, got in units["hhh_judge"].items():
        first_a = [r["p_chosen_first"][0] > r["p_chosen_first"][1] for r in got]
        second_a = [r["p_chosen_second"][0] > r["p_chosen_second"][1] for r in got]
        same = np.mean([x == y for x, y in zip(first_a, second_a)])
        share_a = np.mean(first_a + second_a)
        mass = np.mean([sum(r["p_chosen_first"]) + sum(r["p_chosen_second"]) for r in got]) / 2
        rows[label(p)] = {"same letter in both orders": f"{same:.0%}",
                          "more often": f"A ({share_a:.0%})" if share_a >= 0.5 else f"B ({1 - share_a:.0%})",
                          'P(" A") + P(" B")': f"{mass:.2f}"}
    return pd.DataFrame(rows).T


def winrate_table(rows: list[dict]) -> pd.DataFrame:
    """Pairwise win rates of ``a`` against ``b``: raw and length-controlled, with intervals."""
    return pd.DataFrame([{
        "policy": label(r["a"]), "against": label(r["b"]), "questions": r["n"],
        "win / tie / loss": f"{r['wins']} / {r['ties']} / {r['losses']}",
        "win rate": ci(r["win_rate"], r["ci_low"], r["ci_high"]),
        "length-controlled": ci(r["lc_win_rate"], r["lc_ci_low"], r["lc_ci_high"]),
        "mean chars difference": f"{r['mean_dchars']:+.0f}"} for r in rows if r.get("n")])


def timings_table(manifest: dict) -> pd.DataFrame:
    """Seconds per policy (rows) and part of the work (columns), from the stage's manifest."""
    rows: dict = {}
    for key, sec in manifest["timings_s"].items():
        if "." in key:
            policy, part = key.split(".", 1)
            rows.setdefault(label(policy), {})[part.removesuffix("_s")] = round(sec)
    return pd.DataFrame(rows).T


def focus_rows(rows: list[dict], focus: str) -> list[dict]:
    """Every comparison involving ``focus``, seen from its side."""
    from .winrates import swap
    return [r if r["a"] == focus else swap(r) for r in rows if focus in (r["a"], r["b"]) and r.get("n")]


def side_by_side(units: dict, item_set: str = "question", ids: list | None = None, k: int = 3,
                 width: int = 300) -> str:
    """Markdown: ``k`` items (or ``ids``) with every policy's answer (cut to ``width`` characters)."""
    answers = units["answers"]
    first = next(iter(answers.values()))
    chosen = [r for r in first if r["set"] == item_set and (ids is None or r["id"] in ids)][:k]
    lines = []
    for item in chosen:
        lines.append(f"**{item['id']}** - {item['prompt']}\n")
        for p, rows in answers.items():
            r = next(x for x in rows if x["set"] == item_set and x["id"] == item["id"])
            text = r["answer"].replace("\n", " ")
            text = text[:width] + ("..." if len(text) > width else "")
            extra = f", RM {r['score']:+.2f}" if r.get("score") is not None else ""
            flag = " (flagged as refusal)" if r.get("refusal") else ""
            lines.append(f"- *{label(p)}*{extra}{flag}: {text or '(empty)'}")
        lines.append("")
    return "\n".join(lines)


def findings(summary: dict, focus: str = "sft") -> str:
    """A few sentences with the numbers a reader checks first."""
    lines = []
    judge = {r["policy"]: r for r in summary["hhh_judge"] if r["subset"] == "all"}
    best = max(judge.values(), key=lambda r: r["accuracy"])
    chance = [p for p, r in judge.items() if r["ci_low"] <= 0.5 <= r["ci_high"]]
    lines.append(f"- Static HHH as judge: the best is {label(best['policy'])} at "
                 f"{ci(best['accuracy'], best['ci_low'], best['ci_high'])}; {len(chance)} of {len(judge)} policies "
                 "have 50% (a coin) inside their interval.")
    lik = {r["policy"]: r for r in summary["hhh_likelihood"] if r["subset"] == "all"}
    best = max(lik.values(), key=lambda r: r["accuracy"])
    lines.append(f"- HHH likelihood preference: the best is {label(best['policy'])} at "
                 f"{ci(best['accuracy'], best['ci_low'], best['ci_high'])}.")
    for proto in ("called true", "likelihood"):
        rows = [r for r in summary["truthfulqa"] if r["protocol"] == proto]
        best = max(rows, key=lambda r: r["accuracy"])
        lines.append(f"- TruthfulQA MC1 ({proto}): the best is {label(best['policy'])} at "
                     f"{ci(best['accuracy'], best['ci_low'], best['ci_high'])} (a random choice: {best['chance']:.0%}).")
    ref = {r["policy"]: r for r in summary["refusals"] if r["kind"] == "decline"}
    ben = {r["policy"]: r for r in summary["refusals"] if r["kind"] == "benign"}
    lines.append("- Refusals of harmful requests (benign controls): " + "; ".join(
        f"{label(p)} {ref[p]['rate']:.0%} ({ben[p]['rate']:.0%})" for p in ref) + ".")
    for r in focus_rows(summary["pairwise"]["rm"], focus):
        lines.append(f"- RM judge, {label(focus)} vs {label(r['b'])}: wins "
                     f"{ci(r['win_rate'], r['ci_low'], r['ci_high'])}, at equal length "
                     f"{ci(r['lc_win_rate'], r['lc_ci_low'], r['lc_ci_high'])}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def hhh_figure(summary: dict):
    """HHH accuracy by category per policy: the policy as judge (left), likelihood (right)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
    for ax, ev, title in zip(axes, ("hhh_judge", "hhh_likelihood"),
                             ("HHH, the policy as judge (both orders)", "HHH, higher likelihood")):
        rows = summary[ev]
        cats = list(dict.fromkeys(r["subset"] for r in rows))
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        w = 0.8 / len(policies)
        for i, p in enumerate(policies):
            got = {r["subset"]: r for r in rows if r["policy"] == p}
            x = np.arange(len(cats)) + (i - (len(policies) - 1) / 2) * w
            acc = np.array([got[c]["accuracy"] for c in cats])
            err = np.array([[acc[j] - got[c]["ci_low"], got[c]["ci_high"] - acc[j]] for j, c in enumerate(cats)]).T
            ax.bar(x, acc, w, yerr=err, capsize=2, color=COLORS.get(p), label=label(p))
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set(xticks=np.arange(len(cats)), xticklabels=cats, ylim=(0, 1), title=title)
    axes[0].set_ylabel("accuracy (95% interval)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def winrate_figure(rows: list[dict], focus: list[str], judge: str = "the RM"):
    """Win rates of each ``focus`` policy against every other: raw and length-controlled."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(focus), figsize=(5.5 * len(focus), 3.2), squeeze=False)
    for ax, f in zip(axes[0], focus):
        got = focus_rows(rows, f)
        y = np.arange(len(got))
        for off, key, color, name in ((-0.18, "", "tab:blue", "raw"), (0.18, "lc_", "tab:purple", "length-controlled")):
            vals = np.array([r[f"{key}win_rate"] for r in got])
            err = np.array([[v - r[f"{key}ci_low"], r[f"{key}ci_high"] - v] for v, r in zip(vals, got)]).T
            ax.barh(y + off, vals, 0.34, xerr=err, capsize=2, color=color, label=name)
        ax.axvline(0.5, color="k", lw=0.8, ls="--")
        ax.set(yticks=y, yticklabels=[f"vs {label(r['b'])}" for r in got], xlim=(0, 1),
               title=f"{label(f)}, judged by {judge}", xlabel="win rate (ties count half)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def lengths_figure(units: dict):
    """Length of the answers to the open questions, per policy (the RM and judges like length)."""
    import matplotlib.pyplot as plt
    answers = units["answers"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    data = [[r["chars"] for r in rows if r["set"] == "question"] for rows in answers.values()]
    parts = ax.boxplot(data, vert=False, patch_artist=True, tick_labels=[label(p) for p in answers])
    for patch, p in zip(parts["boxes"], answers):
        patch.set_facecolor(COLORS.get(p, "white"))
    ax.set(xlabel="characters of the answer", title="Answer lengths, open questions")
    fig.tight_layout()
    return fig


def truthfulqa_refusals_figure(summary: dict):
    """TruthfulQA MC1 by both protocols (left); refusal rates on harmful and benign requests (right)."""
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, rows, key, groups, value, title in (
            (ax_t, summary["truthfulqa"], "protocol", ("called true", "likelihood"), "accuracy", "TruthfulQA MC1"),
            (ax_r, summary["refusals"], "kind", ("decline", "benign"), "rate", "Refusal rate on the probe")):
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        w = 0.8 / len(policies)
        for i, p in enumerate(policies):
            got = {r[key]: r for r in rows if r["policy"] == p}
            x = np.arange(len(groups)) + (i - (len(policies) - 1) / 2) * w
            v = np.array([got[g][value] for g in groups])
            err = np.array([[v[j] - got[g]["ci_low"], got[g]["ci_high"] - v[j]] for j, g in enumerate(groups)]).T
            ax.bar(x, v, w, yerr=err, capsize=2, color=COLORS.get(p), label=label(p))
        ax.set(xticks=np.arange(len(groups)), xticklabels=groups, ylim=(0, 1), title=title)
    ax_t.axhline(summary["truthfulqa"][0]["chance"], color="k", lw=0.8, ls="--")   # a random choice
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def make_figures(data: dict, folder: str | Path | None = None) -> dict:
    """Every figure of notebook 06, saved as PNG; returns ``{name: path}``."""
    import matplotlib.pyplot as plt
    folder = Path(folder or data["stage_dir"] / "figures")
    s, focus = data["summary"], [p for p in ("ppo", "sft") if p in data["policies"]][:2] or data["policies"][:1]
    figs = {"hhh_by_category": hhh_figure(s), "win_rates": winrate_figure(s["pairwise"]["rm"], focus),
            "answer_lengths": lengths_figure(data["units"]), "truthfulqa_refusals": truthfulqa_refusals_figure(s)}
    paths = {}
    for name, fig in figs.items():
        paths[name] = save_figure(fig, folder / f"{name}.png")
        plt.close(fig)
    return paths
