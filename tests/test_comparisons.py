import statistics

import pytest

from almost_utils.artifacts import read_json, read_jsonl
from almost_utils.comparisons import (Candidate, bad_reason, build_comparisons, build_pairs, configurations,
                                      heuristic_filter_keep, judge_response, pair_down_rubric,
                                      trim_to_last_sentence)

GOOD = "Brush twice a day, floss once, and see a dentist every six months or so."


@pytest.mark.parametrize("text, reason", [
    (GOOD, None),
    ("Sure thing!  This is a fine answer that is long enough to count, really!", None),
    ("Too short.", "too short"),
    ("Is there anything else that you would like me to explain about this topic?", "ends with ? or :"),
    ("Here are the steps you should follow to get this done, in order:", "ends with ? or :"),
    ("Well, it mostly depends on your budget and on how much time you can spare.", "starts with well"),
    ("WELL that is a hard one, but I would start with a budget and a plan for it.", "starts with well"),
    ("It might rain tomorrow but honestly I don't know what the forecast says today.", "says it does not know"),
    ("It might rain tomorrow but honestly I do not know what the forecast says today.", "says it does not know"),
    ("The answer goes on and on without ever finishing its final sentence properly", "no final . or !"),
    ("Sure, here it is. Human: thanks! Assistant: you are welcome, anything else.", "new speaker turn"),
])
def test_bad_response_rules(text, reason):
    assert bad_reason(text) == reason


def test_bad_rules_edge_of_length():
    assert bad_reason("x" * 49 + ".") is None            # 50 characters: kept
    assert bad_reason("x" * 48 + ".") == "too short"     # 49: dropped
    assert bad_reason("  " + "x" * 48 + ".  ") == "too short"   # whitespace does not count
    assert bad_reason("no final stop at all but long enough to pass the length rule",
                      require_final_punctuation=False) is None


@pytest.mark.parametrize("text, trimmed", [
    ("First point. Second point! And a third that never ends", "First point. Second point!"),
    ("Already finished.", "Already finished."),
    ("No sentence end anywhere", "No sentence end anywhere"),
    ("Version 2.5 is out and it is", "Version 2.5 is out and it is"),   # a decimal point is no sentence end
    ("Done. ", "Done."),
])
def test_trim_to_last_sentence(text, trimmed):
    assert trim_to_last_sentence(text) == trimmed


def test_trimming_is_a_switch(tiny_cfg):
    c = tiny_cfg.comparisons
    c.require_final_punctuation, c.min_chars = True, 10
    raw = "A finished sentence here. And then it stops mid"
    assert judge_response(raw, c) == (raw, "no final . or !")
    c.trim_to_last_sentence = True
    assert judge_response(raw, c) == ("A finished sentence here.", None)


def cands(*spec):
    return [Candidate(f"c{i}", rank, "r" * (10 + i)) for i, rank in enumerate(spec)]


def names(pairs):
    return [(a.config, b.config) for a, b in pairs]


def test_chain_pairing_without_ties():
    assert names(pair_down_rubric(cands(0, 1, 2, 3))) == [("c0", "c1"), ("c1", "c2"), ("c2", "c3")]


def test_ties_are_never_compared_and_each_chosen_once():
    # ranks: A > (B1 = B2) > C
    pairs = names(pair_down_rubric(cands(0, 1, 1, 2)))
    assert pairs == [("c0", "c1"), ("c1", "c3"), ("c2", "c3")]
    chosen = [a for a, _ in pairs]
    assert len(chosen) == len(set(chosen)) and len(pairs) <= 3


def test_missing_middle_config_skips_a_rank():
    pairs = names(pair_down_rubric([Candidate("a", 0, "x"), Candidate("d", 3, "y")]))
    assert pairs == [("a", "d")]
    assert pair_down_rubric([Candidate("a", 0, "x"), Candidate("b", 0, "y")]) == []
    assert pair_down_rubric([]) == []


def test_heuristic_filter_formula_edges():
    lengths = [100, 200, 300]          # M = 200, S = 81.65, M - S/2 = 159.18
    m, s = statistics.fmean(lengths), statistics.pstdev(lengths)
    cut = m - s / 2
    assert heuristic_filter_keep(100, 300, lengths) is False     # shorter and unusually short
    assert heuristic_filter_keep(300, 100, lengths) is True      # longer chosen is trusted
    assert heuristic_filter_keep(160, 300, lengths) is True      # shorter but not unusually short
    assert heuristic_filter_keep(int(cut), 300, lengths) is False
    assert heuristic_filter_keep(100, 100, lengths) is True      # equal length: not "shorter"
    assert heuristic_filter_keep(150, 150, [150, 150]) is True   # S = 0: nothing is below M


def test_build_pairs_applies_filter_and_records_configs():
    queries = [{"id": 0, "query": "q?"}]
    rows = lambda text, bad=None: {0: {"query_id": 0, "response": text, "bad": bad}}
    responses = {"A": rows("a" * 60), "B": rows("b" * 400), "C": rows("c" * 300), "D": rows("zzz", "too short")}
    ranks = {"A": 0, "B": 1, "C": 2, "D": 3}
    all_pairs, kept = build_pairs(queries, responses, ranks)
    assert [(p["chosen_config"], p["rejected_config"]) for p in all_pairs] == [("A", "B"), ("B", "C")]
    # A (60 chars) is shorter than B and below M - S/2 of (60, 400, 300): dropped
    assert [(p["chosen_config"], p["rejected_config"]) for p in kept] == [("B", "C")]
    assert set(kept[0]) == {"query_id", "prompt", "chosen", "rejected", "chosen_config", "rejected_config"}


def _answer(prefix, prompt, seed):
    q = prompt.split("Human:")[-1].split("\n")[0].strip()
    n = prefix.count("-----")
    return f"A considered reply number {n} to '{q}' with seed parity {seed % 7}." + " More." * n


def test_resume_after_interruption(tiny_cfg, echo_engine, monkeypatch):
    import almost_utils.comparisons as comp
    monkeypatch.setattr(comp, "CHUNK_QUERIES", 2)
    from almost_utils.config import load_config
    from conftest import TINY, mine_queries
    tiny_cfg = load_config(TINY, {"output_dir": str(tiny_cfg.run_dir), "queries.num_queries": 5})
    mine_queries(tiny_cfg, echo_engine)
    engines_ok = {k: echo_engine(_answer) for k in tiny_cfg.models}
    reference = build_comparisons(tiny_cfg, engines_ok, progress=False)
    done_dir = tiny_cfg.run_dir

    # a second run in a fresh folder, interrupted after 4 chunk calls of the first model
    cfg2 = load_config(TINY, {"output_dir": str(done_dir.parent / "run2"), "queries.num_queries": 5})
    mine_queries(cfg2, echo_engine)
    flaky = {"large": echo_engine(_answer, fail_after=4), "small": echo_engine(_answer)}
    with pytest.raises(KeyboardInterrupt):
        build_comparisons(cfg2, flaky, progress=False)
    saved = list((cfg2.run_dir / "comparisons" / "responses").glob("*.jsonl"))
    assert len(saved) == 4 and not (cfg2.run_dir / "comparisons" / "pairs.jsonl").exists()
    resumed = {k: echo_engine(_answer) for k in cfg2.models}
    pairs = build_comparisons(cfg2, resumed, progress=False)
    # only the unfinished chunks were sampled again: 3 configs of "large" x 3 chunks - 4 done
    assert resumed["large"].calls == 9 - 4
    assert pairs == reference
    assert read_jsonl(cfg2.run_dir / "comparisons" / "pairs_no_hf.jsonl") == \
        read_jsonl(done_dir / "comparisons" / "pairs_no_hf.jsonl")
    # sampling time is kept per unit, so the manifest counts both sessions, not just the resumed one
    timings = read_json(cfg2.run_dir / "comparisons" / "responses" / "timings.json")
    assert sorted(timings) == sorted(p.stem for p in (cfg2.run_dir / "comparisons" / "responses").glob("*.jsonl"))
    manifest = read_json(cfg2.run_dir / "comparisons" / "manifest.json")
    assert manifest["timings_s"]["sampling_all_sessions"] == pytest.approx(sum(timings.values()), abs=0.01)
    assert set(manifest["counts"]["sampling_s_per_config"]) == {c.name for c in configurations(cfg2)}
