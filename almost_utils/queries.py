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

The ``splits`` stage (:func:`generate_splits`) mines on after Step 0 for the later steps and
writes ``results/<run>/splits/queries.jsonl``:
``{"id": 210, "query": "...", "round": 15, "split": "rmsp"}`` (ids after Step 0's).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from rouge_score import rouge_scorer

from .artifacts import Manifest, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, QueriesConfig, RunConfig
from .fingerprint import begin_stage, stage_status
from .progress import bar as progress_bar
from .progress import say
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


def mine_rounds(engine, q: QueriesConfig, state: dict, state_path: Path, *, pool: list[str],
                dedup: NearDuplicateFilter, target: int, seed: int, batch: int, max_attempts: int,
                first_round: int = 0, first_id: int = 0, who: str = "Step 0",
                knob: str = "queries.max_attempts", bar=None) -> None:
    """Mine rounds until ``state["kept"]`` holds ``target`` queries; ``state`` is saved after each round.

    ``state`` is ``{"rounds": rounds done, "kept": [...], "rejected": [...], "seconds": float}``;
    kept rows are ``{"id": first_id + i, "query": str, "round": r}``. Round ``r = first_round +
    state["rounds"]`` shows ``q.shots`` queries drawn from ``pool`` plus the kept ones, and draws
    its shots and its sampling seed from ``(seed, r)`` alone, so a resumed run keeps exactly what
    an uninterrupted one would. ``dedup`` must already hold every text a candidate may not repeat.
    Step 0 calls it with the defaults; the ``splits`` stage continues Step 0's round numbering.
    """
    while len(state["kept"]) < target:
        attempts = state["rounds"] * batch
        if attempts >= max_attempts:
            raise RuntimeError(f"{who} stopped after {attempts} generations with only "
                               f"{len(state['kept'])} of {target} queries kept; raise "
                               f"{knob} or relax the filters")
        rnd, t_round = first_round + state["rounds"], time.perf_counter()
        shown = pool + [k["query"] for k in state["kept"]]
        prompts = [build_prompt(s) for s in _round_shots(shown, q.shots, seed, rnd, batch)]
        params = SamplingParams(max_new_tokens=q.max_new_tokens, temperature=q.temperature,
                                top_p=q.top_p, stop=["\n"], seed=seed * 1_000_003 + rnd)
        for text in engine.generate(prompts, params, prefix=INSTRUCTION):
            text = text.strip()
            reason = judge_candidate(text, dedup, q.min_chars, q.max_chars)
            if reason is None and len(state["kept"]) < target:
                state["kept"].append({"id": first_id + len(state["kept"]), "query": text, "round": rnd})
                dedup.add(text)
                if bar is not None:
                    bar.update(1)
            elif reason is not None:
                state["rejected"].append({"query": text, "reason": reason, "round": rnd})
        state["rounds"] += 1
        # Generation time summed over every session that worked on this run (a resumed
        # run's own timer only sees its own rounds).
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t_round
        write_json(state_path, state)


def generate_queries(cfg: RunConfig, engine=None, progress: bool = True) -> list[dict]:
    """Run (or resume) Step 0 and return the kept queries."""
    q = cfg.queries
    status, fp = begin_stage(cfg, "queries")       # a recipe change stops here, before a model loads
    out_dir = cfg.stage_dir("queries")
    final = out_dir / "queries.jsonl"
    if status == "done":
        kept = read_jsonl(final)
        say(f"queries: reusing {len(kept)} queries of {cfg.run_dir} (recipe unchanged)")
        return kept
    seeds = load_seeds(cfg.path(q.seeds_file))
    state_path = out_dir / "progress.json"
    state = read_json(state_path) if state_path.is_file() else {"rounds": 0, "kept": [], "rejected": []}
    state["fingerprint"] = fp      # begin_stage vetted the folder: its state belongs to this recipe
    if state["rounds"]:
        say(f"queries: resuming {cfg.run_dir} after {state['rounds']} rounds, {len(state['kept'])} of "
            f"{q.num_queries} queries kept so far (recipe unchanged)")
    if engine is None:
        from .engines import load_engine
        engine = load_engine(cfg, q.model, progress=False)
    dedup = NearDuplicateFilter(seeds + [k["query"] for k in state["kept"]], q.rouge_threshold)
    batch = cfg.sampling.batch_size
    bar = progress_bar(total=q.num_queries, initial=min(len(state["kept"]), q.num_queries), desc="queries",
                       unit="query", disable=not progress)
    with Manifest(cfg, "queries", fp) as man:
        with man.timer("generation"):
            mine_rounds(engine, q, state, state_path, pool=seeds, dedup=dedup, target=q.num_queries,
                        seed=cfg.seed, batch=batch, max_attempts=q.max_attempts, bar=bar)
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


# --------------------------------------------------------------------------- splits (fresh queries for Steps 3+)
SPLITS_FILE = "queries.jsonl"


def assign_splits(rows: list[dict], sizes: dict[str, int], seed: int) -> list[dict]:
    """Give each mined row a split by a seeded shuffle; returns the rows (sorted by id) with ``"split"``.

    Splits are filled in the sorted order of their names, so the result does not depend on the
    order the recipe lists them in (the fingerprint does not either).

    >>> assign_splits([{"id": 7, "query": "a"}, {"id": 8, "query": "b"}], {"x": 1, "y": 1}, 1)
    [{'id': 7, 'query': 'a', 'split': 'y'}, {'id': 8, 'query': 'b', 'split': 'x'}]
    """
    if len(rows) != sum(sizes.values()):
        raise ValueError(f"{len(rows)} queries for splits of {sum(sizes.values())} in all")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    names = [name for name in sorted(sizes) for _ in range(sizes[name])]
    out = [dict(rows[i], split=name) for i, name in zip(order, names)]
    return sorted(out, key=lambda r: r["id"])


def generate_splits(cfg: RunConfig, engine=None, progress: bool = True) -> list[dict]:
    """Run (or resume) the ``splits`` stage: fresh queries that Step 1 never saw, for Steps 3-6.

    Continues Step 0's mining - same model, prompt, sampling settings and filters, round numbers
    after Step 0's last round, every Step-0 query and seed in the near-duplicate filter - until it
    holds ``sum(splits.sizes)`` queries, then assigns them to the splits (:func:`assign_splits`).
    Writes ``results/<run>/splits/queries.jsonl``, rows ``{"id", "query", "round", "split"}`` with ids
    after Step 0's, plus ``rejected.jsonl``, ``progress.json`` (the resumable state) and a manifest.
    """
    s, q = cfg.splits, cfg.queries
    if s is None:
        raise ConfigError("splits: this recipe has no splits section")
    if stage_status(cfg, "queries") != "done":
        raise ConfigError(f"splits: Step 0 has not finished in {cfg.run_dir / 'queries'}: run it first "
                          "(notebook 01, or python -m almost_utils.cli queries)")
    status, fp = begin_stage(cfg, "splits")       # a recipe change stops here, before a model loads
    out_dir = cfg.stage_dir("splits")
    final = out_dir / SPLITS_FILE
    if status == "done":
        rows = read_jsonl(final)
        say(f"splits: reusing {len(rows)} queries of {cfg.run_dir} (recipe unchanged)")
        return rows
    step0 = read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")
    seeds = load_seeds(cfg.path(q.seeds_file))
    old = [r["query"] for r in step0]
    target = sum(s.sizes.values())
    state_path = out_dir / "progress.json"
    state = read_json(state_path) if state_path.is_file() else {"rounds": 0, "kept": [], "rejected": []}
    state["fingerprint"] = fp
    if state["rounds"]:
        say(f"splits: resuming {cfg.run_dir} after {state['rounds']} rounds, {len(state['kept'])} of {target} "
            "queries kept so far (recipe unchanged)")
    if engine is None and len(state["kept"]) < target:
        from .engines import load_engine
        engine = load_engine(cfg, q.model, progress=False)
    dedup = NearDuplicateFilter(seeds + old + [k["query"] for k in state["kept"]], q.rouge_threshold)
    first_round = max((r["round"] for r in step0), default=-1) + 1
    first_id = max((r["id"] for r in step0), default=-1) + 1
    bar = progress_bar(total=target, initial=min(len(state["kept"]), target), desc="splits", unit="query",
                       disable=not progress)
    with Manifest(cfg, "splits", fp) as man:
        with man.timer("generation"):
            mine_rounds(engine, q, state, state_path, pool=seeds + old, dedup=dedup, target=target, seed=cfg.seed,
                        batch=cfg.sampling.batch_size, max_attempts=s.max_attempts, first_round=first_round,
                        first_id=first_id, who="the splits stage", knob="splits.max_attempts", bar=bar)
        bar.close()
        rows = assign_splits(state["kept"], s.sizes, cfg.seed)
        reasons: dict[str, int] = {}
        for r in state["rejected"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        man.set_time("generation_all_sessions", state.get("seconds", 0.0))
        man.count("generated", state["rounds"] * cfg.sampling.batch_size)
        man.count("kept", len(rows))
        man.count("rejected", reasons)
        man.count("per_split", {name: sum(r["split"] == name for r in rows) for name in sorted(s.sizes)})
        man.note("first_round", first_round)
        man.note("first_id", first_id)
        man.note("assignment", f"random.Random({cfg.seed}).shuffle, splits filled in sorted name order")
        write_jsonl(out_dir / "rejected.jsonl", state["rejected"])
        write_jsonl(final, rows)
    return rows


def load_split(cfg: RunConfig, name: str) -> list[dict]:
    """The queries of one split, ``[{"id", "query", "round", "split"}, ...]`` sorted by id.

    Raises :class:`ConfigError` when the splits stage has not finished with this recipe or the
    recipe has no split of that name.
    """
    if cfg.splits is None or name not in cfg.splits.sizes:
        known = ", ".join(sorted(cfg.splits.sizes)) if cfg.splits else "none: no splits section"
        raise ConfigError(f"splits.sizes.{name}: no split named {name!r} in the recipe (splits: {known})")
    if stage_status(cfg, "splits") != "done":
        raise ConfigError(f"splits: the query splits have not been mined in {cfg.run_dir / 'splits'}: run "
                          "generate_splits first (notebook 03, or python -m almost_utils.cli splits)")
    return [r for r in read_jsonl(cfg.run_dir / "splits" / SPLITS_FILE) if r["split"] == name]
