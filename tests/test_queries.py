import random

import pytest

from almost_utils.artifacts import read_json
from almost_utils.queries import NearDuplicateFilter, build_prompt, generate_queries, judge_candidate


def test_rouge_near_duplicates_are_rejected():
    f = NearDuplicateFilter(["How do I bake sourdough bread at home?"], threshold=0.5)
    assert not f.is_new("How do I bake sourdough bread at home quickly?")
    assert f.is_new("What is the tallest mountain in South America?")
    assert judge_candidate("short", f, 30, 250) == "too short"
    assert judge_candidate("x" * 251, f, 30, 250) == "too long"
    assert judge_candidate("How can I bake sourdough bread at home?", f, 30, 250) == "near duplicate"
    assert judge_candidate("What is the tallest mountain in South America?", f, 30, 250) is None


def test_threshold_is_strict_below():
    f = NearDuplicateFilter(["alpha beta gamma delta"], threshold=0.5)
    # ROUGE-L F of "alpha beta" vs the seed = 2*(1*0.5)/(1.5) = 0.667 -> duplicate
    assert not f.is_new("alpha beta")
    assert f.max_similarity("alpha zeta eta theta") == pytest.approx(0.25)


def test_prompt_format():
    assert build_prompt(["a?", "b?"]) == "\nQuery: a?\nQuery: b?\nQuery:"


WORDS = ("river garden engine violin tax recipe galaxy bicycle poem router winter lawyer puppy "
         "sonnet budget volcano carpet python museum ladder cactus orbit pillow tennis").split()


def _mined(prefix, prompt, seed):
    # a varied line per (seed, shots); about one in five is too short to keep
    rng = random.Random(f"{seed}|{prompt}")
    n = rng.choice([1, 6, 7, 8, 9])
    return " " + " ".join(rng.choice(WORDS) for _ in range(n)) + "?"


def test_query_generation_resumes_to_the_same_result(tiny_cfg, echo_engine):
    from almost_utils.config import load_config
    from conftest import TINY
    full = generate_queries(tiny_cfg, echo_engine(_mined), progress=False)
    assert len(full) == tiny_cfg.queries.num_queries
    assert all(5 <= len(q["query"]) <= 250 for q in full)

    cfg2 = load_config(TINY, {"output_dir": str(tiny_cfg.run_dir.parent / "again")})
    with pytest.raises(KeyboardInterrupt):
        generate_queries(cfg2, echo_engine(_mined, fail_after=1), progress=False)
    first = read_json(cfg2.run_dir / "queries" / "progress.json")
    assert first["rounds"] == 1 and first["seconds"] >= 0
    assert generate_queries(cfg2, echo_engine(_mined), progress=False) == full
    manifest = read_json(cfg2.run_dir / "queries" / "manifest.json")
    assert manifest["timings_s"]["generation_all_sessions"] >= first["seconds"]
