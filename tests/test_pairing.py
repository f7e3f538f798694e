"""Step-1 pairing rules: the authors' released rule (default) and our chain rule."""
import random

import pytest
import yaml

from almost_utils import comparison_report as report
from almost_utils.artifacts import read_json, read_jsonl
from almost_utils.comparisons import (PAIRING, Candidate, build_comparisons, build_pairs, configurations,
                                      heuristic_filter_keep, pair_authors, pair_chain, prompt_prefix)
from almost_utils.config import ConfigError, load_config, parse_config
from conftest import TINY, mine_queries


def cand(name, rank, length):
    return Candidate(name, rank, "x" * length)


def names(links):
    return [(a.config, b.config) for a, b in links]


def passes_filter(link, cands):
    chosen, rejected = link
    return heuristic_filter_keep(len(chosen.response), len(rejected.response), [len(c.response) for c in cands])


# --------------------------------------------------------------------------- ties
def test_tied_configs_are_never_paired_and_a_tie_rank_gives_one_chosen():
    # A > (B1 = B2) > C, equal lengths so the filter keeps everything
    cands = [cand("A", 0, 100), cand("B1", 1, 100), cand("B2", 1, 100), cand("C", 2, 100)]
    authors = pair_authors(cands)
    assert names(authors.kept) == names(authors.unfiltered) == [("A", "B1"), ("B1", "C")]
    assert authors.dropped == []
    # the chain rule lets each tied configuration be chosen once
    assert names(pair_chain(cands).kept) == [("A", "B1"), ("B1", "C"), ("B2", "C")]
    for rule in PAIRING.values():
        found = rule(cands)
        assert all({a.config, b.config} != {"B1", "B2"} for a, b in found.kept + found.unfiltered)


def test_a_tied_sibling_is_chosen_when_the_first_one_is_refused():
    # B1 is short and shorter than C: the filter refuses (B1, C); the rank is still unspent, so B2 tries
    cands = [cand("A", 0, 400), cand("B1", 1, 60), cand("B2", 1, 350), cand("C", 2, 300)]
    authors = pair_authors(cands)
    assert names(authors.dropped) == [("B1", "C")]
    assert names(authors.kept) == [("A", "B1"), ("B2", "C")]
    assert names(authors.unfiltered) == [("A", "B1"), ("B1", "C")]


def test_all_tied_or_a_single_response_gives_no_pairs():
    for rule in PAIRING.values():
        for cands in ([], [cand("A", 0, 100)], [cand("A", 1, 60), cand("B", 1, 500)]):
            found = rule(cands)
            assert found.kept == found.unfiltered == found.dropped == []


# --------------------------------------------------------------------------- the filter
def test_a_filtered_link_is_retried_under_authors_and_lost_under_chain():
    # M = 170, S = 162.7, M - S/2 = 88.7: A (60) is shorter than B and unusually short -> refused;
    # against C (50) it is the longer one, so the retry is kept
    cands = [cand("A", 0, 60), cand("B", 1, 400), cand("C", 2, 50)]
    authors, chain = pair_authors(cands), pair_chain(cands)
    assert names(authors.dropped) == names(chain.dropped) == [("A", "B")]
    assert names(authors.kept) == [("A", "C"), ("B", "C")]
    assert names(chain.kept) == [("B", "C")]
    assert names(authors.unfiltered) == names(chain.unfiltered) == [("A", "B"), ("B", "C")]


def test_a_retry_can_be_refused_too():
    # A is refused against B and C, and only kept against the even shorter D
    cands = [cand("A", 0, 60), cand("B", 1, 400), cand("C", 2, 350), cand("D", 3, 55)]
    authors = pair_authors(cands)
    assert names(authors.dropped) == [("A", "B"), ("A", "C")]
    assert names(authors.kept) == [("A", "D"), ("B", "C"), ("C", "D")]


@pytest.mark.parametrize("rule", sorted(PAIRING))
def test_random_queries_respect_the_rules(rule):
    rng = random.Random(7)
    for _ in range(400):
        k = rng.randint(0, 7)
        cands = [cand(f"c{i}", rng.randint(0, 3), rng.randint(50, 500)) for i in range(k)]
        found = PAIRING[rule](cands)
        for links in (found.kept, found.unfiltered):
            assert len(links) <= max(k - 1, 0)
            assert all(a.rank < b.rank for a, b in links)
        assert all(passes_filter(link, cands) for link in found.kept)
        assert not any(passes_filter(link, cands) for link in found.dropped)
        if rule == "authors":
            for links in (found.kept, found.unfiltered):
                chosen_ranks = [a.rank for a, _ in links]
                assert len(chosen_ranks) == len(set(chosen_ranks))
            # filter off: one pair per rank present, down the rubric
            assert len(found.unfiltered) == max(len({c.rank for c in cands}) - 1, 0)
        else:
            assert len({a.config for a, _ in found.unfiltered}) == len(found.unfiltered)
            # the filter only removes links: kept and dropped split the unfiltered ones
            assert sorted(names(found.kept) + names(found.dropped)) == sorted(names(found.unfiltered))


# --------------------------------------------------------------------------- rows and recipe
def test_build_pairs_rows_per_rule_and_unknown_rule():
    queries = [{"id": 3, "query": "q?"}]
    rows = lambda text, bad=None: {3: {"query_id": 3, "response": text, "bad": bad}}
    responses = {"A": rows("a" * 60), "B": rows("b" * 400), "C": rows("c" * 50), "D": rows("zz", "too short")}
    ranks = {"A": 0, "B": 1, "C": 2, "D": 3}
    all_a, kept_a = build_pairs(queries, responses, ranks, "authors")
    all_c, kept_c = build_pairs(queries, responses, ranks, "chain")
    pick = lambda ps: [(p["chosen_config"], p["rejected_config"]) for p in ps]
    assert pick(kept_a) == [("A", "C"), ("B", "C")] and pick(kept_c) == [("B", "C")]
    assert pick(all_a) == pick(all_c) == [("A", "B"), ("B", "C")]
    assert kept_a[0] == {"query_id": 3, "prompt": "q?", "chosen": "a" * 60, "rejected": "c" * 50,
                         "chosen_config": "A", "rejected_config": "C"}
    with pytest.raises(ValueError, match=r"comparisons\.pairing: unknown rule 'best'"):
        build_pairs(queries, responses, ranks, "best")


def test_pairing_field_default_and_validation():
    data = yaml.safe_load(TINY.read_text())
    data["comparisons"].pop("pairing", None)
    assert parse_config(data).comparisons.pairing == "authors"
    data["comparisons"]["pairing"] = "chain"
    assert parse_config(data).comparisons.pairing == "chain"
    data["comparisons"]["pairing"] = "best"
    with pytest.raises(ConfigError, match=r"comparisons\.pairing: must be one of \('authors', 'chain'\), got 'best'"):
        parse_config(data)
    data["comparisons"]["pairing"] = 1
    with pytest.raises(ConfigError, match=r"comparisons\.pairing: expected a string"):
        parse_config(data)


# --------------------------------------------------------------------------- Step 1 end to end
LENGTHS = {0: 60, 1: 400, 2: 350, 3: 300, 4: 55}   # by position in the tiny rubric (ranks 0, 1, 2, 2, 3)


def _engines(cfg, echo_engine):
    """Fake samplers whose answer length depends only on the configuration (its model + prefix)."""
    length = {(conf.model, prompt_prefix(cfg, conf)): LENGTHS[i] for i, conf in enumerate(configurations(cfg))}
    make = lambda model: echo_engine(lambda prefix, prompt, seed: "a" * length[(model, prefix)])
    return {key: make(key) for key in cfg.models}


@pytest.mark.parametrize("rule", ["authors", "chain"])
def test_build_comparisons_writes_the_recipe_rule_and_counts_both(tmp_path, echo_engine, rule):
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "run"), "comparisons.pairing": rule,
                             "comparisons.num_queries": 3})
    mine_queries(cfg)
    pairs = build_comparisons(cfg, _engines(cfg, echo_engine), progress=False)
    out = cfg.run_dir / "comparisons"
    a, b, c1, c2, d = [conf.name for conf in configurations(cfg)]
    per_query = {"authors": {"no_hf": [(a, b), (b, c1), (c1, d)], "kept": [(a, d), (b, c1), (c1, d)]},
                 "chain": {"no_hf": [(a, b), (b, c1), (c1, d), (c2, d)], "kept": [(b, c1), (c1, d), (c2, d)]}}[rule]
    pick = lambda ps: [(p["chosen_config"], p["rejected_config"]) for p in ps]
    assert pick(pairs) == pick(read_jsonl(out / "pairs.jsonl")) == per_query["kept"] * 3
    assert pick(read_jsonl(out / "pairs_no_hf.jsonl")) == per_query["no_hf"] * 3

    counts = read_json(out / "manifest.json")["counts"]
    assert counts["pairs_by_rule"] == {"authors": {"before_filter": 9, "after_filter": 9},
                                       "chain": {"before_filter": 12, "after_filter": 9}}
    assert counts["pairs"] == len(pairs) and counts["pairs_before_filter"] == len(per_query["no_hf"]) * 3
    table = report.pairs_by_rule(cfg)
    assert table.loc["chain", "before filter"] == 12 and table.loc[rule, "this run"] == "yes"

    # every combination the filter refused, retries included, even where the chosen config won elsewhere
    dropped = report.dropped_by_filter(cfg)
    refused = {"authors": [(a, b), (a, c1), (a, c2)], "chain": [(a, b)]}[rule]
    assert pick(dropped) == refused * 3
    by_type = report.pairs_by_type(cfg)
    assert by_type["after filter"].sum() == len(pairs)
    assert by_type["before filter"].sum() == len(per_query["no_hf"]) * 3
