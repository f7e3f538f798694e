"""Step 4's comparison on held-out queries (almost_utils/answers.py) and Step 3's report arithmetic.

Stand-in policies (a real tokenizer, text chosen per policy and query) and a stand-in scorer keep
these tests fast; notebooks 03-04 run the real tiny models (tests/test_notebook03_04.py).
"""
import itertools
import random

import numpy as np
import pytest

from almost_utils import answers as A
from almost_utils.artifacts import read_json, write_json, write_jsonl
from almost_utils.config import ConfigError, load_config
from almost_utils.fingerprint import stage_status
from almost_utils.models import load_tokenizer
from almost_utils.rmsp_report import best_of_k, best_of_k_weights, best_of_n_curve
from conftest import TINY, claim_upstream

UPSTREAM = ("queries", "comparisons", "reward_model", "splits", "rmsp", "sft", "sft_norm")


def _cfg(out, **extra):
    return load_config(TINY, {"output_dir": str(out), **extra})


def _finished_sft(out, **extra):
    """A tiny run whose Steps 0-4 count as finished: hand-made held-out queries and adapter records."""
    cfg = _cfg(out, **extra)
    claim_upstream(cfg, UPSTREAM)
    write_jsonl(cfg.run_dir / "splits" / "queries.jsonl",
                [{"id": 100 + i, "query": f"How do I fix a {w} at home?", "round": 1, "split": "heldout"}
                 for i, w in enumerate(["tap", "door", "bike", "lamp"])])
    for variant in ("sft", "sft_norm"):
        write_json(cfg.run_dir / variant / "adapter" / "policy.json", {"train": {"variant": variant}})
    return cfg


class StandInPolicy:
    """Answers depend on (policy, query, sample index); ``runaway`` answers never stop (cap hit)."""

    def __init__(self, name, tok, runaway=False, fail=False):
        self.name, self.tokenizer, self.runaway, self.fail, self.calls = name, tok, runaway, fail, []

    def generate_tokens(self, queries, params, prefix="", desc=None):
        if self.fail:
            raise KeyboardInterrupt
        self.calls.append((list(queries), prefix))
        out, seen = [], {}
        for q in queries:
            seen[q] = k = seen.get(q, -1) + 1
            if self.runaway:
                ids = self.tokenizer(" word" * 50, add_special_tokens=False).input_ids[:params.max_new_tokens]
            else:
                words = " ".join(["indeed"] * (len(self.name) + k))
                ids = self.tokenizer(f" {self.name} answer {k}: {words}.\nHuman: more", add_special_tokens=False).input_ids
            out.append(ids)
        return out


class StandInScorer:
    def __init__(self):
        self.calls = 0

    def score(self, histories, responses):
        self.calls += 1
        return [len(r) / 100 + (0.5 if "sft answer" in r else 0.0) for r in responses]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(_cfg("unused").models["large"])


def _policies(tok, **kw):
    return {name: (StandInPolicy(name, tok, **kw.get(name, {})), "PREFIX" if name == "vanilla" else "")
            for name in A.STAGE_POLICIES[A.STAGE]}


# --------------------------------------------------------------------------- statistics
def test_summary_means_and_paired_differences_by_hand():
    rows = []
    for policy, scores in (("sft", [1.0, 2.0, 3.0, None]), ("sft_norm", [0.0, 1.0, 1.0, 2.0])):
        for (qid, sample), score in zip(itertools.product([1, 2], [0, 1]), scores):
            rows.append({"policy": policy, "query_id": qid, "sample": sample, "answer": "x" if score is not None else "",
                         "score": score, "chars": 10 * (qid + sample) + (5 if policy == "sft" else 0),
                         "tokens": 3, "ended": sample == 0})
    s = A.summarize(rows, n_samples=200, seed=0)
    sft = s["policies"]["sft"]
    assert sft["n"] == 4 and sft["clusters"] == 2 and sft["empty"] == 1
    assert sft["score"]["mean"] == pytest.approx(2.0)                 # the empty answer's score is missing
    assert sft["chars"]["mean"] == pytest.approx((15 + 25 + 25 + 35) / 4)
    assert sft["ended"]["mean"] == pytest.approx(0.5)
    assert sft["score"]["ci_low"] <= 2.0 <= sft["score"]["ci_high"]
    d = s["differences"]["sft - sft_norm"]
    assert d["score"]["n"] == 3 and d["score"]["mean"] == pytest.approx((1 + 1 + 2) / 3)   # paired on 3 items
    assert d["chars"]["mean"] == pytest.approx(5.0) and d["chars"]["ci_low"] == d["chars"]["ci_high"] == 5.0
    assert "sft - vanilla" not in s["differences"]                      # no vanilla rows


def test_answer_rows_cut_at_stop_strings_and_flag_the_cap(tok):
    from almost_utils.sampling import SamplingParams
    from almost_utils.dialogue import STOP_STRINGS
    queries = [{"id": 1, "query": "Why is the sky blue?"}]
    params = SamplingParams(max_new_tokens=20, stop=STOP_STRINGS)
    rows = A.answer_rows("sft", StandInPolicy("sft", tok), queries, params, samples=2)
    assert [r["sample"] for r in rows] == [0, 1] and all(r["ended"] for r in rows)
    assert rows[0]["answer"] == "sft answer 0: indeed indeed indeed." and "Human" not in rows[1]["answer"]
    assert rows[0]["tokens"] == len(tok(rows[0]["answer"], add_special_tokens=False).input_ids)
    capped = A.answer_rows("sft", StandInPolicy("sft", tok, runaway=True), queries, params, samples=1)
    assert capped[0]["ended"] is False and capped[0]["tokens"] == 20


# --------------------------------------------------------------------------- the stage
def test_stage_scores_every_answer_resumes_per_policy_and_is_reused(tmp_path, tok):
    whole = _finished_sft(tmp_path / "whole")
    ref = A.run_answers_stage(whole, progress=False, scorer=StandInScorer(), policies=_policies(tok))
    n = len(A.check_inputs(whole, need_rm_weights=False)[0])
    assert len(ref) == 3 * n * whole.answers.samples
    assert {r["policy"] for r in ref} == set(A.STAGE_POLICIES[A.STAGE]) and all(r["score"] is not None for r in ref)
    summary = read_json(whole.run_dir / A.STAGE / "summary.json")
    assert summary["differences"]["sft - sft_norm"]["score"]["mean"] > 0      # the stand-in RM likes "sft answer"
    man = read_json(whole.run_dir / A.STAGE / "manifest.json")
    assert man["counts"]["answers"] == len(ref) and "sft_sampling" in man["timings_s"]

    cfg = _finished_sft(tmp_path / "cut")
    pols = _policies(tok, sft={"fail": True})                                  # killed while ALMoST-SFT samples
    with pytest.raises(KeyboardInterrupt):
        A.run_answers_stage(cfg, progress=False, scorer=StandInScorer(), policies=pols)
    assert stage_status(cfg, A.STAGE) == "resume"
    assert sorted(p.stem for p in (cfg.run_dir / A.STAGE / "units").glob("*.jsonl")) == ["sft_norm", "vanilla"]
    again = _policies(tok)
    rows = A.run_answers_stage(cfg, progress=False, scorer=StandInScorer(), policies=again)
    assert not again["vanilla"][0].calls and not again["sft_norm"][0].calls   # finished units are read back
    assert rows == ref
    assert again["vanilla"][1] == "PREFIX"
    assert A.run_answers_stage(cfg, progress=False, scorer=StandInScorer(), policies={}) == ref   # reused


def test_bad_input_stops_before_any_model_loads(tmp_path, monkeypatch):
    import almost_utils.sft as sft

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(sft, "load_policy", refuse)
    cfg = _cfg(tmp_path / "no_sft")
    claim_upstream(cfg, UPSTREAM[:-1])                                      # sft_norm never trained
    with pytest.raises(ConfigError, match=r"sft_norm stage has not finished"):
        A.run_answers_stage(cfg, progress=False)
    cfg = _finished_sft(tmp_path / "no_rm_files")
    with pytest.raises(ConfigError, match=r"reward model's adapter is missing"):
        A.run_answers_stage(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"answers.split: unknown split 'test'"):
        _cfg(tmp_path / "x", **{"answers.split": "test"})
    with pytest.raises(ConfigError, match=r"answers.num_queries: 9 asked, but the heldout split holds 4"):
        _cfg(tmp_path / "x", **{"answers.num_queries": 9})
    with pytest.raises(ConfigError, match=r"answers.top_p: must be in \(0, 1\]"):
        _cfg(tmp_path / "x", **{"answers.top_p": 0})
    with pytest.raises(ConfigError, match=r"answers.samples: must be > 0"):
        _cfg(tmp_path / "x", **{"answers.samples": 0})


# --------------------------------------------------------------------------- best of k (Step 3's report)
def test_best_of_k_is_the_exact_mean_over_every_k_subset():
    rng = random.Random(0)
    for n in range(1, 7):
        cands = [{"text": "t" * rng.randint(1, 9), "score": rng.choice([0.1, 0.2, 0.3, rng.random()]),
                  "chars": rng.randint(1, 300)} for _ in range(n)]
        for k in range(1, n + 1):
            for key, by in (("score", "score"), ("chars", "score"), ("score", "chars")):
                subsets = list(itertools.combinations(range(n), k))
                # the pickers' rule: the highest ``by``, the first candidate on ties
                picks = [min(s, key=lambda i: (-cands[i][by], i)) for s in subsets]
                brute = np.mean([cands[i][key] for i in picks])
                assert best_of_k(cands, k, key, by) == pytest.approx(brute), (n, k, key, by)
        assert best_of_k_weights(n, n)[-1] == 1.0 and best_of_k_weights(n, 1).sum() == pytest.approx(1.0)


def test_best_of_n_curve_starts_at_the_mean_candidate_and_ends_at_the_kept_one():
    recs = [{"turn": 0, "picks": {"rm": 1}, "candidates": [
        {"text": "aa", "score": 0.1, "chars": 2}, {"text": "bbbb", "score": 0.9, "chars": 4},
        {"text": "", "score": None, "chars": 0}]},
            {"turn": 0, "picks": {"rm": 0}, "candidates": [
        {"text": "c", "score": 0.5, "chars": 1}, {"text": "dddddd", "score": 0.3, "chars": 6},
        {"text": "ee", "score": 0.4, "chars": 2}]},
            {"turn": 1, "picks": {"rm": 0}, "candidates": [{"text": "z", "score": 5.0, "chars": 1}]}]
    curve = best_of_n_curve(recs, n_samples=100)
    assert [r["k"] for r in curve] == [1, 2, 3]
    assert curve[0]["rm_score"] == pytest.approx(((0.1 + 0.9) / 2 + (0.5 + 0.3 + 0.4) / 3) / 2)
    assert curve[-1]["rm_score"] == pytest.approx((0.9 + 0.5) / 2)         # every candidate seen: the RM's pick
    assert curve[-1]["longest_score"] == pytest.approx((0.9 + 0.3) / 2)
    assert curve[-1]["rm_chars"] == pytest.approx((4 + 1) / 2)
