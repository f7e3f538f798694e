"""Reward model: encoding, training on a separable toy set, save/reload, scoring, evaluation helpers."""
import json
import math

import numpy as np
import pytest

from almost_utils import rm_eval
from almost_utils.config import load_config
from almost_utils.reward import (RewardScorer, encode, ensure_reward_pad_token, find_reward_model, load_reward_model,
                                 train_reward_model)
from almost_utils.reward_stage import heldout_rows, split_queries, training_rows
from conftest import ROOT, TINY
from rm_toy import toy_pairs

SMOL = ROOT / "data" / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """One tiny RM trained on separable toy pairs, shared by the tests below (~20 s)."""
    out = tmp_path_factory.mktemp("rm")
    cfg = load_config(TINY, {"output_dir": str(out), "reward_model.logging_steps": 1,
                             "reward_model.learning_rate": 3e-3, "reward_model.lora_layers": 1})
    pairs, _ = toy_pairs(16, seed=0)
    train, held = pairs[:24], pairs[24:]
    summary, scorer = train_reward_model(cfg, train, held, out / "rm", progress=False, return_scorer=True)
    return {"cfg": cfg, "summary": summary, "scorer": scorer, "folder": out / "rm", "held": held, "train": train}


def test_training_lowers_the_loss_on_a_separable_set(tiny_rm):
    log = json.loads((tiny_rm["folder"] / "log_history.json").read_text())
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 5
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < first - 0.1, f"loss did not fall: {losses}"
    assert last < math.log(2)
    c, r = tiny_rm["scorer"].score_pairs(tiny_rm["held"], progress=False)
    assert rm_eval.pair_correct(c, r).mean() >= 0.75     # held-out toy pairs separated


def test_save_and_reload_keep_the_scores(tiny_rm):
    folder = tiny_rm["folder"]
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys()), "the score head was not saved with the adapter"
    before = tiny_rm["scorer"].score_pairs(tiny_rm["held"], progress=False)
    reloaded = load_reward_model(folder.parent)       # a run/stage folder resolves to rm/
    after = reloaded.score_pairs(tiny_rm["held"], progress=False)
    np.testing.assert_allclose(before, after, rtol=0, atol=1e-5)
    fresh = RewardScorer.untrained(tiny_rm["cfg"].models["large"], 256, "cpu", tiny_rm["cfg"].seed)
    assert not np.allclose(fresh.score_pairs(tiny_rm["held"], progress=False), after, atol=1e-3)


def test_scores_do_not_depend_on_batching_or_order(tiny_rm):
    scorer = tiny_rm["scorer"]
    hist = [[("Human", "Hi there")], [("Human", "Tell me about the sea, in detail please.")], [("Human", "x")]]
    resp = ["Hello!", "The sea is large and salty, and it covers most of the planet.", "ok"]
    one = scorer.score(hist, resp, batch_size=1, progress=False)
    three = scorer.score(hist, resp, batch_size=3, progress=False)
    rev = scorer.score(hist[::-1], resp[::-1], batch_size=2, progress=False)[::-1]
    np.testing.assert_allclose(one, three, atol=1e-5)
    np.testing.assert_allclose(one, rev, atol=1e-5)


def test_find_reward_model_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained reward model under"):
        find_reward_model(tmp_path)


def test_encode_truncates_on_the_left_and_keeps_bos_and_eos(tiny_rm):
    tok = tiny_rm["scorer"].tokenizer
    text = "\n\nHuman: " + "word " * 200 + "\n\nAssistant: the very end"
    ids = encode(tok, text, 32)
    assert len(ids) == 32
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]).endswith("the very end")
    short = encode(tok, "hi", 32)
    assert short[0] == tok.bos_token_id and short[-1] == tok.eos_token_id and len(short) < 32


def test_gemma_backbone_is_a_sequence_classifier_with_distinct_pad(tiny_rm):
    model = tiny_rm["scorer"].model.get_base_model()
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    assert model.score.out_features == 1
    tok = tiny_rm["scorer"].tokenizer
    assert tok.pad_token_id != tok.eos_token_id == 1


@pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="SmolLM2 not converted")
def test_pad_token_moved_off_eos_for_smollm2():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOL)
    tok.pad_token = tok.eos_token                     # what load_tokenizer does
    pad = ensure_reward_pad_token(tok)
    assert pad != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"


# --------------------------------------------------------------------------- evaluation helpers
def test_pair_correct_counts_ties_as_half():
    assert list(rm_eval.pair_correct([1, 0, 2], [0, 1, 2])) == [1.0, 0.0, 0.5]


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.array([1] * 60 + [0] * 40, dtype=float)
    a, b = rm_eval.bootstrap_ci(x, 500, seed=3), rm_eval.bootstrap_ci(x, 500, seed=3)
    assert a == b
    assert a[0] < 0.6 < a[1] and 0.45 < a[0] and a[1] < 0.75
    lo, hi = rm_eval.chance_interval(221, 2000, seed=0)
    assert 0.40 < lo < 0.5 < hi < 0.60


def test_accuracy_rows_baselines_and_categories():
    rows = [{"category": c, "chosen": "a long answer", "rejected": "short"} for c in ("x", "x", "y")]
    rows[2]["chosen"] = "s"
    out = rm_eval.accuracy_rows("b", rows, {"rm": ([1, 0, 1], [0, 1, 0])}, group_key="category",
                                n_samples=100, seed=0)
    get = {(r["subset"], r["scorer"]): r for r in out}
    assert get[("all", "rm")]["accuracy"] == pytest.approx(2 / 3)
    assert get[("x", "rm")]["accuracy"] == 0.5 and get[("y", "rm")]["accuracy"] == 1.0
    assert get[("all", "longer")]["accuracy"] == pytest.approx(2 / 3)
    assert get[("y", "longer")]["accuracy"] == 0.0
    assert get[("all", "random")]["accuracy"] == 0.5 and get[("all", "random")]["n"] == 3
    diff = rm_eval.paired_difference([1, 1, 0], [0, 1, 0], 200, 0)
    assert diff["difference"] == pytest.approx(1 / 3)


def test_split_is_by_query_and_seeded():
    pairs, no_hf = toy_pairs(20, seed=1)
    q = {r["query_id"] for r in no_hf}
    eval_q = set(split_queries(q, 0.25, seed=7))
    assert eval_q == set(split_queries(q, 0.25, seed=7)) and len(eval_q) == 5
    train = training_rows(pairs, eval_q, None, 0)
    held = heldout_rows({"rm": pairs, "rm_no_hf": no_hf}, eval_q)
    assert not {r["query_id"] for r in train} & {r["query_id"] for r in held}
    assert len(held) == 15 and sum(r["hf"] for r in held) == 10     # 2 HF pairs + 1 dropped per query
    assert len(training_rows(pairs, eval_q, 7, 0)) == 7


def test_stage_trains_once_when_the_filter_dropped_nothing(tmp_path):
    from almost_utils.artifacts import read_json, write_jsonl
    from almost_utils.reward_stage import run_reward_model_stage
    from conftest import claim_upstream
    pairs, _ = toy_pairs(8, seed=2)
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "run"), "reward_model.bootstrap_samples": 50,
                             "reward_model.hhh_dir": str(ROOT / "data" / "fixtures" / "bigbench")})
    claim_upstream(cfg)
    write_jsonl(tmp_path / "run" / "comparisons" / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "run" / "comparisons" / "pairs_no_hf.jsonl", pairs)
    metrics = run_reward_model_stage(cfg, progress=False)
    stage = tmp_path / "run" / "reward_model"
    man = read_json(stage / "manifest.json")
    assert "train_rm" in man["timings_s"] and "train_rm_no_hf" not in man["timings_s"]
    ids = [read_json(stage / v / "reward_model.json")["train"]["train_id"] for v in ("rm", "rm_no_hf")]
    assert ids[0] == ids[1]
    assert metrics["ablation"]["hhh_rm_minus_rm_no_hf"]["difference"] == 0.0
    assert not (stage / "heldout_pairs.jsonl").read_text().count('"hf": false')
