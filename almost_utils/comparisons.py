"""Step 1: synthetic comparisons from rules of thumb.

Responses to the same query from differently prompted vanilla models are assumed to rank as
their configurations do in the *rubric* (bigger model, more shots, better demonstrations first).
This module samples those responses, drops bad ones, pairs the rest down the rubric and applies
the Heuristic Filter, under one of two pairing rules (``comparisons.pairing``): ``authors``, as in
the authors' released code (:func:`pair_authors`), or ``chain`` (:func:`pair_chain`).

Outputs under ``results/<run>/comparisons/``:

* ``responses/<config>.<chunk>.jsonl`` - ``{"query_id", "config", "raw"}``, the raw samples,
  written per chunk, so an interrupted run resumes without losing finished generations. The
  bad-response rules are applied when they are read (:func:`load_responses`);
  ``responses/timings.json`` keeps each unit's sampling seconds across sessions.
* ``pairs_no_hf.jsonl`` - the pairs of the same rule with the filter off (the ablation of Step 2
  trains on it).
* ``pairs.jsonl`` - the pairs that survive the Heuristic Filter (or all, when it is switched off)::

    {"query_id": 7, "prompt": "How do I ...?", "chosen": "...", "rejected": "...",
     "chosen_config": "large-faithful-3shot", "rejected_config": "large-hhh-1shot"}
"""
from __future__ import annotations

import itertools
import re
import statistics
import time
import zlib
from dataclasses import dataclass

from .artifacts import Manifest, ResumableJsonl, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, Configuration, RunConfig
from .dialogue import STOP_STRINGS, few_shot_prefix, load_dialogues, open_turn
from .fingerprint import begin_stage, stage_status
from .progress import say
from .sampling import SamplingParams

CHUNK_QUERIES = 64   # queries per resumable unit of sampling
TIMINGS_FILE = "timings.json"   # seconds per finished unit, next to the units


# --------------------------------------------------------------------------- bad responses
def bad_reason(text: str, min_chars: int = 50, require_final_punctuation: bool = True) -> str | None:
    """Why a response is bad (docs/method.md, Step 1), or None if it is usable.

    >>> bad_reason("Well, it depends on many things you have not told me yet, sadly.")
    'starts with well'
    """
    t = text.strip()
    low = t.lower()
    if len(t) < min_chars:
        return "too short"
    if "human:" in low or "assistant:" in low:
        return "new speaker turn"
    if t.endswith(("?", ":")):
        return "ends with ? or :"
    if low.startswith("well"):
        return "starts with well"
    if "don't know" in low or "do not know" in low:
        return "says it does not know"
    if require_final_punctuation and not t.endswith((".", "!")):
        return "no final . or !"
    return None


def trim_to_last_sentence(text: str) -> str:
    """Cut an unfinished response back to the end of its last complete sentence.

    Not in the paper: with the short token caps of the CPU recipe most long answers are cut
    mid-sentence and would all be dropped by the "final . or !" rule. Trimming keeps their
    finished part (the other rules then apply to it as usual).

    >>> trim_to_last_sentence("First point. Second point! And a third that never ends")
    'First point. Second point!'
    """
    t = text.strip()
    if t.endswith((".", "!")):
        return t
    ends = [m.end() for m in re.finditer(r"[.!](?=\s)", t)]
    return t[:ends[-1]] if ends else t


def judge_response(raw: str, c) -> tuple[str, str | None]:
    """``(text, bad_reason)`` of a raw sampled response under a comparisons config."""
    text = trim_to_last_sentence(raw) if c.trim_to_last_sentence else raw.strip()
    return text, bad_reason(text, c.min_chars, c.require_final_punctuation)


# --------------------------------------------------------------------------- pairing
PAIRING_RULES = ("authors", "chain")   # comparisons.pairing; "authors" is the default


@dataclass
class Candidate:
    config: str
    rank: int          # 0 = best rank of the rubric
    response: str


Link = tuple[Candidate, Candidate]     # (chosen, rejected)


@dataclass
class QueryPairs:
    """The pairs of one query under one pairing rule."""
    kept: list[Link]          # Heuristic Filter on
    unfiltered: list[Link]    # the same rule with the filter off (the no-HF ablation)
    dropped: list[Link]       # combinations the filter refused, in the order they were tried


def pair_down_rubric(candidates: list[Candidate]) -> list[tuple[Candidate, Candidate]]:
    """The chain rule's links ``(chosen, rejected)`` for one query, going down the rubric.

    Candidates are the *good* responses. Each one is "chosen" at most once, against the first
    response of a strictly worse rank below it, so K responses give at most K-1 pairs (a chain
    that branches at ties) and tied configurations are never compared with each other.
    """
    ordered = sorted(candidates, key=lambda c: c.rank)
    pairs = []
    for i, chosen in enumerate(ordered):
        worse = next((c for c in ordered[i + 1:] if c.rank > chosen.rank), None)
        if worse is not None:
            pairs.append((chosen, worse))
    return pairs


def heuristic_filter_keep(chosen_len: int, rejected_len: int, lengths: list[int]) -> bool:
    """The Heuristic Filter: distrust a chosen answer that is both shorter and unusually short.

    ``lengths`` are the character lengths of all good responses to the query; with M their mean
    and S their population standard deviation, a pair is dropped when
    ``chosen_len < rejected_len and chosen_len < M - S / 2``.
    """
    mean = statistics.fmean(lengths)
    std = statistics.pstdev(lengths)
    return not (chosen_len < rejected_len and chosen_len < mean - std / 2)


def _query_filter(candidates: list[Candidate]):
    """The Heuristic Filter of one query: M and S come from every good response to it."""
    lengths = [len(c.response) for c in candidates]
    return lambda chosen, rejected: heuristic_filter_keep(len(chosen.response), len(rejected.response), lengths)


def pair_chain(candidates: list[Candidate]) -> QueryPairs:
    """Our first rule: the links of :func:`pair_down_rubric`, then the filter; a dropped link is lost."""
    links = pair_down_rubric(candidates)
    keep = _query_filter(candidates)
    return QueryPairs(kept=[link for link in links if keep(*link)], unfiltered=links,
                      dropped=[link for link in links if not keep(*link)])


def _walk_combinations(candidates: list[Candidate], keep) -> tuple[list[Link], list[Link]]:
    """``(pairs, refused)`` of the authors' walk over (better, worse) combinations of one query."""
    ordered = sorted(candidates, key=lambda c: c.rank)   # stable: rubric order within a rank
    pairs, refused, spent_ranks = [], [], set()
    for better, worse in itertools.combinations(ordered, 2):
        if better.rank == worse.rank or better.rank in spent_ranks:
            continue
        if keep(better, worse):
            pairs.append((better, worse))
            spent_ranks.add(better.rank)     # a rank gives one chosen response per query
        else:
            refused.append((better, worse))  # the better response stays free for the next worse one
    return pairs, refused


def pair_authors(candidates: list[Candidate]) -> QueryPairs:
    """The rule of the authors' released ranking code.

    Walk the (better, worse) combinations best rank first, skipping ties. A kept pair spends the
    better response's *rank* (tied configurations share it), so a query gives at most one pair
    per rank, K-1 at most. A pair the filter drops spends nothing: its better response is tried
    against the next worse one. With the filter off this is one pair per rank, down the rubric.
    """
    kept, dropped = _walk_combinations(candidates, _query_filter(candidates))
    unfiltered, _ = _walk_combinations(candidates, lambda chosen, rejected: True)
    return QueryPairs(kept=kept, unfiltered=unfiltered, dropped=dropped)


PAIRING = {"authors": pair_authors, "chain": pair_chain}


def pair_rows(queries: list[dict], responses: dict[str, dict[int, dict]], ranks: dict[str, int],
              rule: str) -> tuple[list[dict], list[dict], list[dict]]:
    """``(unfiltered, kept, dropped)`` pair rows of every query under pairing ``rule``."""
    if rule not in PAIRING:
        raise ValueError(f"comparisons.pairing: unknown rule {rule!r} (known: {', '.join(PAIRING)})")
    out = ([], [], [])
    for q in queries:
        cands = [Candidate(name, ranks[name], rows[q["id"]]["response"].strip())
                 for name, rows in responses.items()
                 if q["id"] in rows and rows[q["id"]]["bad"] is None]
        found = PAIRING[rule](cands)
        for bucket, links in zip(out, (found.unfiltered, found.kept, found.dropped)):
            bucket.extend({"query_id": q["id"], "prompt": q["query"], "chosen": chosen.response,
                         "rejected": rejected.response, "chosen_config": chosen.config,
                         "rejected_config": rejected.config} for chosen, rejected in links)
    return out


def build_pairs(queries: list[dict], responses: dict[str, dict[int, dict]],
                ranks: dict[str, int], rule: str = "authors") -> tuple[list[dict], list[dict]]:
    """``(all_pairs, pairs_after_heuristic_filter)`` from responses keyed by config, query id.

    ``all_pairs`` are the pairs of ``rule`` with the filter off; under the authors' rule they are
    not a superset of the filtered pairs (a dropped link's retry exists only with the filter on).
    """
    all_pairs, kept, _ = pair_rows(queries, responses, ranks, rule)
    return all_pairs, kept


# --------------------------------------------------------------------------- sampling
def rubric_ranks(cfg: RunConfig) -> dict[str, int]:
    return {conf.name: i for i, rank in enumerate(cfg.comparisons.rubric) for conf in rank}


def configurations(cfg: RunConfig) -> list[Configuration]:
    return [conf for rank in cfg.comparisons.rubric for conf in rank]


def prompt_prefix(cfg: RunConfig, conf: Configuration) -> str:
    """The few-shot prefix of a configuration: preamble + its first ``shots`` demonstrations."""
    c = cfg.comparisons
    preamble = cfg.path(c.preamble).read_text()
    dialogues = load_dialogues(cfg.path(c.demonstrations[conf.demos]))
    return few_shot_prefix(preamble, dialogues, conf.shots)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 101 + chunk) % (2**63)


def sample_responses(cfg: RunConfig, queries: list[dict], engines=None, progress: bool = True,
                     fingerprint: str | None = None) -> dict:
    """Sample (or resume) one response per query per configuration; returns rows by config.

    Units (a configuration's chunk of queries) carry the stage ``fingerprint``: a unit of another
    recipe is never taken for done.
    """
    c = cfg.comparisons
    store = ResumableJsonl(cfg.stage_dir("comparisons") / "responses", fingerprint)
    timings = _unit_timings(cfg)
    chunks = [queries[i:i + CHUNK_QUERIES] for i in range(0, len(queries), CHUNK_QUERIES)]
    by_model: dict[str, list[Configuration]] = {}
    for conf in configurations(cfg):
        by_model.setdefault(conf.model, []).append(conf)
    n_units = len(chunks) * len(configurations(cfg))
    n_done = sum(store.done(f"{conf.name}.{i:04d}") for conf in configurations(cfg) for i in range(len(chunks)))
    if n_done:
        say(f"comparisons: resuming, {n_done} of {n_units} units already sampled (recipe unchanged)")
    t_stage, n_new = time.perf_counter(), 0
    for model_key, confs in by_model.items():
        todo = [(conf, i) for conf in confs for i in range(len(chunks)) if not store.done(f"{conf.name}.{i:04d}")]
        if not todo:
            continue
        engine = (engines or {}).get(model_key)
        if engine is None:   # load each model once, and only if it still has work to do
            from .engines import load_engine
            engine = load_engine(cfg, model_key, progress=progress)
        for conf, i in todo:
            t_unit = time.perf_counter()
            params = SamplingParams(max_new_tokens=c.max_new_tokens[conf.demos], temperature=c.temperature,
                                    top_p=c.top_p, stop=STOP_STRINGS, seed=_chunk_seed(cfg.seed, conf.name, i))
            prompts = [open_turn([("Human", q["query"])]) for q in chunks[i]]
            texts = engine.generate(prompts, params, prefix=prompt_prefix(cfg, conf),
                                    desc=f"{conf.name} {i + 1}/{len(chunks)}")
            store.put(f"{conf.name}.{i:04d}", [{"query_id": q["id"], "config": conf.name, "raw": t}
                                                for q, t in zip(chunks[i], texts)])
            timings[f"{conf.name}.{i:04d}"] = round(time.perf_counter() - t_unit, 3)
            write_json(store.folder / TIMINGS_FILE, timings)
            n_done, n_new = n_done + 1, n_new + 1
            elapsed = time.perf_counter() - t_stage
            say(f"comparisons: {n_done}/{n_units} units sampled ({conf.name} {i + 1}/{len(chunks)}), "
                f"{elapsed / 60:.1f} min so far, about {elapsed / n_new * (n_units - n_done) / 60:.1f} min left")
        del engine
    return load_responses(cfg)


def _unit_timings(cfg: RunConfig) -> dict[str, float]:
    """Seconds spent sampling each finished unit, in whichever session sampled it."""
    path = cfg.stage_dir("comparisons") / "responses" / TIMINGS_FILE
    return read_json(path) if path.is_file() else {}


def load_responses(cfg: RunConfig) -> dict[str, dict[int, dict]]:
    """Responses on disk, judged under the current rules, as ``{config: {query_id: row}}``.

    Files keep the raw samples; ``response`` and ``bad`` are derived on load, so changing a rule
    re-pairs without sampling again.
    """
    store = ResumableJsonl(cfg.stage_dir("comparisons") / "responses")
    out: dict[str, dict[int, dict]] = {conf.name: {} for conf in configurations(cfg)}
    for key in store.keys():
        name = key.rsplit(".", 1)[0]
        if name in out:
            for r in store.get(key):
                text, bad = judge_response(r["raw"], cfg.comparisons)
                out[name][r["query_id"]] = dict(r, response=text, bad=bad)
    return out


def build_comparisons(cfg: RunConfig, engines=None, progress: bool = True) -> list[dict]:
    """Run (or resume) Step 1 end to end and return the filtered pairs."""
    c = cfg.comparisons
    if stage_status(cfg, "queries") != "done":
        raise ConfigError(f"comparisons: Step 0 has not finished in {cfg.run_dir / 'queries'}: run it first "
                          "(notebook 01, or python -m almost_utils.cli queries)")
    status, fp = begin_stage(cfg, "comparisons")     # a recipe change stops here, before a model loads
    out = cfg.stage_dir("comparisons")
    if status == "done":
        pairs = read_jsonl(out / "pairs.jsonl")
        say(f"comparisons: reusing {len(pairs)} pairs of {cfg.run_dir} (recipe unchanged)")
        return pairs
    queries = read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")
    if c.num_queries is not None:
        queries = queries[:c.num_queries]
    if not queries:
        raise ValueError("Step 1 needs queries, and queries.jsonl is empty")
    with Manifest(cfg, "comparisons", fp) as man:
        with man.timer("sampling"):
            responses = sample_responses(cfg, queries, engines, progress, fingerprint=fp)
        # both rules on the same responses: the recipe's is written, the other only counted
        by_rule = {rule: build_pairs(queries, responses, rubric_ranks(cfg), rule) for rule in PAIRING_RULES}
        all_pairs, filtered = by_rule[c.pairing]
        pairs = filtered if c.heuristic_filter else all_pairs
        write_jsonl(out / "pairs_no_hf.jsonl", all_pairs)
        write_jsonl(out / "pairs.jsonl", pairs)
        per_config: dict[str, float] = {}
        for key, secs in _unit_timings(cfg).items():
            name = key.rsplit(".", 1)[0]
            per_config[name] = round(per_config.get(name, 0.0) + secs, 3)
        man.set_time("sampling_all_sessions", sum(per_config.values()))
        man.count("sampling_s_per_config", per_config)
        man.count("queries", len(queries))
        man.count("responses", {k: len(v) for k, v in responses.items()})
        man.count("bad_responses", {k: sum(r["bad"] is not None for r in v.values()) for k, v in responses.items()})
        man.count("pairs_before_filter", len(all_pairs))
        man.count("pairs", len(pairs))
        man.count("pairs_by_rule", {rule: {"before_filter": len(a), "after_filter": len(k)}
                                    for rule, (a, k) in by_rule.items()})
    return pairs
