"""Tables and figures of Steps 0-1 for notebook 01 (logic here, narrative in the notebook)."""
from __future__ import annotations

import pandas as pd

from .artifacts import read_json, read_jsonl, save_figure
from .comparisons import configurations, load_responses, pair_rows, rubric_ranks
from .config import RunConfig


def responses_frame(cfg: RunConfig) -> pd.DataFrame:
    """One row per (query, configuration): response, length, rank, bad reason."""
    ranks = rubric_ranks(cfg)
    rows = [dict(r, rank=ranks[name], length=len(r["response"]))
            for name, by_q in load_responses(cfg).items() for r in by_q.values()]
    df = pd.DataFrame(rows, columns=["query_id", "config", "response", "bad", "rank", "length"])
    order = [c.name for c in configurations(cfg)]
    df["config"] = pd.Categorical(df["config"], categories=order, ordered=True)
    return df.sort_values(["query_id", "config"]).reset_index(drop=True)


def side_by_side(cfg: RunConfig, df: pd.DataFrame, query_id: int) -> pd.DataFrame:
    queries = {q["id"]: q["query"] for q in read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")}
    sub = df[df.query_id == query_id][["config", "rank", "bad", "response"]]
    sub.attrs["query"] = queries.get(query_id, "")
    return sub.reset_index(drop=True)


def bad_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Share of responses per configuration dropped by each rule (and in total)."""
    table = pd.crosstab(df["config"], df["bad"].fillna("kept"), normalize="index")
    cols = ["kept"] + sorted(c for c in table.columns if c != "kept")
    table = table.reindex(columns=cols, fill_value=0.0)
    table["bad (total)"] = 1 - table["kept"]
    return table


def pair_funnel(cfg: RunConfig) -> pd.DataFrame:
    """How many queries, responses and pairs survive each step."""
    out = cfg.run_dir / "comparisons"
    man = read_json(out / "manifest.json")["counts"]
    n_resp = sum(man["responses"].values())
    n_bad = sum(man["bad_responses"].values())
    all_pairs = read_jsonl(out / "pairs_no_hf.jsonl")
    kept = read_jsonl(out / "pairs.jsonl")
    rows = [("queries", man["queries"]), ("responses sampled", n_resp), ("good responses", n_resp - n_bad),
            ("pairs down the rubric", len(all_pairs)), ("pairs after the Heuristic Filter", len(kept))]
    return pd.DataFrame(rows, columns=["stage", "count"]).set_index("stage")


def pairs_by_type(cfg: RunConfig) -> pd.DataFrame:
    out = cfg.run_dir / "comparisons"
    before = pd.DataFrame(read_jsonl(out / "pairs_no_hf.jsonl"))
    after = pd.DataFrame(read_jsonl(out / "pairs.jsonl"))
    if before.empty:
        return pd.DataFrame(columns=["before filter", "after filter"])
    key = ["chosen_config", "rejected_config"]
    table = before.groupby(key).size().to_frame("before filter")
    if after.empty:
        table["after filter"] = 0
    else:   # outer: under the authors' rule a retried link exists only after the filter
        table = table.join(after.groupby(key).size().rename("after filter"), how="outer")
    return table.fillna(0).astype(int)


def pairs_by_rule(cfg: RunConfig) -> pd.DataFrame:
    """Pair counts of both pairing rules on the same responses, from the Step-1 manifest."""
    path = cfg.run_dir / "comparisons" / "manifest.json"
    counts = read_json(path)["counts"]
    if "pairs_by_rule" not in counts:
        raise KeyError(f"{path}: no 'pairs_by_rule' count; rerun build_comparisons to record both rules")
    table = pd.DataFrame(counts["pairs_by_rule"]).T[["before_filter", "after_filter"]]
    table.columns = ["before filter", "after filter"]
    table.index.name = "pairing rule"
    table["this run"] = ["yes" if rule == cfg.comparisons.pairing else "" for rule in table.index]
    return table


def dropped_by_filter(cfg: RunConfig) -> list[dict]:
    """Every combination the Heuristic Filter refused under the run's pairing rule (pair rows).

    Recomputed from the responses: under the authors' rule a refused chosen response is tried
    again and may sit in a kept pair with another rejected one, and its retries may be refused
    too, so the two pair files alone cannot list them.
    """
    c = cfg.comparisons
    if not c.heuristic_filter:
        return []
    queries = read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")[:c.num_queries]
    return pair_rows(queries, load_responses(cfg), rubric_ranks(cfg), c.pairing)[2]


def plot_lengths(cfg: RunConfig, df: pd.DataFrame):
    """Character lengths of good and bad responses, one box per configuration."""
    import matplotlib.pyplot as plt
    names = list(df["config"].cat.categories)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    for offset, (label, sub, color) in enumerate([("good", df[df.bad.isna()], "tab:blue"),
                                                  ("bad", df[df.bad.notna()], "tab:gray")]):
        data = [sub[sub.config == n]["length"].to_numpy() for n in names]
        pos = [i + (0.2 if offset else -0.2) for i in range(len(names))]
        bp = ax.boxplot([d if len(d) else [float("nan")] for d in data], positions=pos, widths=0.35,
                        vert=False, patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.6)
        ax.plot([], [], color=color, lw=6, alpha=0.6, label=label)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("response length (characters)")
    ax.set_title("Response length per configuration (best rank at the top)")
    ax.legend(loc="lower right")
    save_figure(fig, cfg.stage_dir("comparisons") / "response_lengths.png")
    return fig


def plot_bad_rates(cfg: RunConfig, table: pd.DataFrame):
    """Stacked bars: why responses of each configuration were dropped."""
    import matplotlib.pyplot as plt
    reasons = [c for c in table.columns if c not in ("kept", "bad (total)")]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(table) + 1.5))
    left = [0.0] * len(table)
    for reason in reasons:
        vals = table[reason].to_numpy()
        ax.barh(list(table.index.astype(str)), vals, left=left, label=reason)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of responses dropped")
    ax.set_title("Bad responses per configuration, by rule")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, cfg.stage_dir("comparisons") / "bad_rates.png")
    return fig
