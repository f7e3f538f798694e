# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (almost)
#     language: python
#     name: almost
# ---

# %% [markdown]
# # 01 - Synthetic comparisons: preferences without people
#
# ALMoST (Kim et al., EMNLP 2023) aligns a *vanilla* language model without a single human
# preference label and without copying answers from an already aligned model. The trick is in
# this notebook: we do not ask anyone which of two answers is better, we **assume** it, from how
# each answer was produced. Three rules of thumb do the ranking:
#
# 1. a **larger model** answers better than a smaller one;
# 2. **more demonstrations** (shots) in the prompt give better answers than fewer;
# 3. **better demonstrations** (long, careful, "Faithful" dialogues) beat plainer ones ("HHH").
#
# A *configuration* is one way of prompting: (model, demonstration set, number of shots). An
# ordered list of configurations, with ties allowed, is the *rubric*. For every query we sample
# one answer per configuration and read off pairs "the better configuration's answer is
# preferred". None of the rules is true every time - a small model sometimes wins - so the
# pairs are noisy by design; the method bets that the noise averages out once a reward model is
# trained on thousands of them (notebook 02 checks that bet against human labels).
#
# The steps here:
# * **Step 0** mines user queries from the vanilla model itself, starting from our ~100 seeds.
# * **Step 1** samples answers, drops bad ones, pairs down the rubric and applies the
#   **Heuristic Filter** (distrust a "better" answer that is both shorter and unusually short).
#
# Offline, the only vanilla model we have is gemma-3-270m. Rule 1 is therefore played by gemma
# against *gemma with two upper layers removed* (layers 15 and 16 of 18, the last one kept) - a
# degraded, smaller model of the same family. Removing the final layers instead produces no
# language at all. On the `gpu` scale the rubric uses real model sizes.

# %% tags=["parameters"]
config_path = "data/configs/cpu.yaml"
overrides = {}

# %%
import pandas as pd
from IPython.display import Markdown, display

from almost_utils import comparison_report as report
from almost_utils.artifacts import read_json, read_jsonl
from almost_utils.comparisons import build_comparisons, configurations, prompt_prefix
from almost_utils.notebook import open_run
from almost_utils.queries import generate_queries

pd.set_option("display.max_colwidth", 200)
cfg = open_run(config_path, overrides)   # stops here on a bad recipe or another recipe's outputs

# %% [markdown]
# ## The rubric of this run
# Best first. Configurations in the same rank are a tie and are never compared with each other.

# %%
display(pd.DataFrame([
    {"rank": i + 1, "configuration": c.name, "model": c.model, "source": cfg.models[c.model].source,
     "dropped layers": cfg.models[c.model].drop_layers, "demonstrations": c.demos, "shots": c.shots,
     "max new tokens": cfg.comparisons.max_new_tokens[c.demos]}
    for i, rank in enumerate(cfg.comparisons.rubric) for c in rank]).set_index("rank"))

# %% [markdown]
# This is what the model reads for the best configuration (the few-shot prefix; every query of
# the configuration shares it, so the sampler computes its key/value cache once and reuses it).

# %%
best = configurations(cfg)[0]
prefix = prompt_prefix(cfg, best)
print(prefix[:1500] + ("\n[...]" if len(prefix) > 1500 else ""))
print(f"\n({len(prefix)} characters)")

# %% [markdown]
# ## Step 0 - mining queries
# Each request shows the model 10 queries sampled from the seeds and the queries mined so far,
# and lets it write the next `Query:` line (temperature 1.2, top-p 0.9, 64 tokens). A candidate
# is kept if it has 30-250 characters and its ROUGE-L F against every query kept so far is below
# 0.5. The stage is resumable: rerunning this cell after an interruption continues where it
# stopped.

# %%
queries = generate_queries(cfg)
qman = read_json(cfg.run_dir / "queries" / "manifest.json")
print(f"kept {qman['counts']['kept']} of {qman['counts']['generated']} generated queries "
      f"in {qman['timings_s']['total']:.0f}s")
display(pd.Series(qman["counts"]["rejected"], name="rejected").to_frame())
display(pd.DataFrame(queries[:12])[["id", "query"]].set_index("id"))

# %% [markdown]
# ## Step 1 - one answer per query per configuration
# Sampling at temperature 1.0, top-p 0.9; the text is cut at the next dialogue separator or
# speaker turn. Responses are saved per chunk of queries as they finish, so an interrupted run
# loses at most one chunk.

# %%
pairs = build_comparisons(cfg)
cman = read_json(cfg.run_dir / "comparisons" / "manifest.json")
print(f"sampling took {cman['timings_s']['sampling']:.0f}s")
df = report.responses_frame(cfg)

# %% [markdown]
# ### One query, every configuration
# Read them top to bottom: the rubric claims each answer is at least as good as the ones below it.

# %%
good_counts = df[df.bad.isna()].groupby("query_id").size()
example_id = int(good_counts.idxmax()) if len(good_counts) else int(df.query_id.iloc[0])
example = report.side_by_side(cfg, df, example_id)
display(Markdown(f"**Query {example_id}:** {example.attrs['query']}"))
for row in example.itertuples():
    status = "kept" if row.bad is None or pd.isna(row.bad) else f"dropped: {row.bad}"
    display(Markdown(f"**{row.config}** (rank {row.rank + 1}, {status})\n\n> "
                     + (row.response.replace("\n", "\n> ") or "*(empty)*")))

# %% [markdown]
# ### Response lengths
# Length is the cheapest signal of effort. If the rules of thumb hold, better configurations
# should write longer, finished answers; the Faithful demonstrations are long, and models copy
# the length of what they are shown.

# %%
fig = report.plot_lengths(cfg, df)
display(df.groupby("config", observed=False)["length"].describe()[["count", "mean", "50%", "max"]])

# %% [markdown]
# ### Bad responses
# A response is dropped when it is under 50 characters, ends with `?` or `:`, starts with
# "well", does not end with `.` or `!`, admits it does not know, or starts a new speaker turn.
# Answers cut by the token cap usually fail the "final . or !" rule.

# %%
bad = report.bad_rates(df)
display(bad.style.format("{:.0%}"))
fig = report.plot_bad_rates(cfg, bad)

# %% [markdown]
# ## Pairs, and the Heuristic Filter
# The **Heuristic Filter** refuses a pair when the chosen answer is shorter than the rejected one
# **and** shorter than M - S/2 (M, S: mean and population standard deviation of the lengths of
# all of that query's good answers). Tied configurations are never paired with each other. How
# the filter meets the pairing depends on `comparisons.pairing`:
#
# * **authors** (default, as in the authors' released code): walk the (better, worse) answers best
#   rank first. A kept pair uses up the better answer's *rank* - tied configurations share one -
#   so each rank gives at most one chosen answer per query. A refused pair uses up nothing: the
#   better answer is tried against the next worse one.
# * **chain** (our first reading of the paper): each answer is chosen once, against the first
#   answer of a worse rank; the filter runs afterwards and a refused pair is simply lost.
#
# Either way K good answers give at most K-1 pairs. `pairs_no_hf.jsonl` (the ablation of
# notebook 02) holds the pairs of the same rule with the filter off. Both rules are counted on
# the same answers; this run trains on the one marked below.

# %%
display(report.pairs_by_rule(cfg))
display(report.pair_funnel(cfg))
display(report.pairs_by_type(cfg))

# %% [markdown]
# ### Kept and dropped pairs

# %%
def show_pair(p, title):
    display(Markdown(f"**{title}** - query: {p['prompt']}\n\n"
                     f"*chosen* ({p['chosen_config']}, {len(p['chosen'])} chars):\n\n> {p['chosen'][:600]}\n\n"
                     f"*rejected* ({p['rejected_config']}, {len(p['rejected'])} chars):\n\n> {p['rejected'][:600]}"))


for p in pairs[:2]:
    show_pair(p, "kept")
for p in report.dropped_by_filter(cfg)[:2]:
    show_pair(p, "dropped by the Heuristic Filter")

# %% [markdown]
# ## What we have
# The filtered pairs in `results/<run>/comparisons/pairs.jsonl` (and the unfiltered ones in
# `pairs_no_hf.jsonl`, for the ablation) are the only supervision the reward model of notebook
# 02 will see. Every number above is also in the stage manifests, with the recipe, seed,
# package versions and timings.

# %%
print(f"{len(pairs)} filtered pairs from {len(queries)} queries")
