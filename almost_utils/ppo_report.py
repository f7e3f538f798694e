"""Tables and figures of Step 5 (PPO): the training curves from ``ppo/log.jsonl``, and ALMoST-PPO
against ALMoST-SFT on the held-out queries (``ppo_answers/`` with Step 4's ``sft_answers/``).

How much of the change is length: :func:`almost_utils.answers.matched_length_gain`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .answers import POLICIES
from .artifacts import read_json, read_jsonl, save_figure

COLORS = {"sft": "tab:blue", "ppo": "tab:red", "vanilla": "tab:gray", "sft_norm": "tab:orange"}


def load(run_dir: str | Path) -> dict:
    """``{"log", "answers" (Steps 4 and 5), "summary", "manifest", "run_dir"}`` of a finished run."""
    run_dir = Path(run_dir)
    return {"log": read_jsonl(run_dir / "ppo" / "log.jsonl"),
            "answers": read_jsonl(run_dir / "sft_answers" / "answers.jsonl")
            + read_jsonl(run_dir / "ppo_answers" / "answers.jsonl"),
            "summary": read_json(run_dir / "ppo_answers" / "summary.json"),
            "manifest": read_json(run_dir / "ppo" / "manifest.json"), "run_dir": run_dir}


def curves_figure(log: list[dict]):
    """Per PPO step: RM score (raw, before normalisation), KL to SFT, response length, entropy,
    and where the time of a step goes."""
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.3))
    panels = (("rm_score", "RM score of the rollouts"), ("kl", "KL to SFT (nats / response)"),
              ("response_tokens", "response tokens"), ("entropy", "entropy (nats / token)"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in log], "o-", ms=3, color="tab:red")
        ax.set(xlabel="PPO step", title=title)
    ax = axes[-1]
    bottom = np.zeros(len(log))
    for key, color in (("rollout_s", "tab:blue"), ("scoring_s", "tab:orange"), ("update_s", "tab:green")):
        vals = np.array([r[key] for r in log])
        ax.bar(steps, vals, bottom=bottom, color=color, label=key[:-2])
        bottom += vals
    ax.set(xlabel="PPO step", ylabel="seconds", title="time of a step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def length_figure(answers: list[dict]):
    """RM score against length for the SFT and PPO answers, each with its least-squares line."""
    import matplotlib.pyplot as plt
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for name in ("sft", "ppo"):
        pts = np.array([(r["chars"], r["score"]) for r in answers if r["policy"] == name and r["score"] is not None])
        if len(pts) == 0:
            continue
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.6, color=COLORS[name], label=POLICIES[name])
        if len(np.unique(pts[:, 0])) > 1:
            slope, icpt = np.polyfit(pts[:, 0], pts[:, 1], 1)
            xs = np.linspace(pts[:, 0].min(), pts[:, 0].max(), 10)
            ax.plot(xs, slope * xs + icpt, color=COLORS[name])
        ax_h.hist(pts[:, 0], bins=20, alpha=0.5, color=COLORS[name], label=POLICIES[name])
    ax.set(xlabel="characters", ylabel="RM score", title="Held-out answers: RM score against length")
    ax.legend(fontsize=8)
    ax_h.set(xlabel="characters", ylabel="answers", title="Answer length")
    ax_h.legend(fontsize=8)
    fig.tight_layout()
    return fig


def findings(log: list[dict], summary: dict, gain: dict, kl_limit: float) -> str:
    """Sentences with this run's numbers."""
    first, last = log[0], log[-1]
    lines = [f"- **Training.** {len(log)} PPO steps; rollout RM score {first['rm_score']:+.3f} -> {last['rm_score']:+.3f}, "
             f"KL to SFT {first['kl']:.3f} -> {last['kl']:.3f} nats per response (limit {kl_limit:g}), response "
             f"length {first['response_tokens']:.0f} -> {last['response_tokens']:.0f} tokens, "
             f"{last['ended']:.0%} of the last step's responses ended by themselves."]
    d = summary["differences"].get("ppo - sft")
    if d and d["score"]["mean"] is not None:
        s, c = d["score"], d["chars"]
        verdict = ("higher (the interval excludes 0)" if s["ci_low"] > 0 else
                   "lower (the interval excludes 0)" if s["ci_high"] < 0 else "not clearly different (the interval includes 0)")
        lines.append(f"- **Held-out queries.** ALMoST-PPO's answers score {s['mean']:+.3f} [{s['ci_low']:+.3f}, "
                     f"{s['ci_high']:+.3f}] against ALMoST-SFT's: {verdict}; length changes by {c['mean']:+.0f} characters "
                     f"[{c['ci_low']:+.0f}, {c['ci_high']:+.0f}].")
    if "total" in gain:
        e, t = gain["at_equal_length"], gain["through_length"]
        lines.append(f"- **Through length or not.** Of the change, {t['mean']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] "
                     f"is what the length change predicts (the RM's fitted slope), and {e['mean']:+.3f} "
                     f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] remains at equal length.")
    return "\n".join(lines)


def make_figures(data: dict) -> dict:
    figs = {"ppo_curves": curves_figure(data["log"]), "ppo_length": length_figure(data["answers"])}
    for name, fig in figs.items():
        save_figure(fig, Path(data["run_dir"]) / "ppo" / "figures" / f"{name}.png")
    return figs
