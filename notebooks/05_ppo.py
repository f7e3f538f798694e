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
# # 05 - Reinforcement learning from synthetic feedback (PPO)
#
# ALMoST's last training step optimises ALMoST-SFT against the reward model with PPO: the policy
# answers fresh queries, the RM scores each answer, and the policy moves towards answers the RM
# scores higher, held back by a penalty on its divergence (KL) from the SFT policy it started
# from. The authors used the TRLX library and did not release this step; trl no longer ships a
# PPO trainer. `almost_utils/ppo.py` is our own compact implementation (about 650 lines with its docstrings),
# written to be read next to the PPO papers.
#
# **The pieces.**
# - *Policy*: ALMoST-SFT with a fresh LoRA adapter, the only weights PPO trains besides a
#   *value head* (one linear layer on the policy's last hidden state, starting at zero).
# - *Reference*: the same model with the adapter switched off, so the KL costs no second model.
# - *Rollouts*: sampled through the project's engine from a plain copy of the weights refreshed
#   after every update; log-probabilities are those of the sampling distribution (temperature
#   included, no top-p).
# - *Reward*: the RM's score of the decoded answer (minus a penalty when the answer never ends its
#   turn), normalised by its running standard deviation, and a per-token KL penalty
#   `-kl_coef * (log pi - log pi_ref)`.
# - *Update*: GAE advantages (whitened), the clipped policy loss and the clipped value loss, a few
#   epochs over minibatches of each rollout batch.
#
# Every setting is a recipe field (`ppo` in `data/configs/*.yaml`); the paper gives none of them.
# **A warning before the numbers**: the RM is both the training signal and the judge below, and it
# leans on length. Whatever PPO gains by the RM's measure has to be read with the length analysis
# at the end.

# %% tags=["parameters"]
config_path = "data/configs/cpu.yaml"
overrides = {}

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from almost_utils import ppo_report, sft_report
from almost_utils.answers import matched_length_gain, run_answers_stage
from almost_utils.notebook import open_run
from almost_utils.ppo import run_ppo_stage

pd.set_option("display.max_colwidth", 200)
cfg = open_run(config_path, overrides)   # stops here on a bad recipe or another recipe's outputs

# %% [markdown]
# ## The recipe

# %%
p = cfg.ppo
display(pd.DataFrame({"value": {
    "starts from": p.start_from, "steps x prompts": f"{p.steps} x {p.rollout_batch}",
    "PPO epochs x minibatch": f"{p.ppo_epochs} x {p.minibatch}", "learning rate": p.learning_rate,
    "LoRA": f"r={p.lora_r} on the top {p.lora_layers or 'all'} layers",
    "KL coefficient": f"{p.kl_coef}" + (f" (adaptive, target {p.kl_target})" if p.kl_target else " (fixed)"),
    "clip / value clip / value-loss coefficient": f"{p.clip_range} / {p.value_clip} / {p.vf_coef}",
    "gamma / lambda": f"{p.gamma} / {p.lam}", "rollout temperature": p.temperature,
    "max new tokens / no-EOS penalty": f"{p.max_new_tokens} / {p.no_eos_penalty}",
    "stop when KL exceeds": p.kl_limit}}))

# %% [markdown]
# ## Train
# A checkpoint (adapter, value head, optimizer, KL controller, running reward statistics) is
# written every `save_steps` steps; an interrupted run resumes from it with the same step count
# and the same prompts.

# %%
log = run_ppo_stage(cfg)
print(f"{len(log)} steps")
display(pd.DataFrame([{k: v for k, v in r.items() if k != "examples"} for r in log]).set_index("step").round(3))

# %% [markdown]
# ## Curves
# The RM score of the rollouts should rise while the KL to the SFT policy grows slowly. Watch
# the length and the entropy too: a policy exploiting a length-loving RM writes longer, and a
# collapsing one loses entropy. The last panel splits a step's time into sampling, RM scoring
# and the PPO update.

# %%
fig = ppo_report.curves_figure(log)
plt.show()
ex = log[-1]["examples"]
if ex:
    display(Markdown("Rollouts of the last step:\n\n" + "\n\n".join(
        f"> **Human:** {e['query']}\n>\n> **ALMoST-PPO** (RM {e['score']:+.2f}): {e['response'][:400]}" for e in ex)))

# %% [markdown]
# ## Held-out queries: ALMoST-SFT against ALMoST-PPO
# The same held-out queries, samples and seeds as notebook 04; the RM scores every answer and
# differences are paired by query and sample (95% cluster-bootstrap intervals over queries).

# %%
rows = run_answers_stage(cfg, stage="ppo_answers")
data = ppo_report.load(cfg.run_dir)
display(sft_report.answers_table(data["summary"]))
display(sft_report.differences_table(data["summary"]))
display(Markdown(sft_report.side_by_side(data["answers"], k=3)))

# %% [markdown]
# ## Reward over-optimisation: how much of the gain is length?
# A policy trained against a learned RM finds what the RM rewards, whether or not people would.
# Ours prefers longer answers (notebook 02). The left panel plots RM score against length for
# the SFT and PPO answers with a fitted line each; the table splits the score change into the
# part the length change predicts (the RM's slope times the change in length) and the part left
# at equal length, from one least-squares fit `score ~ length + [PPO]`.

# %%
gain = matched_length_gain(data["answers"], "ppo", "sft", n_samples=cfg.reward_model.bootstrap_samples, seed=cfg.seed)
display(sft_report.gain_table(gain, "ALMoST-SFT -> ALMoST-PPO"))
fig = ppo_report.length_figure(data["answers"])
plt.show()

# %% [markdown]
# ## What we found
# Computed from this run's artifacts:

# %%
display(Markdown(ppo_report.findings(log, data["summary"], gain, cfg.ppo.kl_limit)))

# %% [markdown]
# **Caveat.** The judge here is the training signal. Notebook 06 evaluates the policies without
# our RM (BIG-bench HHH, TruthfulQA, likelihood preferences).
#
# ## Where the outputs are
# `results/<run>/ppo/`: `log.jsonl` (statistics per step), `adapter/` (the PPO LoRA adapter,
# the value head and `policy.json`; `almost_utils.ppo.load_ppo_policy(run folder)` loads the
# policy), `figures/*.png`, `manifest.json`; `results/<run>/ppo_answers/` as in notebook 04.

# %%
ppo_report.make_figures(data)
plt.close("all")
display(pd.Series(data["manifest"]["timings_s"], name="seconds").round(1).to_frame())
