"""Toy Step-1 output for the reward-model tests: pairs a tiny model can learn to separate.

Every chosen response is a polite, complete sentence about the query's topic; every rejected one
is a curt refusal. ``pairs_no_hf.jsonl`` adds, per query, one pair the Heuristic Filter would
drop (a chosen response much shorter than the query's others).
"""
from __future__ import annotations

import random
from pathlib import Path

from almost_utils.artifacts import write_jsonl

TOPICS = ["cats", "the moon", "bread", "taxes", "rain", "chess", "music", "gardens", "trains", "coffee",
          "volcanoes", "maps", "bees", "kites", "rivers", "clocks"]


def toy_pairs(n_queries: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pairs, dropped = [], []
    for q in range(n_queries):
        topic = TOPICS[q % len(TOPICS)]
        prompt = f"Could you tell me something about {topic}?"
        good = [f"Sure! Here is a short, careful answer about {topic}. I hope this helps, and ask if you need more.",
                f"Of course. {topic.capitalize()} are a lovely subject; here is what I know, explained step by step."]
        bad = ["No.", "I won't.", "Whatever, look it up."]
        for j in range(2):
            pairs.append({"query_id": q, "prompt": prompt, "chosen": good[j], "rejected": rng.choice(bad),
                          "chosen_config": f"A{j}", "rejected_config": f"B{j}"})
        dropped.append({"query_id": q, "prompt": prompt, "chosen": "Ok.", "rejected": "Fine, " + rng.choice(bad),
                        "chosen_config": "A2", "rejected_config": "B2"})
    return pairs, pairs + dropped


def write_toy_pairs(run_dir, n_queries: int = 16, seed: int = 0) -> Path:
    folder = Path(run_dir) / "comparisons"
    pairs, no_hf = toy_pairs(n_queries, seed)
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "pairs_no_hf.jsonl", no_hf)
    return folder
