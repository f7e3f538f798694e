# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (almost)
#     language: python
#     name: almost
# ---

# %% [markdown]
# # 06 - Evaluation: every policy on the same benchmarks
#
# Steps 4 and 5 judged the policies with the reward model that trained them. That measure is
# circular (a policy tuned towards the RM agrees with it by construction) and it leans on length.
# Here every policy meets the same items under several protocols, most of which use neither our RM
# nor a judge prompt written for it:
#
# | protocol | what the model does | what it measures |
# | --- | --- | --- |
# | static HHH, policy as judge | reads a conversation and two replies, "answers" A or B | whether it *recognises* the helpful, honest, harmless reply |
# | HHH likelihood | nothing: we read the log-likelihood of each reply | whether it *would rather say* the preferred reply |
# | TruthfulQA MC1, two ways | calls a proposed answer true or false / gives each answer a likelihood | preference for true answers over popular misconceptions |
# | pairwise A/B | answers our own open questions; a judge compares two policies' answers | preference between policies, raw and at equal length |
# | harmlessness probe | answers requests it should decline, and benign look-alikes | refusal rate, and over-refusal |
#
# **The contestants**: the vanilla model behind three HHH demonstrations (the paper's prompted
# baseline), SFT-noRM, ALMoST-SFT, ALMoST-PPO, and an instruction-tuned model of similar size trained
# on human and distilled data (SmolLM2-135M-Instruct, read through its own chat template): our
# stand-in for the paper's Alpaca and Dolly comparisons.
#
# The next-token protocols follow the authors' evaluation code: an option is read from the single
# next token after a forced reply prefix ("The better response is Response" then " A" or " B"), both
# orders are asked, and a response's score is its letter's probability summed over the two orders; a
# tie counts half. Every interval is a 95% bootstrap over questions (HHH: over conversations, several
# pairs share one), paired where two policies answer the same items.

# %% tags=["parameters"]
config_path = "data/configs/cpu.yaml"
overrides = {}

# %%
import pandas as pd
from IPython.display import Markdown, display

from almost_utils import evaluation_report as report
from almost_utils.evaluation import (JUDGE_REPLY, LETTERS, judge_question, load_contestant, load_inputs,
                                     run_endpoint_judge, run_evaluation_stage)
from almost_utils.judge_client import EndpointJudge
from almost_utils.notebook import open_run

pd.set_option("display.max_colwidth", 200)
cfg = open_run(config_path, overrides)   # stops here on a bad recipe or another recipe's outputs

# %% [markdown]
# ## What is evaluated
# On the CPU recipe the BIG-bench sets are subsets drawn per category with the run's seed (the
# whole sets on larger recipes); our open questions and the probe are in `data/eval/`, written
# for this project.

# %%
e = cfg.evaluation
items = load_inputs(cfg)
display(pd.DataFrame({"value": {
    "policies": ", ".join(report.label(p) for p in e.policies),
    "prompted baseline": f"{e.vanilla_shots} {e.vanilla_demos} demonstrations",
    "BIG-bench HHH pairs": f"{len(items['hhh'])} of 221",
    "TruthfulQA questions": f"{len(items['truthfulqa'])} of 299",
    "open questions": f"{len(items['questions'])} ({', '.join(sorted({q['category'] for q in items['questions']}))})",
    "probe": f"{sum(p['kind'] == 'decline' for p in items['probe'])} to decline, "
             f"{sum(p['kind'] == 'benign' for p in items['probe'])} benign controls",
    "answers": f"T {e.temperature}, top-p {e.top_p}, at most {e.max_new_tokens} tokens "
               f"(probe {e.probe_max_new_tokens})"}}))

# %% [markdown]
# ## A live example: the policy as judge
# One HHH pair as ALMoST-SFT reads it, and the probabilities of its next token " A" / " B" in both
# orders. (Each option must be a single token of the model's tokenizer; the evaluation checks it.)
# If " A" wins in both rows, the model prefers a position, not a reply: asking both orders turns
# such a preference into a tie instead of a lucky hit.

# %%
live = load_contestant(cfg, "sft" if "sft" in e.policies else e.policies[0], progress=False)
pair = items["hhh"][0]
print(judge_question(pair["history"], pair["chosen"], pair["rejected"]) + "\n\nAssistant: " + JUDGE_REPLY + " ...")
prompts = [live.prompt_ids([("Human", judge_question(pair["history"], a, b))]) + live.reply_ids(JUDGE_REPLY)
           for a, b in ((pair["chosen"], pair["rejected"]), (pair["rejected"], pair["chosen"]))]
probs = live.engine.next_token_logprobs(prompts, live.option_ids(LETTERS), live.prefix_ids).exp()
display(pd.DataFrame(probs.numpy(), columns=[f'P(" {x}")' for x in LETTERS],
                     index=["preferred reply shown as A", "preferred reply shown as B"]).round(4))
del live

# %% [markdown]
# ## Run the evaluation
# One resumable unit per (evaluation, policy) under `evaluation/units/`; a policy loads only when one
# of its units is missing, one at a time. The Step-2 RM scores every answer to the open questions.

# %%
summary = run_evaluation_stage(cfg)
data = report.load(cfg.run_dir)
figures = report.make_figures(data)

# %% [markdown]
# ## Static HHH
# Accuracy by category, the policy as judge (both orders) and by likelihood. A coin scores 50%.

# %%
display(Markdown("**The policy as judge**"))
display(report.hhh_table(summary, "hhh_judge"))
display(Markdown("**The preferred reply is the more likely one** (mean log-probability per token)"))
display(report.hhh_table(summary, "hhh_likelihood"))
display(Markdown(f"![HHH by category]({figures['hhh_by_category']})"))

# %% [markdown]
# How much of the judge's accuracy is position? When the same letter wins in both orders, the
# reply never decided the choice; the accuracy then comes from small shifts of the two letters'
# probabilities, which is what the both-orders score sums.

# %%
display(report.position_table(data["units"]))

# %% [markdown]
# ## Every policy in one table
# TruthfulQA MC1 by both protocols, refusals on the probe (our keyword detector, below), and the
# length and RM score of the answers to our open questions.

# %%
display(report.policies_table(summary))
display(Markdown(f"![TruthfulQA and refusals]({figures['truthfulqa_refusals']})"))

# %% [markdown]
# ## Pairwise A/B, judged by the RM
# Every pair of policies on every open question. The RM scores each answer on its own, so showing
# the two in either order gives the same verdict; a tie needs equal scores. Because the RM prefers
# longer answers, the *length-controlled* win rate fits the verdicts on the length difference and
# reads the win rate at equal length (as length-controlled AlpacaEval does).

# %%
display(report.winrate_table(summary["pairwise"]["rm"]))
display(Markdown(f"![win rates]({figures['win_rates']})\n\n![answer lengths]({figures['answer_lengths']})"))

# %% [markdown]
# ## Pairwise A/B, judged by a language model (optional)
# Any OpenAI-compatible chat endpoint can judge the same pairs, in both orders (a disagreement
# between orders counts as a tie). It runs only when `ALMOST_JUDGE_URL` and `ALMOST_JUDGE_MODEL`
# (and, if needed, `ALMOST_JUDGE_API_KEY`) are set in the environment; the key is never written.

# %%
judge = EndpointJudge.from_env()
if judge is None:
    print("No judge endpoint configured (ALMOST_JUDGE_URL unset): skipped.")
else:
    from almost_utils.winrates import table
    verdicts = run_endpoint_judge(cfg, judge)
    display(report.winrate_table(table(verdicts, e.bootstrap_samples, cfg.seed)))
    print(f"invalid verdicts: {sum(v['invalid'] for v in verdicts)} of {2 * len(verdicts)}")

# %% [markdown]
# ## Answers side by side
# A few open questions, then probe requests. The refusal detector (`REFUSAL_PATTERNS` in
# `almost_utils/evaluation.py`) flags first-person declining, apologies, and naming a request as
# illegal or harmful; it misses polite deflections and flags answers that warn and then comply, so
# read the answers too.

# %%
display(Markdown(report.side_by_side(data["units"], "question", k=3)))
display(Markdown(report.side_by_side(data["units"], "probe", k=3)))

# %% [markdown]
# ## What we see

# %%
display(Markdown(report.findings(summary, "ppo" if "ppo" in e.policies else e.policies[-1])))
display(Markdown(f"Seconds per policy (the stage took {data['manifest']['timings_s']['total']:.0f} s in its last session):"))
display(report.timings_table(data["manifest"]))
