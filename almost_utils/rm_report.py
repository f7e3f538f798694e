"""Tables and sentences for notebook 02, computed from ``metrics.json`` (never typed in by hand).

Every function takes the stage's metrics (see :mod:`almost_utils.reward_stage`) and returns a
pandas DataFrame or a Markdown string. Intervals are 95% cluster-bootstrap ones (by conversation
for HHH, by query for the held-out synthetic pairs), so the text names the number of clusters.
"""
from __future__ import annotations

from .rm_figures import BENCH_LABELS, SCORER_LABELS

PAPER = {  # docs/method.md, Step 2
    "backbone": "LLaMA-7B (policy family)", "tuning": "full fine-tuning", "learning_rate": 2e-5,
    "weight_decay": 0.1, "epochs": 1, "pairs_per_step": 128, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
    "max_length": 1024, "precision": "bf16"}


def _fmt(a: dict) -> str:
    return f"{a['accuracy']:.0%} [{a['ci_low']:.0%}, {a['ci_high']:.0%}]"


def _size(a: dict, unit: str) -> str:
    """``221 pairs from 102 conversations``: the clusters are what the interval resampled."""
    k = a.get("clusters")
    return f"{a['n']} pairs" + (f" from {k} {unit}" if k is not None else "")


def settings_table(cfg):
    """The paper's RM settings next to this run's."""
    import pandas as pd
    rm = cfg.reward_model
    spec = cfg.models[rm.model]
    lora = f"LoRA r={rm.lora_r}, alpha={rm.lora_alpha} on " + (
        f"the top {rm.lora_layers} layers" if rm.lora_layers else "every layer") + ", head trained fully"
    ours = {"backbone": f"{spec.source}" + (" (NF4, QLoRA)" if spec.load_in_4bit else ""), "tuning": lora,
            "learning_rate": rm.learning_rate, "weight_decay": rm.weight_decay, "epochs": rm.epochs,
            "pairs_per_step": rm.batch_size * rm.grad_accum, "lr_scheduler": rm.lr_scheduler,
            "warmup_ratio": rm.warmup_ratio, "max_length": rm.max_length,
            "precision": "fp32" if cfg.device == "cpu" else "bf16 compute"}
    return pd.DataFrame({"paper": PAPER, "this run": ours}).astype(str)


def accuracy_table(metrics: dict, benchmark: str):
    """Rows: subsets (``all`` first); columns: scorers; cells: ``62% [50%, 74%]``."""
    import pandas as pd
    rows = [a for a in metrics["accuracy"] if a["benchmark"] == benchmark]
    subsets = list(dict.fromkeys(a["subset"] for a in rows))
    scorers = [s for s in SCORER_LABELS if any(a["scorer"] == s for a in rows)]
    index = {(a["subset"], a["scorer"]): a for a in rows}
    table = pd.DataFrame([{SCORER_LABELS[s]: _fmt(index[(sub, s)]) for s in scorers if (sub, s) in index}
                          for sub in subsets], index=[_index_label(s, index[(s, "longer")]) for s in subsets])
    table.index.name = BENCH_LABELS.get(benchmark, benchmark)
    return table


def _index_label(subset: str, a: dict) -> str:
    k = a.get("clusters")
    return f"{subset} (n={a['n']}" + (")" if k is None else f", {k} cluster" + "s" * (k != 1) + ")")


def ablation_table(metrics: dict):
    """One row per RM variant: training pairs and accuracy on every benchmark."""
    import pandas as pd
    out = []
    for row in metrics["ablation"]["table"]:
        r = {"reward model": SCORER_LABELS.get(row["variant"], row["variant"]), "training pairs": row["train_pairs"]}
        for b in ("heldout", "heldout_no_hf", "hhh"):
            if b in row:
                r[BENCH_LABELS[b]] = _fmt(row[b])
        out.append(r)
    return pd.DataFrame(out).set_index("reward model")


def _get(metrics, benchmark, subset, scorer):
    return next((a for a in metrics["accuracy"]
                 if a["benchmark"] == benchmark and a["subset"] == subset and a["scorer"] == scorer), None)


def _vs_chance(a: dict) -> str:
    if a["ci_low"] > 0.5:
        return "above chance"
    if a["ci_high"] < 0.5:
        return "below chance"
    return "not distinguishable from chance"


def _diff(d: dict) -> str:
    return f"{d['difference']:+.1%} [{d['ci_low']:+.1%}, {d['ci_high']:+.1%}]"


def _verdict(d: dict, other: str) -> str:
    if d["ci_low"] > 0:
        return f"the RM is **better** than {other}"
    if d["ci_high"] < 0:
        return f"the RM is **worse** than {other}"
    return f"no detectable difference from {other}"


def findings(metrics: dict) -> str:
    """What the numbers say, as Markdown bullet points."""
    lines = []
    held, hhh = _get(metrics, "heldout", "all", "rm"), _get(metrics, "hhh", "all", "rm")
    if held:
        lines.append(f"- **Held-out synthetic pairs:** the RM ranks {_fmt(held)} of {_size(held, 'queries')} right "
                     f"({_vs_chance(held)}); the longer-response rule gets "
                     f"{_fmt(_get(metrics, 'heldout', 'all', 'longer'))}, the untrained head "
                     f"{_fmt(_get(metrics, 'heldout', 'all', 'untrained'))}.")
    if hhh:
        lines.append(f"- **BIG-bench HHH (human labels):** the RM ranks {_fmt(hhh)} of "
                     f"{_size(hhh, 'conversations')} right ({_vs_chance(hhh)}); "
                     f"longer response {_fmt(_get(metrics, 'hhh', 'all', 'longer'))}, "
                     f"untrained head {_fmt(_get(metrics, 'hhh', 'all', 'untrained'))}.")
        for c, what in (("longer", "the longer-response rule"), ("untrained", "the untrained head")):
            d = metrics.get("paired", {}).get("hhh", {}).get(f"rm_minus_{c}")
            if d:
                lines.append(f"  - RM minus {what}: {_diff(d)} (paired cluster bootstrap by conversation): "
                             f"{_verdict(d, what)}.")
        cats = [a for a in metrics["accuracy"] if a["benchmark"] == "hhh" and a["scorer"] == "rm"
                and a["subset"] != "all"]
        if cats:
            best, worst = max(cats, key=lambda a: a["accuracy"]), min(cats, key=lambda a: a["accuracy"])
            lines.append(f"- Per category the RM does best on *{best['subset']}* ({_fmt(best)}) and worst on "
                         f"*{worst['subset']}* ({_fmt(worst)}); with {min(a['n'] for a in cats)}-"
                         f"{max(a['n'] for a in cats)} pairs per category{_cluster_range(cats)} the intervals "
                         f"are wide.")
    ablation = ablation_finding(metrics)
    if ablation:
        lines.append(f"- **Ablation:** {ablation}")
    return "\n".join(lines)


def _cluster_range(rows: list[dict]) -> str:
    """`` from 19-36 conversations``, or nothing for rows without cluster counts."""
    ks = [a["clusters"] for a in rows if "clusters" in a]
    return f" from {min(ks)}-{max(ks)} conversations" if len(ks) == len(rows) else ""


def ablation_finding(metrics: dict) -> str:
    """HHH accuracy with the Heuristic Filter minus without, and what that difference allows us to say."""
    diff = metrics["ablation"].get("hhh_rm_minus_rm_no_hf")
    if not diff:
        return ""
    d = _diff(diff)
    if diff["ci_low"] > 0:
        verdict = "the Heuristic Filter **helps** on HHH"
    elif diff["ci_high"] < 0:
        verdict = "the Heuristic Filter **hurts** on HHH"
    else:
        verdict = "we **cannot tell** the two RMs apart on HHH at this size"
    sizes = {r["variant"]: r["train_pairs"] for r in metrics["ablation"]["table"]}
    convs = f", {diff['clusters']} conversations" if "clusters" in diff else ""
    return (f"HHH accuracy with the filter minus without it = {d} (paired cluster bootstrap by conversation, "
            f"95%{convs}): {verdict}. "
            f"Training pairs: {sizes.get('rm')} with the filter, {sizes.get('rm_no_hf')} without.")


def examples_markdown(examples: dict) -> str:
    """The HHH pairs the RM gets most confidently right and wrong, as Markdown."""
    def clip(t, n=400):
        t = " ".join(str(t).split())
        return t if len(t) <= n else t[:n] + " ..."

    out = []
    for kind, title in (("right", "RM right"), ("wrong", "RM wrong")):
        for i, ex in enumerate(examples.get(kind, []), 1):
            out.append(f"**{title} #{i}** - *{ex['category']}*, margin {ex['margin']:+.2f}\n\n"
                       f"> **Human:** {clip(ex['input'])}\n>\n"
                       f"> **preferred by people** (RM {ex['chosen_score']:+.2f}): {clip(ex['chosen'])}\n>\n"
                       f"> **not preferred** (RM {ex['rejected_score']:+.2f}): {clip(ex['rejected'])}\n")
    return "\n".join(out) if out else "_no examples_"


def timings_table(cfg):
    """Seconds per part of the stage, from its manifest (training time of reused RMs included)."""
    import pandas as pd

    from .artifacts import read_json
    man = read_json(cfg.run_dir / "reward_model" / "manifest.json")
    t = dict(man["timings_s"])
    reused = set(man["notes"].get("reused_models", []))
    for v, s in (man["notes"].get("training_seconds") or {}).items():
        if v in reused:
            t[f"train_{v} (earlier run, reused now)"] = s
    return pd.Series(t, name="seconds").to_frame()
