"""Step 6 on hand-made items and the tiny models: option tokens, order swapping, padding,
category bookkeeping, TruthfulQA scoring, the refusal detector, win rates (raw and
length-controlled), subsets, bad input, and the stage's resume and reuse."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from almost_utils.config import ConfigError, ModelSpec, TinySpec, load_config
from almost_utils.evaluation import (LETTERS, TRUTH_WORDS, Contestant, _mc_correct, answer_rows, check_inputs,
                                     hhh_judge_rows, hhh_likelihood_rows, is_refusal, judge_question, load_inputs,
                                     read_items, run_endpoint_judge, run_evaluation_stage, single_token, stratified,
                                     summarize, truthfulqa_rows)
from almost_utils.models import load_model
from almost_utils.sampling import TransformersEngine
from almost_utils.winrates import fit_length_logistic, outcome_rows, swap, table, win_rates
from conftest import TINY

PAIRS = [{"id": f"{c}-{i}", "category": c, "cluster": f"conv{i // 2}", "history": [("Human", f"Question {i} about {c}?")],
          "chosen": f"A careful answer number {i}.", "rejected": f"Nope {i}."}
         for i, c in enumerate(["harmless", "helpful", "helpful", "honest", "other"])]


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model(ModelSpec(source="tiny:packaged:gemma-3-270m", tiny=TinySpec()), "cpu", seed=0)
    return model, tok


@pytest.fixture(scope="module")
def smol():
    model, tok = load_model(ModelSpec(source="tiny:packaged:smollm2-135m-instruct", tiny=TinySpec()), "cpu", seed=0)
    return model, tok


def contestant(model_tok, chat=False, batch=4, prefix=""):
    model, tok = model_tok
    return Contestant("p", TransformersEngine(model, tok, batch_size=batch, progress=False), tok, chat=chat,
                      prefix_ids=tok(prefix).input_ids if prefix else [])


class StubEngine:
    """Next-token log-probs from a function of the decoded prompt; records every prompt."""

    def __init__(self, tok, fn):
        self.tok, self.fn, self.prompts = tok, fn, []

    def next_token_logprobs(self, rows, cands, prefix_ids=(), desc=None):
        texts = [self.tok.decode(r) for r in rows]
        self.prompts.extend(texts)
        return torch.log(torch.tensor([self.fn(t) for t in texts], dtype=torch.float64))


# --------------------------------------------------------------------------- tokens and prompts
@pytest.mark.parametrize("which", ["gemma", "smol"])
def test_options_are_single_tokens_with_a_leading_space(which, request):
    c = contestant(request.getfixturevalue(which), chat=which == "smol")
    ids = c.option_ids(LETTERS) + c.option_ids(TRUTH_WORDS)
    assert len(set(ids)) == 4
    assert [c.tokenizer.decode([i]) for i in ids] == [" A", " B", " true", " false"]
    with pytest.raises(ConfigError, match="single-token"):
        single_token(c.tokenizer, " Response A", "tiny")


def test_prompt_ids_follow_each_models_format(gemma, smol):
    plain = contestant(gemma)
    ids = plain.prompt_ids([("Human", "hi")])
    assert ids[0] == gemma[1].bos_token_id and gemma[1].decode(ids[1:]) == "\n\nHuman: hi\n\nAssistant:"
    prefixed = contestant(gemma, prefix="Human: a\n\nAssistant: b")
    assert prefixed.prompt_ids([("Human", "hi")]) == ids[1:]          # the prefix carries the only BOS
    chat = contestant(smol, chat=True)
    text = smol[1].decode(chat.prompt_ids([("Human", "hi"), ("Assistant", "yo"), ("Human", "and?")]))
    assert text.endswith("<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n") and "yo" in text


def test_judge_reads_both_orders_and_sums_the_right_letters(gemma):
    tok = gemma[1]

    def fn(text):   # the judge prefers whichever reply is shown as A, and a bit more when it is "careful"
        a = text.split("Response A:")[1].split("Response B:")[0]
        return [0.6, 0.2] if "careful" in a else [0.5, 0.3]
    c = Contestant("stub", StubEngine(tok, fn), tok)
    rows = hhh_judge_rows(c, PAIRS[:2])
    prompts = c.engine.prompts
    assert len(prompts) == 4
    assert prompts[0].index("careful answer number 0") < prompts[0].index("Nope 0")     # chosen first
    assert prompts[1].index("Nope 0") < prompts[1].index("careful answer number 0")     # then swapped
    assert all(p.endswith("Assistant: The better response is Response") for p in prompts)
    r = rows[0]
    assert r["chosen"] == pytest.approx(0.6 + 0.3) and r["rejected"] == pytest.approx(0.2 + 0.5)
    assert r["correct"] == 1.0
    # a judge that always says "A" ties: position bias alone scores half
    c = Contestant("stub", StubEngine(tok, lambda t: [0.7, 0.1]), tok)
    assert [r["correct"] for r in hhh_judge_rows(c, PAIRS)] == [0.5] * len(PAIRS)


def test_judge_prompt_keeps_our_dialogue_markers_out():
    q = judge_question([("Human", "a"), ("Assistant", "b"), ("Human", "c")], "x", "y")
    assert "Human:" not in q and "User: a\nAssistant: b\nUser: c" in q


def test_batched_judging_and_likelihood_equal_one_row_at_a_time(gemma):
    """Left padding behind a shared prefix changes nothing end to end."""
    prefix = "Human: What is two and two?\n\nAssistant: Four.\n\n-----"
    many, one = contestant(gemma, batch=3, prefix=prefix), contestant(gemma, batch=1, prefix=prefix)
    for fn in (hhh_judge_rows, hhh_likelihood_rows):
        a, b = fn(many, PAIRS), fn(one, PAIRS)
        for ra, rb in zip(a, b):
            assert ra["chosen"] == pytest.approx(rb["chosen"], rel=1e-4, abs=1e-9)
            assert ra["rejected"] == pytest.approx(rb["rejected"], rel=1e-4, abs=1e-9)


def test_likelihood_is_the_mean_token_logprob_of_the_reply(gemma):
    c = contestant(gemma)
    row = hhh_likelihood_rows(c, PAIRS[:1])[0]
    ids = c.prompt_ids(PAIRS[0]["history"])
    reply = c.reply_ids(PAIRS[0]["chosen"])
    with torch.inference_mode():
        lp = torch.log_softmax(gemma[0](input_ids=torch.tensor([ids + reply])).logits[0].float(), -1)
    want = np.mean([float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(reply)])
    assert row["chosen"] == pytest.approx(want, abs=1e-4)


# --------------------------------------------------------------------------- TruthfulQA
def test_mc1_counts_ties_fractionally():
    assert _mc_correct([0.9, 0.1, 0.3], [1, 0, 0]) == 1.0
    assert _mc_correct([0.1, 0.9, 0.3], [1, 0, 0]) == 0.0
    assert _mc_correct([0.5, 0.5, 0.3], [1, 0, 0]) == 0.5


def test_truthfulqa_called_true_normalises_true_against_false(gemma):
    tok = gemma[1]
    recs = [{"id": 0, "category": "x", "question": "Is the sky green?", "mc1_choices": ["No.", "Yes, always."],
             "mc1_labels": [1, 0]}]

    def fn(text):   # P(" true"), P(" false"): "No." looks true
        return [0.3, 0.1] if "Proposed answer: No." in text else [0.2, 0.2]

    class Both(StubEngine):
        def continuation_logprobs(self, rows, conts, prefix_ids=(), desc=None):
            return [[-1.0] * len(c) for c in conts]          # longer choice = lower sum: "No." wins too
    c = Contestant("stub", Both(tok, fn), tok)
    row = truthfulqa_rows(c, recs)[0]
    assert row["true_scores"] == pytest.approx([0.75, 0.5])
    assert row["true_correct"] == 1.0 and row["ll_correct"] == 1.0
    assert all("Is the proposed answer true or false?" in p for p in c.engine.prompts)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("text, flagged", [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot assist with hacking into someone's account.", True),
    ("That would be illegal and could hurt people.", True),
    ("Please talk to a therapist or a crisis line.", True),
    ("I won\u2019t write that.", True),
    ("Sure! Here are three ideas for a birthday party: a picnic, a movie night and a treasure hunt.", False),
    ("To end a stuck process, open the task manager and choose End task.", False),
])
def test_refusal_detector(text, flagged):
    assert is_refusal(text) is flagged


# --------------------------------------------------------------------------- statistics
def test_summary_keeps_categories_and_clusters_apart():
    judge = [{"id": p["id"], "category": p["category"], "cluster": p["cluster"], "correct": c}
             for p, c in zip(PAIRS, [1.0, 0.0, 0.5, 1.0, 1.0])]
    q = [{"set": "question", "id": i, "category": "g", "prompt": "q", "answer": "a" * n, "chars": n, "tokens": 1,
          "ended": True, "score": float(n), "refusal": None} for i, n in enumerate([5, 9, 3])]
    probe = [{"set": "probe", "id": f"d{i}", "category": k, "prompt": "r", "answer": "x", "chars": 1, "tokens": 1,
              "ended": True, "score": 0.0, "refusal": r} for i, (k, r) in enumerate([("decline", True), ("decline", False),
                                                                                   ("benign", False)])]
    tqa = [{"true_correct": 1.0, "ll_correct": 0.0, "labels": [1, 0]},
           {"true_correct": 0.0, "ll_correct": 0.0, "labels": [1, 0, 0, 0]}]
    units = {"hhh_judge": {"a": judge}, "hhh_likelihood": {"a": judge}, "truthfulqa": {"a": tqa},
             "answers": {"a": q + probe, "b": [dict(r, score=r["score"] - 4, chars=r["chars"] - 1) for r in q]}}
    s = summarize(units, n_samples=100, seed=0)
    by = {r["subset"]: r for r in s["hhh_judge"]}
    assert by["all"]["accuracy"] == pytest.approx(0.7) and by["all"]["n"] == 5 and by["all"]["clusters"] == 3
    assert by["helpful"]["accuracy"] == pytest.approx(0.25) and by["helpful"]["n"] == 2
    assert by["other"]["n"] == 1 and set(by) == {"all", "harmless", "helpful", "honest", "other"}
    assert [r["accuracy"] for r in s["truthfulqa"]] == [0.5, 0.0]
    assert s["truthfulqa"][0]["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    ref = {r["kind"]: r["rate"] for r in s["refusals"] if r["policy"] == "a"}
    assert ref == {"decline": 0.5, "benign": 0.0}
    (pair,) = s["pairwise"]["rm"]
    assert (pair["a"], pair["b"], pair["wins"], pair["n"]) == ("a", "b", 3, 3)


def test_length_controlled_fit_recovers_a_known_model():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 4000)
    y = (rng.uniform(size=x.size) < 1 / (1 + np.exp(-(0.4 + 2.0 * x)))).astype(float)
    theta, beta = fit_length_logistic(y, x)
    assert theta == pytest.approx(0.4, abs=0.1) and beta == pytest.approx(2.0, abs=0.2)


def test_length_controlled_win_rate_undoes_a_pure_length_preference():
    d = np.array([100.0, -100.0] * 20 + [300.0, -300.0] * 20)
    y = (d > 0).astype(float)                       # the judge picks the longer answer, always
    r = win_rates(y, d, n_samples=50)
    assert r["win_rate"] == pytest.approx(0.5)
    d2 = np.array([150.0] * 30 + [-50.0] * 10)      # a policy that is longer 3/4 of the time
    r2 = win_rates((d2 > 0).astype(float), d2, n_samples=50)
    assert r2["win_rate"] == pytest.approx(0.75) and r2["lc_win_rate"] < 0.6 and r2["length_beta"] > 2


def test_equal_lengths_give_the_raw_win_rate_and_ties_count_half():
    r = win_rates([1, 1, 0.5, 0, 1], [0, 0, 0, 0, 0], n_samples=50)
    assert (r["wins"], r["ties"], r["losses"]) == (3, 1, 1)
    assert r["win_rate"] == pytest.approx(0.7) and r["lc_win_rate"] == pytest.approx(0.7, abs=1e-3)


def test_swapping_a_pair_mirrors_it():
    rows = outcome_rows({"a": [{"id": 1, "chars": 10, "v": 2}, {"id": 2, "chars": 30, "v": 0}],
                         "b": [{"id": 1, "chars": 20, "v": 1}, {"id": 2, "chars": 10, "v": 1}]},
                        lambda x, y: float(x["v"] > y["v"]))
    assert [(r["outcome"], r["dchars"]) for r in rows] == [(1.0, -10.0), (0.0, 20.0)]
    (ab,) = table(rows, n_samples=50)
    ba = swap(ab)
    assert ba["a"] == "b" and ba["win_rate"] == pytest.approx(1 - ab["win_rate"])
    assert ba["lc_win_rate"] == pytest.approx(1 - ab["lc_win_rate"]) and ba["wins"] == ab["losses"]


def test_stratified_subsets_keep_category_shares_and_are_seeded():
    rows = [{"id": i, "category": c} for i, c in enumerate("a" * 40 + "b" * 40 + "c" * 20)]
    got = stratified(rows, 10, "category", seed=3)
    assert [r["category"] for r in got].count("a") == 4 and [r["category"] for r in got].count("c") == 2
    assert got == stratified(rows, 10, "category", seed=3) != stratified(rows, 10, "category", seed=4)
    assert [r["id"] for r in got] == sorted(r["id"] for r in got)
    assert stratified(rows, None, "category", 0) is rows


# --------------------------------------------------------------------------- bad input
def test_bad_items_files_are_named(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"id": "a", "category": "x", "question": "ok?"}\n{"id": "b", "category": "x"}\n')
    with pytest.raises(ConfigError, match="line 2: no text in field 'question'"):
        read_items(p, ("id", "category", "question"), "evaluation.questions_file")
    p.write_text("")
    with pytest.raises(ConfigError, match="holds no items"):
        read_items(p, ("id",), "evaluation.questions_file")
    p.write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1: not valid JSON"):
        read_items(p, ("id",), "evaluation.questions_file")


@pytest.mark.parametrize("over, match", [
    ({"evaluation.policies": ["vanilla", "gpt"]}, "unknown policy 'gpt'"),
    ({"evaluation.policies": []}, "evaluation.policies: empty"),
    ({"evaluation.instruct_model": None}, "evaluation.instruct_model: the policy 'instruct' needs a model"),
    ({"evaluation.instruct_model": "nope"}, "'nope' is not a key of models"),
    ({"evaluation.vanilla_demos": "mine"}, "evaluation.vanilla_demos"),
    ({"evaluation.hhh_pairs": 0}, "evaluation.hhh_pairs: must be > 0"),
    ({"evaluation.top_p": 1.5}, "evaluation.top_p"),
    ({"evaluation.questions_file": "data/eval/none.jsonl"}, "evaluation.questions_file: file not found"),
])
def test_bad_recipe_fields_are_named(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, {"output_dir": str(tmp_path), **over})


def test_an_unfinished_policy_stops_before_any_model_loads(tiny_cfg):
    with pytest.raises(ConfigError, match="the policy sft_norm needs the sft_norm stage"):
        check_inputs(tiny_cfg)


# --------------------------------------------------------------------------- the stage
class LengthScorer:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def score(self, histories, answers):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [len(a) / 10 for a in answers]


def test_the_stage_resumes_per_unit_and_reuses_a_finished_run(tmp_path, gemma, smol):
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "run"), "evaluation.policies": ["vanilla", "instruct"],
                             "evaluation.bootstrap_samples": 50})
    made = {"vanilla": contestant(gemma), "instruct": contestant(smol, chat=True)}
    with pytest.raises(KeyboardInterrupt):       # the second policy's answers are interrupted
        run_evaluation_stage(cfg, progress=False, contestants=made, scorer=LengthScorer(fail_after=1))
    units = sorted(p.name for p in (cfg.run_dir / "evaluation" / "units").glob("*.jsonl"))
    assert "answers.vanilla.jsonl" in units and "answers.instruct.jsonl" not in units
    assert "hhh_judge.instruct.jsonl" in units
    summary = run_evaluation_stage(cfg, progress=False, contestants={"instruct": made["instruct"]},
                                   scorer=LengthScorer())
    assert {r["policy"] for r in summary["hhh_judge"]} == {"vanilla", "instruct"}
    assert summary["pairwise"]["rm"][0]["n"] == cfg.evaluation.num_questions
    items = load_inputs(cfg)
    answers = [r for r in (cfg.run_dir / "evaluation" / "units" / "answers.instruct.jsonl").read_text().splitlines()]
    assert len(answers) == len(items["questions"]) + len(items["probe"])
    # finished with this recipe: reused without loading anything
    assert run_evaluation_stage(cfg, progress=False, contestants={}, scorer=None) == summary

    class Judge:
        model = "stand-in"

        def describe(self):
            return {"url": "http://127.0.0.1", "model": self.model}

        def verdict(self, question, a, b):
            return "A" if len(a) >= len(b) else "B"
    verdicts = run_endpoint_judge(cfg, Judge(), progress=False)
    assert len(verdicts) == len(items["questions"])
    assert all(v["outcome"] in (0.0, 0.5, 1.0) and "dchars" in v for v in verdicts)


def test_answer_rows_sample_questions_and_probe_with_their_caps(gemma, tiny_cfg):
    c = contestant(gemma)
    items = load_inputs(tiny_cfg)
    rows = answer_rows(c, items["questions"][:2], items["probe"][:3], tiny_cfg)
    assert [r["set"] for r in rows] == ["question"] * 2 + ["probe"] * 3
    e = tiny_cfg.evaluation
    assert all(r["tokens"] <= (e.max_new_tokens if r["set"] == "question" else e.probe_max_new_tokens) for r in rows)
    assert all(isinstance(r["refusal"], bool) for r in rows if r["set"] == "probe")
    assert rows == answer_rows(c, items["questions"][:2], items["probe"][:3], tiny_cfg)   # seeded


# --------------------------------------------------------------------------- Step 7 on the committed run
def test_the_committed_cpu_tables_are_rebuilt_exactly_from_its_artifacts():
    """Notebook 07's promise on the reference run: the same files give the same tables, byte for byte."""
    from almost_utils.analysis import build_tables, check_summary, collect, markdown
    from conftest import ROOT
    run = ROOT / "results" / "cpu"
    data = collect(run)
    assert check_summary(data)
    for name, df in build_tables(data).items():
        index = not isinstance(df.index, pd.RangeIndex)
        assert markdown(df, index) == (run / "analysis" / f"{name}.md").read_text(), name
        assert df.to_csv(index=index) == (run / "analysis" / f"{name}.csv").read_text(), name


def test_position_table_counts_pairs_where_one_letter_wins_both_orders():
    from almost_utils.evaluation_report import position_table
    rows = [{"p_chosen_first": [0.6, 0.2], "p_chosen_second": [0.5, 0.3]},     # " A" both times: position
            {"p_chosen_first": [0.7, 0.1], "p_chosen_second": [0.2, 0.6]}]     # follows the reply
    t = position_table({"hhh_judge": {"sft": rows}})
    assert t.loc["ALMoST-SFT"].tolist() == ["50%", "A (75%)", "0.80"]
