"""Step 0: mine user queries from a vanilla LM, self-instruct style.

Each request shows the model ``shots`` queries sampled from the seeds plus the queries mined so
far, as ``Query: ...`` lines, and lets it write the next ``Query:`` line. A candidate is kept
when it is ``min_chars``-``max_chars`` characters long and its ROUGE-L F against every seed and
every kept query is below ``rouge_threshold`` (near-duplicate filter).

The loop runs in rounds of one batch; after every round the whole state (kept, rejected,
rounds done) is written atomically to ``progress.json``. Round ``r`` draws its shots and its
sampling seed from ``(seed, r)`` alone, so an interrupted run resumes to exactly the result an
uninterrupted one would have produced.

Output ``results/<run>/queries/queries.jsonl``: ``{"id": 0, "query": "...", "round": 3}``.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from .artifacts import Manifest, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, RunConfig
from .sampling import SamplingParams

INSTRUCTION = "Here are some questions and requests that people have typed to an AI assistant."


def load_seeds(path: str | Path) -> list[str]:
    """Seed queries, one per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"queries.seeds_file: file not found: {path}")
    seeds = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not seeds:
        raise ConfigError(f"queries.seeds_file: {path} holds no queries")
    return seeds


def build_prompt(shots: list[str]) -> str:
    """The per-request part of the prompt: the shown queries, then an open ``Query:`` line."""
    return "".join(f"\nQuery: {q}" for q in shots) + "\nQuery:"


class NearDuplicateFilter:
    """ROUGE-L F near-duplicate check against a growing set of texts."""

    def __init__(self, texts: list[str], threshold: float):
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.texts = list(texts)
        self.threshold = threshold

    def max_similarity(self, text: str) -> float:
        return max((self.scorer.score(t, text)["rougeL"].fmeasure for t in self.texts), default=0.0)

    def is_new(self, text: str) -> bool:
        return self.max_similarity(text) < self.threshold

    def add(self, text: str) -> None:
        self.texts.append(text)


def judge_candidate(text: str, dedup: NearDuplicateFilter, min_chars: int, max_chars: int) -> str | None:
    """Why a generated query is rejected, or None to keep it."""
    if len(text) < min_chars:
        return "too short"
    if len(text) > max_chars:
        return "too long"
    if not dedup.is_new(text):
        return "near duplicate"
    return None


def _round_shots(pool: list[str], k: int, seed: int, rnd: int, n: int) -> list[list[str]]:
    rng = random.Random(seed * 1_000_003 + rnd)
    return [rng.sample(pool, min(k, len(pool))) for _ in range(n)]


def generate_queries(cfg: RunConfig, engine=None, progress: bool = True) -> list[dict]:
    """Run (or resume) Step 0 and return the kept queries."""
    q = cfg.queries
    out_dir = cfg.stage_dir("queries")
    final = out_dir / "queries.jsonl"
    if final.is_file():
        return read_jsonl(final)
    seeds = load_seeds(cfg.path(q.seeds_file))
    state_path = out_dir / "progress.json"
    state = read_json(state_path) if state_path.is_file() else {"rounds": 0, "kept": [], "rejected": []}
    if engine is None:
        from .engines import load_engine
        engine = load_engine(cfg, q.model, progress=False)
    dedup = NearDuplicateFilter(seeds + [k["query"] for k in state["kept"]], q.rouge_threshold)
    batch = cfg.sampling.batch_size
    bar = tqdm(total=q.num_queries, initial=min(len(state["kept"]), q.num_queries), desc="queries",
               disable=not progress)
    with Manifest(cfg, "queries") as man:
        with man.timer("generation"):
            while len(state["kept"]) < q.num_queries:
                attempts = state["rounds"] * batch
                if attempts >= q.max_attempts:
                    raise RuntimeError(f"Step 0 stopped after {attempts} generations with only "
                                       f"{len(state['kept'])} of {q.num_queries} queries kept; raise "
                                       "queries.max_attempts or relax the filters")
                rnd, t_round = state["rounds"], time.perf_counter()
                pool = seeds + [k["query"] for k in state["kept"]]
                prompts = [build_prompt(s) for s in _round_shots(pool, q.shots, cfg.seed, rnd, batch)]
                params = SamplingParams(max_new_tokens=q.max_new_tokens, temperature=q.temperature,
                                        top_p=q.top_p, stop=["\n"], seed=cfg.seed * 1_000_003 + rnd)
                for text in engine.generate(prompts, params, prefix=INSTRUCTION):
                    text = text.strip()
                    reason = judge_candidate(text, dedup, q.min_chars, q.max_chars)
                    if reason is None and len(state["kept"]) < q.num_queries:
                        state["kept"].append({"id": len(state["kept"]), "query": text, "round": rnd})
                        dedup.add(text)
                        bar.update(1)
                    elif reason is not None:
                        state["rejected"].append({"query": text, "reason": reason, "round": rnd})
                state["rounds"] = rnd + 1
                # Generation time summed over every session that worked on this run (a resumed
                # run's own timer only sees its own rounds).
                state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t_round
                write_json(state_path, state)
        bar.close()
        reasons: dict[str, int] = {}
        for r in state["rejected"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        man.set_time("generation_all_sessions", state.get("seconds", 0.0))
        man.count("seeds", len(seeds))
        man.count("generated", state["rounds"] * batch)
        man.count("kept", len(state["kept"]))
        man.count("rejected", reasons)
        write_jsonl(out_dir / "rejected.jsonl", state["rejected"])
        write_jsonl(final, state["kept"])
    return state["kept"]
