"""Tables and figures of Step 3 (RM-guided self-play), computed from the stored candidates.

Every number here comes from ``results/<run>/rmsp/candidates.jsonl``: each assistant turn kept
all N candidates with their RM scores and lengths, so other choices (fewer candidates, a random
or the longest candidate) are evaluated without sampling again.

**Best of k from N stored candidates.** For one turn with N scored candidates, the RM's pick
among a random k-subset is the subset's highest-scored candidate. Its expected score (or its
length) is exact, not simulated: sort the candidates by score; the i-th lowest (1-based) is the
subset's best with probability C(i-1, k-1) / C(N, k). k = 1 is the mean candidate (no RM); k =
N is what the stage kept.
"""
from __future__ import annotations

from math import comb
from pathlib import Path

import numpy as np

from .artifacts import read_json, read_jsonl, save_figure

PICKER_LABELS = {"rm": "RM's best (ALMoST)", "random": "random (N = 1, no RM)", "longest": "longest"}
PICKER_COLORS = {"rm": "tab:blue", "random": "tab:gray", "longest": "tab:green"}


def load(run_dir: str | Path) -> dict:
    """``{"candidates", "dialogues", "manifest", "stage_dir"}`` of a finished RMSP stage."""
    stage = Path(run_dir) / "rmsp"
    return {"candidates": read_jsonl(stage / "candidates.jsonl"), "dialogues": read_jsonl(stage / "dialogues.jsonl"),
            "manifest": read_json(stage / "manifest.json"), "stage_dir": stage}


# --------------------------------------------------------------------------- best of k
def best_of_k_weights(n: int, k: int) -> np.ndarray:
    """P(the i-th lowest of n values is the maximum of a random k-subset), i = 1..n.

    >>> best_of_k_weights(4, 4).tolist()
    [0.0, 0.0, 0.0, 1.0]
    >>> best_of_k_weights(3, 1).round(3).tolist()
    [0.333, 0.333, 0.333]
    """
    k = min(k, n)
    return np.array([comb(i - 1, k - 1) / comb(n, k) for i in range(1, n + 1)])


def best_of_k(candidates: list[dict], k: int, key: str = "score", by: str = "score") -> float | None:
    """Expected ``key`` of the candidate with the highest ``by`` in a random k-subset of the
    non-empty candidates (ties broken by position, as the pickers do); ``None`` if none is scored."""
    eligible = [(c[by], -i, c[key]) for i, c in enumerate(candidates) if c["text"] and c[by] is not None]
    if not eligible:
        return None
    eligible.sort()
    values = np.array([v for _, _, v in eligible], dtype=float)
    return float(best_of_k_weights(len(values), k) @ values)


def best_of_n_curve(records: list[dict], turn: int = 0, n_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Per k = 1..N on one assistant turn: the mean over dialogues of the RM-best candidate's score
    and length among k, and of the longest candidate's score among k, with cluster-bootstrap
    intervals (a dialogue's turn is one cluster)::

        [{"k": 1, "rm_score": 0.02, "rm_score_low": ..., "rm_score_high": ..., "rm_chars": 260.1,
          "longest_score": 0.02, "longest_chars": 260.1, "dialogues": 48}, ...]
    """
    from .rm_eval import bootstrap_ci
    recs = [r for r in records if r["turn"] == turn and any(c["score"] is not None for c in r["candidates"])]
    if not recs:
        return []
    n = max(len(r["candidates"]) for r in recs)
    out = []
    for k in range(1, n + 1):
        row: dict = {"k": k, "dialogues": len(recs)}
        for name, key, by in (("rm_score", "score", "score"), ("rm_chars", "chars", "score"),
                              ("longest_score", "score", "chars"), ("longest_chars", "chars", "chars")):
            cands = [[c for c in r["candidates"] if c["score"] is not None] for r in recs]
            vals = np.array([best_of_k(c, k, key, by) for c in cands], dtype=float)
            row[name] = float(vals.mean())
            if name in ("rm_score", "longest_score"):
                row[f"{name}_low"], row[f"{name}_high"] = bootstrap_ci(vals, n_samples, seed)
        out.append(row)
    return out


# --------------------------------------------------------------------------- pickers
def picker_table(records: list[dict], n_samples: int = 1000, seed: int = 0):
    """First assistant turn: mean RM score and length of each picker's choice (95% bootstrap over
    dialogues), and how often it is the RM's own pick."""
    import pandas as pd
    from .rm_eval import bootstrap_ci
    first = [r for r in records if r["turn"] == 0 and r["picks"].get("rm") is not None]
    rows = []
    for p in ("rm", "random", "longest"):
        chosen = [(r, r["candidates"][r["picks"][p]]) for r in first if r["picks"].get(p) is not None]
        scores = np.array([c["score"] for _, c in chosen], dtype=float)
        chars = np.array([c["chars"] for _, c in chosen], dtype=float)
        s_lo, s_hi = bootstrap_ci(scores, n_samples, seed)
        c_lo, c_hi = bootstrap_ci(chars, n_samples, seed)
        same = np.mean([r["picks"][p] == r["picks"]["rm"] for r, _ in chosen])
        rows.append({"picker": PICKER_LABELS[p], "turns": len(chosen),
                     "mean RM score": f"{scores.mean():+.3f} [{s_lo:+.3f}, {s_hi:+.3f}]",
                     "mean characters": f"{chars.mean():.0f} [{c_lo:.0f}, {c_hi:.0f}]",
                     "same as the RM's pick": f"{same:.0%}"})
    return pd.DataFrame(rows).set_index("picker")


def length_rank_of_rm_pick(records: list[dict]) -> dict[int, int]:
    """``{rank: turns}``: where the RM's pick stands by length among its turn's non-empty
    candidates (1 = longest). With no length preference every rank is equally likely."""
    out: dict[int, int] = {}
    for r in records:
        k = r["picks"].get("rm")
        if k is None:
            continue
        longer = sum(1 for c in r["candidates"] if c["text"] and c["chars"] > r["candidates"][k]["chars"])
        out[longer + 1] = out.get(longer + 1, 0) + 1
    return dict(sorted(out.items()))


def score_length_correlation(records: list[dict]) -> float:
    """Mean over turns of the rank correlation between candidates' RM scores and lengths: how much
    the RM's ordering *within* a turn follows length (1: exactly; 0: not at all)."""
    import pandas as pd
    rhos = []
    for r in records:
        c = [c for c in r["candidates"] if c["score"] is not None]
        if len(c) >= 3 and len({x["chars"] for x in c}) > 1 and len({x["score"] for x in c}) > 1:
            ranks = pd.DataFrame({"score": [x["score"] for x in c], "chars": [x["chars"] for x in c]}).rank()
            rhos.append(float(np.corrcoef(ranks["score"], ranks["chars"])[0, 1]))   # Spearman's rho
    return float(np.mean(rhos)) if rhos else float("nan")


# --------------------------------------------------------------------------- dialogues
def dialogue_table(data: dict):
    """How the dialogues ended and how long their turns are."""
    import pandas as pd
    dialogues, man = data["dialogues"], data["manifest"]
    human = [len(t) for d in dialogues for role, t in d["turns"] if role == "Human"]
    assistant = [len(t) for d in dialogues for role, t in d["turns"] if role == "Assistant"]
    rows = {"dialogues played": man["counts"]["dialogues"], "demonstrations kept": len(dialogues),
            **{f"with {k} assistant turn(s)": v for k, v in sorted(man["counts"]["assistant_turns"].items())},
            **{f"ended: {k}": v for k, v in man["counts"]["ends"].items()},
            "mean characters, human turn": round(float(np.mean(human)), 1) if human else None,
            "mean characters, assistant turn": round(float(np.mean(assistant)), 1) if assistant else None,
            "empty candidates": f"{man['counts']['empty_candidates']} of {man['counts']['candidates']}"}
    return pd.DataFrame({"value": rows})


def timing_table(data: dict, engine_benchmark: dict | None = None):
    """Seconds of the stage's parts and its sampling rates; with ``engine_benchmark`` (the JSON of
    ``benchmarks/bench_sampling.py``) also the engine's rate measured there, Step 1's setting."""
    import pandas as pd
    man = data["manifest"]
    t, c = man["timings_s"], man["counts"]
    rows = [{"part": f"{k.replace('_all_sessions', '')} (s)", "value": round(v, 1)} for k, v in t.items()]
    rows.append({"part": "assistant tokens/s (RMSP)", "value": c["tokens_per_s"]["assistant"]})
    rows.append({"part": "user tokens/s (RMSP)", "value": c["tokens_per_s"]["user"]})
    rows.append({"part": "candidates scored/s (RMSP)", "value": c["candidates_scored_per_s"]})
    if engine_benchmark is not None:
        b = engine_benchmark
        rows.append({"part": f"engine benchmark tokens/s (Step 1's setting: {b['prefix_tokens']}-token prefix, "
                             f"batch {b['batch_size']}, {b['new_tokens']} tokens)",
                     "value": round(b["results"]["c"]["tokens_per_s"], 1)})
    return pd.DataFrame(rows).set_index("part")


def walkthrough_table(record: dict):
    """The N candidates of one assistant turn: RM score, length, which pickers took it."""
    import pandas as pd
    rows = []
    for i, c in enumerate(record["candidates"]):
        took = [PICKER_LABELS[p].split(" (")[0] for p, k in record["picks"].items() if k == i]
        rows.append({"candidate": i, "RM score": None if c["score"] is None else round(c["score"], 3),
                     "characters": c["chars"], "picked by": ", ".join(took),
                     "text": c["text"][:300] + ("..." if len(c["text"]) > 300 else "")})
    return pd.DataFrame(rows).set_index("candidate")


def findings(data: dict, curve: list[dict]) -> str:
    """A few sentences with this run's numbers: best-of-N gain, its length, picker agreement."""
    first = data["manifest"]["counts"]["first_turn"]
    n = curve[-1]["k"] if curve else 0
    lines = [f"- **{len(data['dialogues'])} demonstrations** from {data['manifest']['counts']['dialogues']} "
             f"self-played dialogues, {sum(d['assistant_turns'] for d in data['dialogues'])} assistant turns kept."]
    if curve:
        one, best = curve[0], curve[-1]
        lines.append(
            f"- **Best of {n}** (first turn): the kept candidate scores {best['rm_score']:+.3f} "
            f"[{best['rm_score_low']:+.3f}, {best['rm_score_high']:+.3f}] against {one['rm_score']:+.3f} for a "
            f"random candidate; it is {best['rm_chars']:.0f} characters long on average against "
            f"{one['rm_chars']:.0f} ({best['rm_chars'] / one['rm_chars'] - 1:+.0%}).")
        lines.append(
            f"- **The longest of {n}** scores {best['longest_score']:+.3f} "
            f"[{best['longest_score_low']:+.3f}, {best['longest_score_high']:+.3f}] with the RM: "
            + ("most of the RM's gain over a random candidate is reached by length alone."
               if best["longest_score"] - one["rm_score"] >= 0.5 * (best["rm_score"] - one["rm_score"])
               else "length alone reaches less than half of the RM's gain over a random candidate."))
    if first.get("rm_pick_is_longest") is not None:
        lines.append(f"- **The RM's pick is the longest candidate in {first['rm_pick_is_longest']:.0%}** of first "
                     f"turns (about {1 / max(n, 1):.0%} if the RM ignored length); it equals the random "
                     f"pick in {first['rm_pick_is_random']:.0%}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def best_of_n_figure(curve: list[dict]):
    """Left: RM score of the RM's best of k and of the longest of k, k = 1..N (k = 1: the mean
    candidate). Right: the length of the RM's best of k: how much of the gain comes with length."""
    import matplotlib.pyplot as plt
    fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = [r["k"] for r in curve]
    for name, label, color in (("rm_score", PICKER_LABELS["rm"], PICKER_COLORS["rm"]),
                               ("longest_score", "longest of k", PICKER_COLORS["longest"])):
        ax_s.plot(ks, [r[name] for r in curve], "o-", color=color, label=label)
        ax_s.fill_between(ks, [r[f"{name}_low"] for r in curve], [r[f"{name}_high"] for r in curve],
                          color=color, alpha=0.15)
    ax_s.set(xlabel="k candidates (k = 1: one random candidate)", ylabel="RM score of the pick", xticks=ks,
             title=f"Best of k, first assistant turn ({curve[0]['dialogues']} dialogues)")
    ax_s.legend(fontsize=8)
    ax_c.plot(ks, [r["rm_chars"] for r in curve], "o-", color=PICKER_COLORS["rm"], label=PICKER_LABELS["rm"])
    ax_c.plot(ks, [r["longest_chars"] for r in curve], "o--", color=PICKER_COLORS["longest"], label="longest of k")
    ax_c.set(xlabel="k candidates", ylabel="characters of the pick", xticks=ks, title="Length of the pick")
    ax_c.legend(fontsize=8)
    fig.tight_layout()
    return fig


def candidates_figure(records: list[dict]):
    """Every first-turn candidate: RM score against length, the RM's picks marked; and where the
    RM's pick ranks by length among its turn's candidates."""
    import matplotlib.pyplot as plt
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    first = [r for r in records if r["turn"] == 0]
    pts = [(c["chars"], c["score"], r["picks"].get("rm") == i) for r in first
           for i, c in enumerate(r["candidates"]) if c["score"] is not None]
    ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], s=10, color="lightgray",
               label="not kept")
    ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], s=14, color=PICKER_COLORS["rm"],
               label="kept (RM's best)")
    ax.set(xlabel="characters", ylabel="RM score", title="First-turn candidates")
    ax.legend(fontsize=8)
    ranks = length_rank_of_rm_pick(first)
    n = max(len(r["candidates"]) for r in first) if first else 1
    ax_r.bar(list(ranks), list(ranks.values()), color=PICKER_COLORS["rm"])
    ax_r.axhline(sum(ranks.values()) / n, color="k", ls=":", lw=1, label="no length preference")
    ax_r.set(xlabel="length rank of the RM's pick (1 = longest)", ylabel="turns", xticks=list(range(1, n + 1)),
             title="Is the RM's pick the longest?")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def dialogue_lengths_figure(dialogues: list[dict]):
    """Characters per assistant turn, by turn index, and the number of assistant turns."""
    import matplotlib.pyplot as plt
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.4))
    by_turn: dict[int, list[int]] = {}
    for d in dialogues:
        for j, t in enumerate([t for role, t in d["turns"] if role == "Assistant"]):
            by_turn.setdefault(j, []).append(len(t))
    ax.hist([by_turn[j] for j in sorted(by_turn)], bins=20, label=[f"assistant turn {j + 1}" for j in sorted(by_turn)])
    ax.set(xlabel="characters", ylabel="turns", title="Length of the kept assistant turns")
    ax.legend(fontsize=8)
    counts: dict[int, int] = {}
    for d in dialogues:
        counts[d["assistant_turns"]] = counts.get(d["assistant_turns"], 0) + 1
    ax_t.bar(list(counts), list(counts.values()), color="tab:blue")
    ax_t.set(xlabel="assistant turns in the dialogue", ylabel="dialogues", xticks=sorted(counts),
             title="Dialogue length")
    fig.tight_layout()
    return fig


def make_figures(data: dict) -> dict:
    """Draw the stage's figures and save them under ``rmsp/figures/``; returns ``{name: figure}``."""
    figs = {"best_of_n": best_of_n_figure(best_of_n_curve(data["candidates"])),
            "candidates": candidates_figure(data["candidates"]),
            "dialogue_lengths": dialogue_lengths_figure(data["dialogues"])}
    for name, fig in figs.items():
        save_figure(fig, Path(data["stage_dir"]) / "figures" / f"{name}.png")
    return figs
