"""Figures of the reward-model stage; each function returns a matplotlib figure.

:func:`make_figures` draws all of them from what ``reward_stage.load_results`` reads back and
saves them to the stage's ``figures/`` folder (PNG, atomically). This module never imports
``reward_stage``: the stage imports us, and the data comes in as an argument.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .rm_eval import pair_correct

SCORER_LABELS = {"rm": "RM (HF pairs)", "rm_no_hf": "RM (no HF)", "untrained": "untrained head",
                 "longer": "longer response", "random": "random"}
SCORER_COLORS = {"rm": "tab:blue", "rm_no_hf": "tab:orange", "untrained": "tab:gray", "longer": "tab:green",
                 "random": "lightgray"}
BENCH_LABELS = {"heldout": "held-out synthetic (HF)", "heldout_no_hf": "held-out synthetic (all)",
                "hhh": "BIG-bench HHH"}
# titles of the accuracy figures, shared by make_figures and notebook 02
TITLES = {"hhh": "BIG-bench HHH: pair accuracy per category\n(95% cluster bootstrap by conversation)",
          "heldout": "Held-out synthetic pairs: pair accuracy\n(95% cluster bootstrap by query)"}


def _ema(x, alpha: float = 0.3) -> np.ndarray:
    out, m = [], None
    for v in x:
        m = v if m is None else alpha * v + (1 - alpha) * m
        out.append(m)
    return np.asarray(out)


def training_curves(training_log: dict[str, list[dict]], final_heldout: dict[str, float] | None = None):
    """Bradley-Terry loss and pair accuracy over optimizer steps (training batches and held-out).

    ``final_heldout`` (``{variant: accuracy}``) adds the trained RM's held-out accuracy as a star
    at its last step, so the curve has a held-out end point even without evaluations in between.
    """
    import matplotlib.pyplot as plt
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
    for v, rows in training_log.items():
        color = SCORER_COLORS.get(v)
        tr = [r for r in rows if "loss" in r and "step" in r]
        ev = [r for r in rows if "eval_loss" in r]
        if tr:
            steps = [r["step"] for r in tr]
            loss = [r["loss"] for r in tr]
            ax_l.plot(steps, loss, color=color, alpha=0.25, lw=1)
            ax_l.plot(steps, _ema(loss), color=color, lw=2, label=f"{SCORER_LABELS.get(v, v)} train")
            accs = [r["accuracy"] for r in tr if "accuracy" in r]
            ax_a.plot(steps[:len(accs)], _ema(accs), color=color, lw=2, label=f"{SCORER_LABELS.get(v, v)} train (EMA)")
        if ev:
            ax_l.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--", color=color,
                      label=f"{SCORER_LABELS.get(v, v)} held-out")
            ax_a.plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o--", color=color,
                      label=f"{SCORER_LABELS.get(v, v)} held-out")
        if final_heldout and v in final_heldout and tr:
            ax_a.plot([tr[-1]["step"]], [final_heldout[v]], "*", ms=12, color=color,
                      label=f"{SCORER_LABELS.get(v, v)} held-out, final")
    ax_l.axhline(np.log(2), color="k", ls=":", lw=1, label="chance (log 2)")
    ax_a.axhline(0.5, color="k", ls=":", lw=1)
    ax_l.set(xlabel="optimizer step", ylabel="-log sigmoid(r_chosen - r_rejected)", title="Bradley-Terry loss")
    ax_a.set(xlabel="optimizer step", ylabel="pairs ranked right", title="Pair accuracy", ylim=(0, 1.02))
    ax_l.legend(fontsize=7)
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reward_distributions(heldout_scores: list[dict], hhh_scores: list[dict], scorer: str = "rm"):
    """Histograms of the RM's rewards for chosen vs rejected responses, held-out synthetic and HHH."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = [("held-out synthetic pairs (HF)", [r for r in heldout_scores if r.get("hf", True)]),
              ("BIG-bench HHH", hhh_scores)]
    for ax, (title, rows) in zip(axes, panels):
        if not rows:
            ax.set_axis_off()
            continue
        c = np.array([r[f"{scorer}_chosen"] for r in rows])
        rj = np.array([r[f"{scorer}_rejected"] for r in rows])
        bins = np.linspace(min(c.min(), rj.min()), max(c.max(), rj.max()) + 1e-9, 25)
        ax.hist(c, bins=bins, alpha=0.55, color="tab:blue", label=f"chosen (mean {c.mean():.2f})")
        ax.hist(rj, bins=bins, alpha=0.55, color="tab:red", label=f"rejected (mean {rj.mean():.2f})")
        ax.set(title=f"{title}: {pair_correct(c, rj).mean():.0%} ranked right (n={len(rows)})", xlabel="reward",
               ylabel="responses")
        ax.legend(fontsize=8)
    fig.suptitle(f"Rewards of {SCORER_LABELS.get(scorer, scorer)}", y=1.02)
    fig.tight_layout()
    return fig


def accuracy_bars(accuracy: list[dict], benchmarks=("hhh",),
                  scorers=("rm", "rm_no_hf", "untrained", "longer", "random"), title: str | None = None):
    """Grouped bars: accuracy per (benchmark, subset) for each scorer, with 95% cluster-bootstrap intervals."""
    import matplotlib.pyplot as plt
    groups = []
    for b in benchmarks:
        subs = [a["subset"] for a in accuracy if a["benchmark"] == b and a["scorer"] == "longer"]
        groups += [(b, s) for s in subs]
    scorers = [s for s in scorers if any(a["scorer"] == s for a in accuracy)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(scorers))
    index = {(a["benchmark"], a["subset"], a["scorer"]): a for a in accuracy}
    for j, s in enumerate(scorers):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            a = index.get((*g, s))
            if a is None:
                continue
            xs.append(i + (j - (len(scorers) - 1) / 2) * width)
            ys.append(a["accuracy"])
            lo.append(a["accuracy"] - a["ci_low"])
            hi.append(a["ci_high"] - a["accuracy"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=SCORER_COLORS.get(s), label=SCORER_LABELS.get(s, s),
               error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
    def size(g):         # pairs, and the clusters the interval resampled (rows of older runs lack them)
        a = index[(*g, "longer")]
        k = a.get("clusters")
        return f"n={a['n']}" + ("" if k is None else f", {k} cluster" + "s" * (k != 1))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([(f"{BENCH_LABELS.get(b, b)}\n" if len(benchmarks) > 1 else "") + f"{s}\n({size((b, s))})"
                        for b, s in groups], fontsize=8)
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(ylabel="pairs ranked right", ylim=(0, 1), title=title or "Pair accuracy (95% cluster-bootstrap intervals)")
    label_lines = 3 if len(benchmarks) > 1 else 2           # keep the legend below the tick labels
    ax.legend(fontsize=8, ncol=min(5, len(scorers)), loc="upper center",
              bbox_to_anchor=(0.5, -0.06 - 0.07 * label_lines))
    fig.tight_layout()
    return fig


def final_heldout(metrics: dict) -> dict[str, float]:
    """``{variant: accuracy}`` of each trained RM on the held-out synthetic pairs kept by the filter."""
    return {a["scorer"]: a["accuracy"] for a in metrics["accuracy"]
            if a["benchmark"] == "heldout" and a["subset"] == "all" and a["scorer"] in metrics["training"]}


def make_figures(results: dict) -> dict:
    """Draw every figure of the stage and save it under ``results["stage_dir"]/figures``.

    ``results`` is what ``reward_stage.load_results`` returns; returns ``{name: figure}``.
    """
    from .artifacts import save_figure
    missing = [k for k in ("metrics", "training_log", "heldout_scores", "hhh_scores", "stage_dir") if k not in results]
    if missing:
        raise KeyError(f"make_figures: results lack {missing} (pass reward_stage.load_results(...))")
    acc = results["metrics"]["accuracy"]
    figs = {
        "training_curves": training_curves(results["training_log"], final_heldout(results["metrics"])),
        "reward_distributions": reward_distributions(results["heldout_scores"], results["hhh_scores"]),
        "hhh_accuracy": accuracy_bars(acc, ("hhh",), title=TITLES["hhh"]),
        "heldout_accuracy": accuracy_bars(acc, ("heldout", "heldout_no_hf"), title=TITLES["heldout"]),
    }
    for name, fig in figs.items():
        save_figure(fig, Path(results["stage_dir"]) / "figures" / f"{name}.png")
    return figs
