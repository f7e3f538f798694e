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
# # 03 - Reward-model-guided self-play: demonstrations nobody wrote
#
# Supervised fine-tuning needs demonstrations: dialogues in which an assistant answers well.
# ALMoST writes none by hand and copies none from an aligned model. Instead, two prompted copies
# of the *vanilla* model talk to each other, and the reward model of notebook 02 picks which
# assistant replies are kept. The paper calls this **RM-guided self-play (RMSP)**; the authors
# did not release its code, so what follows is our own implementation of the description.
#
# **The two agents.**
# - The *user* agent is the vanilla model behind our own user-role prompt
#   (`data/prompts/user_agent.txt`): a few dialogues that each end with the person's follow-up
#   (asks about a detail, wants an example, pushes back). It writes one line.
# - The *assistant* agent is the vanilla model behind the Faithful demonstrations of Step 1's
#   best configuration.
#
# **One assistant turn.** The assistant samples **N candidates**; the RM scores each after the
# dialogue so far and the highest score is kept (*best of N*). The user agent then writes the
# next human turn and the dialogue goes on, for a set number of assistant turns.
#
# **Baselines from the same samples.** On the first turn two other pickers choose among the same
# N candidates: a *random* one (what self-play without an RM, N = 1, would keep: the data of
# SFT-noRM in notebook 04) and the *longest* one. Our Step-2 RM prefers the longer answer on about
# three HHH pairs in four, so the longest picker shows how much of the RM's choice is length.
# Every candidate is stored with its score and length, so this notebook can also ask what fewer
# candidates would have given, without sampling again.
#
# The paper does not publish N, the number of turns or the sampling settings: they are recipe
# fields (`rmsp` in `data/configs/*.yaml`).

# %% tags=["parameters"]
config_path = "data/configs/cpu.yaml"
overrides = {}

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from almost_utils import rmsp_report
from almost_utils.notebook import open_run
from almost_utils.queries import generate_splits, load_split
from almost_utils.rmsp import check_inputs, play_dialogue, run_rmsp

pd.set_option("display.max_colwidth", 200)
cfg = open_run(config_path, overrides)   # stops here on a bad recipe or another recipe's outputs

# %% [markdown]
# ## The recipe
# Our choices for this scale (the paper publishes none of them):

# %%
r = cfg.rmsp
display(pd.DataFrame({"value": {
    "dialogues": r.num_dialogues, "candidates per assistant turn (N)": r.candidates,
    "assistant turns per dialogue": r.assistant_turns,
    "assistant sampling": f"T {r.assistant.temperature}, top-p {r.assistant.top_p}, "
                          f"at most {r.assistant.max_new_tokens} tokens",
    "user sampling": f"T {r.user.temperature}, top-p {r.user.top_p}, at most {r.user.max_new_tokens} tokens, one line",
    "a follow-up shorter than this ends the dialogue": f"{r.user_min_chars} characters",
    "unfinished answers cut back to their last sentence": r.trim_to_last_sentence}}))

# %% [markdown]
# ## Fresh queries
# Self-play must not start from queries Step 1 already answered: the RM was trained on those.
# The `splits` stage goes on mining queries exactly as Step 0 did (same model, prompt, sampling
# and filters; every Step-0 query counts as a near duplicate to avoid) and deals them into
# splits by a seeded shuffle: `rmsp` here, `ppo` for Step 5, `heldout` for evaluation.

# %%
splits = generate_splits(cfg)
display(pd.Series({name: len(load_split(cfg, name)) for name in cfg.splits.sizes}, name="queries").to_frame())

# %% [markdown]
# ## One dialogue, live
# Before the whole stage runs, one dialogue played here, on a query of the `rmsp` split that the
# stage does not use (it takes the first `num_dialogues`). For each assistant turn the table shows
# the N candidates, their RM scores and lengths, and which candidate each picker takes; only the
# RM's pick continues the dialogue. The user agent then writes the next turn.

# %%
user_prefix, _, _ = check_inputs(cfg)
print(user_prefix[:600] + " ...\n")
pool = load_split(cfg, "rmsp")
query = pool[min(r.num_dialogues, len(pool) - 1)]["query"]
dialogue, records = play_dialogue(cfg, query)
for rec in records:
    print(f"--- assistant turn {rec['turn'] + 1}: {len(rec['candidates'])} candidates")
    display(rmsp_report.walkthrough_table(rec))
    kept = rec["picks"]["rm"]
    if kept is not None:
        scores = [c["score"] for c in rec["candidates"] if c["score"] is not None]
        print(f"kept candidate {kept}: RM score {rec['candidates'][kept]['score']:+.3f}, "
              f"the mean candidate scored {sum(scores) / len(scores):+.3f}")
    if rec["user"] is not None:
        print(f"user agent: {rec['user']['text']!r}" + (f"  -> ends the dialogue ({rec['user']['problem']})"
                                                         if rec["user"]["problem"] else ""))
print(f"\nthe dialogue ended: {dialogue['end']}")

# %% [markdown]
# ## The stage
# All dialogues of a chunk advance together: one engine call samples the N candidates of every
# open dialogue (the Faithful prefix's key/value cache is computed once and shared), one RM call
# scores them, one engine call writes the follow-ups. A chunk's turn is a resumable unit: an
# interrupted run picks up at the first unfinished one.

# %%
rows = run_rmsp(cfg)
data = rmsp_report.load(cfg.run_dir)
bench = Path("results/benchmarks/sampling.json")
display(rmsp_report.timing_table(data, json.loads(bench.read_text()) if bench.is_file() else None))

# %% [markdown]
# The engine's rate here is below the benchmark's: the benchmark samples 96 tokens after one
# long prefix; here a batch runs until its longest row stops (most rows stop earlier), and the
# second turn's prompts carry the first exchange.
#
# ## The dialogues
# How they ended and how long the turns are. A dialogue ends early when the user agent writes
# something unusable (nothing, a speaker label, a repeat of an earlier question, a line too
# short) or when every assistant candidate is empty.

# %%
display(rmsp_report.dialogue_table(data))
fig = rmsp_report.dialogue_lengths_figure(data["dialogues"])
plt.show()
d = max(data["dialogues"], key=lambda d: (d["assistant_turns"], -d["id"]))
display(Markdown(f"A demonstration as SFT will read it (dialogue {d['id']}, RM scores "
                 f"{', '.join(f'{s:+.2f}' for s in d['rm_scores'])}):\n\n"
                 + "\n\n".join(f"> **{role}:** {text}" for role, text in d["turns"])))

# %% [markdown]
# ## Best of N: what the RM's choice buys
# From the stored candidates, the exact expected RM score of the RM's best among k random
# candidates, k = 1 .. N (k = 1 is a random candidate: self-play without the RM). The RM's score
# of its own pick rises with k by construction; the question is *how* it rises. The green line
# picks the longest of k instead, and the right panel shows the length of the RM's pick: if
# the RM's best of k grows much longer with k, part of what it buys is length.

# %%
curve = rmsp_report.best_of_n_curve(data["candidates"])
display(pd.DataFrame(curve).set_index("k").round(3))
fig = rmsp_report.best_of_n_figure(curve)
plt.show()

# %% [markdown]
# ## The RM's pick, the longest and a random one
# First assistant turn, same candidates. "Same as the RM's pick" for the longest picker is the
# agreement the issue asks about: with N candidates and no length preference it would be about
# 1/N. The scatter shows every first-turn candidate's score against its length; the bars, where
# the kept candidate ranks by length within its turn.

# %%
display(rmsp_report.picker_table(data["candidates"]))
rho = rmsp_report.score_length_correlation([c for c in data["candidates"] if c["turn"] == 0])
print(f"rank correlation of RM score and length within a turn (mean over first turns): {rho:+.2f}")
fig = rmsp_report.candidates_figure(data["candidates"])
plt.show()

# %% [markdown]
# ## What we found
# Computed from this run's artifacts:

# %%
display(Markdown(rmsp_report.findings(data, curve)))

# %% [markdown]
# **What this is and is not.** RMSP turns the RM's preference into training data; it cannot be
# better than the RM. Notebook 02 found our RM above the untrained head on human preferences but
# not above the plain "longer answer" rule, and the figures above show how much the RM's picks
# lean on length. Notebook 04 trains on these dialogues and asks whether the result beats
# training on the random picks.
#
# ## Where the outputs are
# `results/<run>/rmsp/`: `dialogues.jsonl` (the demonstrations, for Step 4),
# `dialogues_random.jsonl` and `dialogues_longest.jsonl` (first-turn picks of the other pickers),
# `candidates.jsonl` (every candidate of every turn with its RM score), `turns/` (the resumable
# units and their timings), `figures/*.png`, `manifest.json`.

# %%
figs = rmsp_report.make_figures(data)
plt.close("all")
stage = data["stage_dir"]
print("\n".join(sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()
                       and not str(p.relative_to(stage)).startswith("turns/"))))
