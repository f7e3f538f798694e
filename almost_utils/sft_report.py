"""Tables and figures of Step 4 (SFT), from the stage folders ``sft/``, ``sft_norm/`` and
``sft_answers/`` of a run (see :mod:`almost_utils.sft` and :mod:`almost_utils.answers`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .answers import POLICIES
from .artifacts import read_json, read_jsonl, save_figure

COLORS = {"vanilla": "tab:gray", "sft_norm": "tab:orange", "sft": "tab:blue"}


def load(run_dir: str | Path) -> dict:
    """``{"training": {variant: load_training(...)}, "answers", "summary", "manifests", "run_dir"}``."""
    from .sft import load_training
    run_dir = Path(run_dir)
    return {"training": {v: load_training(run_dir, v) for v in ("sft", "sft_norm")},
            "answers": read_jsonl(run_dir / "sft_answers" / "answers.jsonl"),
            "summary": read_json(run_dir / "sft_answers" / "summary.json"),
            "manifests": {s: read_json(run_dir / s / "manifest.json") for s in ("sft", "sft_norm", "sft_answers")},
            "run_dir": run_dir}


def training_table(data: dict):
    """What each variant trained on and how the loss moved."""
    import pandas as pd
    keys = ("dialogues", "kept", "truncated", "cut", "dropped", "tokens", "assistant_tokens", "optimizer_steps",
            "first_loss", "final_loss", "tokens_per_s", "train_runtime_s")
    return pd.DataFrame({POLICIES[v]: {k: t["summary"].get(k) for k in keys}
                         for v, t in data["training"].items()})


def loss_figure(data: dict):
    """Training loss (assistant tokens only) per optimizer step of both variants."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for v, t in data["training"].items():
        curve = [r for r in t["loss_curve"] if r["loss"] is not None]
        ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], "o-", ms=3, color=COLORS[v],
                label=f"{POLICIES[v]} ({t['summary']['dialogues']} dialogues)")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per answer token)", title="SFT training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _ci(m: dict, fmt: str) -> str:
    return f"{m['mean']:{fmt}} [{m['ci_low']:{fmt}}, {m['ci_high']:{fmt}}]" if m["mean"] is not None else "-"


def answers_table(summary: dict):
    """Mean RM score, characters and tokens of each policy's held-out answers (95% cluster
    bootstrap over queries), and the share that ended before the token cap."""
    import pandas as pd
    rows = {}
    for name in POLICIES:
        e = summary["policies"].get(name)
        if e is None:
            continue
        rows[POLICIES[name]] = {"answers": e["n"], "queries": e["clusters"], "mean RM score": _ci(e["score"], "+.3f"),
                                "mean characters": _ci(e["chars"], ".0f"), "mean tokens": _ci(e["tokens"], ".1f"),
                                "ended before the cap": f"{e['ended']['mean']:.0%}", "empty": e["empty"]}
    return pd.DataFrame(rows).T


def differences_table(summary: dict):
    """Paired differences (same query and sample) of mean RM score and characters."""
    import pandas as pd
    rows = {}
    for key, d in summary["differences"].items():
        a, b = key.split(" - ")
        rows[f"{POLICIES[a]} - {POLICIES[b]}"] = {"RM score": _ci(d["score"], "+.3f"),
                                                 "characters": _ci(d["chars"], "+.0f"), "pairs": d["score"]["n"]}
    return pd.DataFrame(rows).T


def gain_table(gain: dict, label: str):
    """:func:`almost_utils.answers.matched_length_gain` as a table; ``label`` names the change."""
    import pandas as pd
    if "total" not in gain:
        return pd.DataFrame({"value": {"pairs": gain["pairs"]}})
    fmt = lambda d: f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"  # noqa: E731
    return pd.DataFrame({f"RM score change, {label}": {
        "total": fmt(gain["total"]), "at equal length": fmt(gain["at_equal_length"]),
        "explained by length": fmt(gain["through_length"]),
        "RM score per 100 characters (fitted slope)": f"{gain['slope_per_100_chars']:+.3f}",
        "paired answers / queries": f"{gain['pairs']} / {gain['queries']}"}})


def side_by_side(answers: list[dict], k: int = 3, sample: int = 0, width: int = 400) -> str:
    """Markdown: the first ``k`` held-out queries with every policy's answer and its RM score."""
    by_q: dict[int, dict] = {}
    for r in answers:
        if r["sample"] == sample:
            by_q.setdefault(r["query_id"], {})[r["policy"]] = r
    parts = []
    for qid in sorted(by_q)[:k]:
        got = by_q[qid]
        query = next(iter(got.values()))["query"]
        parts.append(f"**Query {qid}:** {query}\n")
        for name in POLICIES:
            if name in got:
                r = got[name]
                text = r["answer"] if len(r["answer"]) <= width else r["answer"][:width] + " ..."
                score = "empty" if r["score"] is None else f"RM {r['score']:+.2f}"
                parts.append(f"- *{POLICIES[name]}* ({score}, {r['chars']} chars): {text or '(nothing)'}")
        parts.append("")
    return "\n".join(parts)


def findings(summary: dict) -> str:
    """Sentences with this run's numbers: each comparison's score and length differences, and
    whether the interval excludes zero."""
    def verdict(d):
        if d["ci_low"] > 0:
            return "higher (the interval excludes 0)"
        if d["ci_high"] < 0:
            return "lower (the interval excludes 0)"
        return "no clear difference (the interval includes 0)"
    lines = []
    for key, d in summary["differences"].items():
        a, b = key.split(" - ")
        s, c = d["score"], d["chars"]
        if s["mean"] is None:
            continue
        lines.append(f"- **{POLICIES[a]} vs {POLICIES[b]}:** RM score {s['mean']:+.3f} "
                     f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]: {verdict(s)}; length {c['mean']:+.0f} characters "
                     f"[{c['ci_low']:+.0f}, {c['ci_high']:+.0f}].")
    p = summary["policies"]
    if "sft" in p and "vanilla" in p:
        lines.append(f"- Answers that end by themselves before the token cap: vanilla {p['vanilla']['ended']['mean']:.0%}, "
                     + ", ".join(f"{POLICIES[n]} {p[n]['ended']['mean']:.0%}" for n in ("sft_norm", "sft") if n in p)
                     + ".")
    return "\n".join(lines)


def answers_figure(answers: list[dict], summary: dict):
    """Left: mean RM score per policy with 95% intervals. Right: RM score against length of every
    answer, with each policy's least-squares line: a policy that gains score only by writing more
    moves along the lines, not above them."""
    import matplotlib.pyplot as plt
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [2, 3]})
    names = [n for n in POLICIES if n in summary["policies"]]
    for i, n in enumerate(names):
        m = summary["policies"][n]["score"]
        ax.bar(i, m["mean"], color=COLORS[n])
        ax.errorbar(i, m["mean"], yerr=[[m["mean"] - m["ci_low"]], [m["ci_high"] - m["mean"]]], color="k", capsize=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([POLICIES[n].replace(", ", ",\n") for n in names], fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="mean RM score", title="Held-out answers (95% CI, by query)")
    for n in names:
        pts = np.array([(r["chars"], r["score"]) for r in answers if r["policy"] == n and r["score"] is not None])
        if len(pts) == 0:
            continue
        ax_s.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.5, color=COLORS[n], label=POLICIES[n])
        if len(np.unique(pts[:, 0])) > 1:
            slope, icpt = np.polyfit(pts[:, 0], pts[:, 1], 1)
            xs = np.linspace(pts[:, 0].min(), pts[:, 0].max(), 10)
            ax_s.plot(xs, slope * xs + icpt, color=COLORS[n], lw=1.5)
    ax_s.set(xlabel="characters", ylabel="RM score", title="RM score against length")
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    return fig


def make_figures(data: dict) -> dict:
    """Draw the step's figures and save them under ``sft_answers/figures/``; returns ``{name: figure}``."""
    figs = {"sft_loss": loss_figure(data), "heldout_answers": answers_figure(data["answers"], data["summary"])}
    for name, fig in figs.items():
        save_figure(fig, Path(data["run_dir"]) / "sft_answers" / "figures" / f"{name}.png")
    return figs
