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
# # 04 - Supervised fine-tuning on self-play demonstrations
#
# Notebook 03 produced dialogues whose assistant turns the reward model picked (best of N). Step 4
# of ALMoST fine-tunes the vanilla model on them: the result, **ALMoST-SFT**, answers in the
# assistant role without any few-shot prompt. To see what the RM's picks are worth, the same
# training runs on the *random* picks of the same candidates: **SFT-noRM** (self-play with N = 1).
#
# **Format and loss.** A dialogue is trained in the format the policy will be prompted with,
# `\n\nHuman: {query}\n\nAssistant: {answer}<eos>` per exchange, and the loss counts the
# assistant's tokens only (every assistant turn and the end-of-turn token that closes it): the
# model learns to answer and to stop, not to write the human's lines. The authors' settings: max
# length 512, 3 epochs, cosine schedule, 3% warm-up, learning rate 2e-5 with full fine-tuning. We
# train LoRA adapters (QLoRA on a GPU), which need a larger learning rate; the recipe says which.
#
# **A cheaper output layer.** gemma's output layer maps 640 dimensions to 262,144 tokens and
# dominates a training step. The loss needs it only at answer tokens, so our trainer applies it
# there only (the same loss; `benchmarks/bench_sft.py` measures the speed-up).
#
# **The comparison.** The vanilla model prompted with the Faithful demonstrations (the
# assistant agent of notebook 03), SFT-noRM and ALMoST-SFT answer the same held-out queries (a
# split no earlier step used) with the same sampling settings, and the Step-2 RM scores every
# answer. The RM is also what picked ALMoST-SFT's data, so a higher score here partly measures
# agreement with the RM by construction; and since our RM leans on length, answer length is
# reported next to every score.
#
# Caveat on the baseline: SFT-noRM's dialogues are single-turn (the random picker chose on the
# first turn only; only the RM's picks drove dialogues forward), so it trains on fewer tokens than
# ALMoST-SFT in the same number of optimizer steps.

# %% tags=["parameters"]
config_path = "data/configs/cpu.yaml"
overrides = {}

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from almost_utils import sft_report
from almost_utils.answers import POLICIES, matched_length_gain, run_answers_stage
from almost_utils.notebook import open_run
from almost_utils.queries import load_split
from almost_utils.sampling import SamplingParams
from almost_utils.sft import SFT_STAGES, load_policy, load_training, run_sft_stage

pd.set_option("display.max_colwidth", 200)
cfg = open_run(config_path, overrides)   # stops here on a bad recipe or another recipe's outputs

# %% [markdown]
# ## The recipe, next to the authors'

# %%
t = cfg.sft
display(pd.DataFrame({
    "authors": {"model": "LLaMA-7B", "weights trained": "all", "learning rate": "2e-5", "epochs": 3,
                "schedule": "cosine, 3% warm-up", "dialogues per step": 64, "max length": 512},
    "this run": {"model": cfg.models[t.model].source,
                 "weights trained": f"LoRA r={t.lora_r} on the top {t.lora_layers or 'all'} layers",
                 "learning rate": f"{t.learning_rate:g}", "epochs": t.epochs,
                 "schedule": f"{t.lr_scheduler}, {t.warmup_ratio:.0%} warm-up",
                 "dialogues per step": t.batch_size * t.grad_accum, "max length": t.max_length}}))

# %% [markdown]
# ## Train both variants
# Same code, seed and settings; only the dialogues differ. A checkpoint is written every
# `save_steps` optimizer steps, and an interrupted training resumes from the last complete one.

# %%
for variant in SFT_STAGES:
    run_sft_stage(cfg, variant)
training = {"training": {v: load_training(cfg, v) for v in SFT_STAGES}}
display(sft_report.training_table(training))
fig = sft_report.loss_figure(training)
plt.show()

# %% [markdown]
# ## ALMoST-SFT, live
# The trained adapter is merged into a copy of the base weights and sampled through the same
# engine as every other step. No few-shot prefix: the prompt is the bare inference format.

# %%
policy = load_policy(cfg, "sft")
query = load_split(cfg, cfg.answers.split)[0]["query"]
print(repr(policy.prompt_text(query)))
params = SamplingParams(max_new_tokens=cfg.answers.max_new_tokens, temperature=cfg.answers.temperature,
                        top_p=cfg.answers.top_p, seed=cfg.seed)
print(policy.generate([query], params)[0])
del policy

# %% [markdown]
# ## Held-out queries: prompted vanilla, SFT-noRM, ALMoST-SFT
# Each policy answers every held-out query `samples` times; the RM scores each answer. Intervals
# are 95% cluster-bootstrap intervals resampling *queries* (the answers to one query are not
# independent); differences are paired on the same query and sample.

# %%
rows = run_answers_stage(cfg)
data = sft_report.load(cfg.run_dir)
display(sft_report.answers_table(data["summary"]))
display(sft_report.differences_table(data["summary"]))
fig = sft_report.answers_figure(data["answers"], data["summary"])
plt.show()

# %% [markdown]
# ## How much of the difference is length?
# Our RM prefers longer answers (notebook 02), and the RM's picks in notebook 03 were longer than
# random ones, so ALMoST-SFT may score higher partly because it learned to write more. One
# least-squares fit `score ~ length + [policy]` over both policies' answers splits the score
# difference into the part the length difference predicts (the RM's slope times the change in
# length) and the part left at equal length.

# %%
for a, b in (("sft", "sft_norm"), ("sft", "vanilla")):
    gain = matched_length_gain(data["answers"], a, b, n_samples=cfg.reward_model.bootstrap_samples, seed=cfg.seed)
    display(sft_report.gain_table(gain, f"{POLICIES[b]} -> {POLICIES[a]}"))

# %% [markdown]
# Same queries, side by side (the first sample of each policy):

# %%
display(Markdown(sft_report.side_by_side(data["answers"], k=3)))

# %% [markdown]
# ## What we found
# Computed from this run's artifacts:

# %%
display(Markdown(sft_report.findings(data["summary"])))

# %% [markdown]
# ## Where the outputs are
# `results/<run>/sft/` and `sft_norm/`: `adapter/` (LoRA adapter and `policy.json`, loaded by
# `almost_utils.sft.load_policy(run folder, variant)`), `loss_curve.jsonl`, `data.json`,
# `manifest.json`. `results/<run>/sft_answers/`: `answers.jsonl` (every answer with its RM score
# and length), `summary.json` (means, intervals, paired differences), `figures/*.png`, `manifest.json`.

# %%
sft_report.make_figures(data)
plt.close("all")
for stage in ("sft", "sft_norm", "sft_answers"):
    m = data["manifests"][stage]
    print(f"{stage}: {m['timings_s'].get('total', 0):.0f} s")
