"""Step 3: RM-guided self-play (RMSP) - simulated demonstrations picked by the Step-2 reward model.

Two prompted copies of the vanilla model talk. The *assistant* agent reads the Faithful few-shot
prefix of the best Step-1 configuration (``comparisons.configurations(cfg)[0]``); the *user*
agent reads our own user-role prompt (``rmsp.user_prompt``: instructions, then example dialogues
that each end with the person's follow-up). Every dialogue opens with a query of the ``rmsp``
split (:func:`almost_utils.queries.load_split`). Then, for each assistant turn:

1. one engine call samples ``rmsp.candidates`` (N) replies for every open dialogue of a chunk
   (each prompt repeated N times behind the shared, cached Faithful prefix);
2. one scorer call scores the non-empty candidates with the Step-2 RM; the RM's argmax is kept
   (:func:`pick_best`, ties to the first) and, on the first turn only, two other pickers choose
   from the same candidates for comparison: ``random`` (the N = 1 baseline, no RM) and
   ``longest``;
3. unless this was the last turn, one engine call lets the user agent write the next human turn
   (one line, cut at the first newline). A dialogue ends early, saying why, when every candidate
   is empty or the follow-up is unusable (:func:`user_turn_problem`).

Only the RM's choice drives a dialogue forward. Candidates are not screened by Step 1's
bad-response rules: the RM alone judges them; an empty candidate is the one thing never kept.

Outputs under ``results/<run>/rmsp/``:

* ``turns/c<chunk>.t<turn>.jsonl`` - the resumable units: one turn of one chunk of dialogues; a
  finished unit is never recomputed. ``turns/timings.json`` keeps each unit's seconds and tokens.
* ``candidates.jsonl`` - one row per dialogue and assistant turn, every candidate kept::

    {"dialogue_id": 3, "query_id": 215, "turn": 0,
     "candidates": [{"text": "...", "score": 0.41, "chars": 212, "tokens": 51}, ...],   # score None: empty
     "picks": {"rm": 2, "random": 0, "longest": 2},      # random and longest on turn 0 only
     "user": {"text": "And if ...?", "problem": None},     # None after the last turn
     "end": None}                                          # or why the dialogue ended here

* ``dialogues.jsonl`` - the ALMoST demonstrations (RM picks), for Step 4::

    {"id": 3, "query_id": 215, "query": "...", "turns": [["Human", "..."], ["Assistant", "..."], ...],
     "assistant_turns": 2, "rm_scores": [0.41, 0.18], "end": "turn budget spent"}

  ``turns`` always ends with an Assistant turn; a dialogue whose first turn has no candidate is
  left out (counted in the manifest).
* ``dialogues_random.jsonl``, ``dialogues_longest.jsonl`` - single-turn demonstrations from the
  other pickers on the first turn, same row format with ``"picker"`` and ``"score"``:
  ``{"id", "query_id", "query", "turns": [["Human", q], ["Assistant", a]], "picker": "random", "score"}``.
  The random ones are the SFT-noRM data.
* ``manifest.json`` - counts (ends, turns, candidates, picker agreement, mean scores), seconds of
  sampling and scoring summed over every session, tokens/s of sampling.
"""
from __future__ import annotations

import random
import statistics
import time
import zlib
from pathlib import Path

from .artifacts import Manifest, ResumableJsonl, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, RMSPConfig, RunConfig
from .dialogue import SEPARATOR, STOP_STRINGS, Turn, few_shot_prefix, open_turn, parse_dialogues
from .fingerprint import begin_stage, stage_status
from .progress import say
from .sampling import SamplingParams, cut_at_stop

STAGE = "rmsp"
UNITS = "turns"
TIMINGS_FILE = "timings.json"
USER_STOP = ["\n"]       # a follow-up is one line, like a Step-0 query; this also stops it writing the reply
END_BUDGET = "turn budget spent"
END_NO_CANDIDATE = "every assistant candidate was empty"
PICKERS = ("rm", "random", "longest")


# --------------------------------------------------------------------------- the user agent's prompt
def parse_user_prompt(text: str, source: str = "<text>") -> tuple[str, list[list[Turn]]]:
    """``(instructions, example dialogues)`` of a user-agent prompt file.

    The file holds the instructions, then example dialogues in the demonstration format, separated
    by lines of five dashes; each example ends with the person's follow-up (a Human turn after at
    least one Assistant turn)::

        Below are conversations between people and an AI assistant ...
        -----
        Human: What's a good way to keep basil alive indoors?
        Assistant: Basil wants a lot of light ...
        Human: My only sunny window gets four hours of light. Is that enough?

    Errors are :class:`ConfigError` naming ``rmsp.user_prompt`` and the file.
    """
    where = f"rmsp.user_prompt: {source}"
    if not text.strip():
        raise ConfigError(f"{where} is empty; it should hold the user agent's instructions and example dialogues")
    head, sep, rest = text.strip().partition(f"\n{SEPARATOR}\n")
    instructions = head.strip()
    if not instructions or any(line.startswith(("Human:", "Assistant:")) for line in instructions.splitlines()):
        raise ConfigError(f"{where}: start with the instructions to the user agent, then a line '{SEPARATOR}' "
                          "before the first example dialogue")
    if not sep or not rest.strip():
        raise ConfigError(f"{where}: no example dialogue after the instructions (separate them with a line "
                          f"'{SEPARATOR}'); the vanilla model needs to see a follow-up written")
    try:
        examples = parse_dialogues(rest, source, last_role="Human")
    except ValueError as e:
        raise ConfigError(f"rmsp.user_prompt: {e}") from None
    for i, ex in enumerate(examples):
        if len(ex) < 3:
            raise ConfigError(f"{where}: example dialogue {i + 1} shows no follow-up (it needs Human, Assistant, "
                              "then Human turns)")
    return instructions, examples


def load_user_prompt(path: str | Path) -> str:
    """The user agent's shared prefix (instructions + examples, ending in a separator), from its file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rmsp.user_prompt: file not found: {path}")
    instructions, examples = parse_user_prompt(path.read_text(), str(path))
    return few_shot_prefix(instructions, examples, len(examples))


# --------------------------------------------------------------------------- pickers
def pick_best(scores: list[float | None]) -> int | None:
    """Index of the highest score (the first on ties); ``None`` entries are ineligible.

    >>> pick_best([0.2, None, 0.7, 0.7])
    2
    >>> pick_best([None, None]) is None
    True
    """
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    return best


def pick_longest(texts: list[str]) -> int | None:
    """Index of the longest non-empty text in characters (the first on ties).

    >>> pick_longest(["ab", "abcd", "", "wxyz"])
    1
    """
    return pick_best([len(t) if t else None for t in texts])


def pick_random(texts: list[str], rng: random.Random) -> int | None:
    """A seeded random choice among the non-empty texts: what self-play without the RM (N = 1) keeps."""
    eligible = [i for i, t in enumerate(texts) if t]
    return rng.choice(eligible) if eligible else None


def picker_rng(seed: int, dialogue_id: int) -> random.Random:
    """The random picker's generator: one per dialogue, so chunking and resuming never change a pick."""
    return random.Random(f"{seed}|random|{dialogue_id}")


# --------------------------------------------------------------------------- turn texts
def clean_candidate(raw: str, trim: bool = False) -> str:
    """An assistant candidate as kept: cut at the first stop string (a new turn or dialogue),
    optionally cut back to its last complete sentence, stripped.

    >>> clean_candidate(" Paris is the capital.\\nHuman: and Spain?")
    'Paris is the capital.'
    """
    from .comparisons import trim_to_last_sentence
    text = cut_at_stop(raw, STOP_STRINGS)[0].strip()
    return trim_to_last_sentence(text) if trim else text


def clean_user_turn(raw: str) -> str:
    """The user agent's follow-up: its first line, stripped."""
    return cut_at_stop(raw, USER_STOP)[0].strip()


def user_turn_problem(text: str, history: list[Turn], min_chars: int) -> str | None:
    """Why a follow-up cannot continue the dialogue, or ``None`` when it can.

    >>> user_turn_problem("", [("Human", "Hi?")], 10)
    'wrote nothing'
    >>> user_turn_problem("Hi?", [("Human", "hi?"), ("Assistant", "Hello.")], 1)
    'repeated an earlier question'
    """
    if not text:
        return "wrote nothing"
    if len(text) < min_chars:
        return f"wrote fewer than {min_chars} characters"
    low = text.lower()
    if "human:" in low or "assistant:" in low or SEPARATOR in text:
        return "wrote a speaker label or separator"
    if any(role == "Human" and t.strip().lower() == low for role, t in history):
        return "repeated an earlier question"
    return None


# --------------------------------------------------------------------------- the state machine
def new_dialogue(i: int, query: dict) -> dict:
    """A dialogue's state before its first assistant turn.

    ``query`` is a split row ``{"id", "query", ...}``; the state is
    ``{"id": i, "query_id", "query", "turns": [["Human", query]], "scores": [], "end": None}``.
    """
    return {"id": i, "query_id": query["id"], "query": query["query"], "turns": [["Human", query["query"]]],
            "scores": [], "end": None}


def _history(d: dict) -> list[Turn]:
    return [tuple(t) for t in d["turns"]]


def _seed(seed: int, unit: str, role: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{unit}|{role}".encode())) % 2**63


def play_turn(dialogues: list[dict], turn: int, r: RMSPConfig, engine, scorer, prefixes: dict[str, str],
              seed: int, count_tokens, unit: str = "") -> tuple[list[dict], dict]:
    """One assistant turn (and the user's reply) of the open ``dialogues``: ``(records, stats)``.

    ``engine.generate(prompts, params, prefix=..., desc=...)`` samples; ``scorer.score(histories,
    responses)`` returns one float per response; ``prefixes`` holds the ``"assistant"`` (Faithful)
    and ``"user"`` prefixes; ``count_tokens(text) -> int``. The dialogues are not changed: apply the
    records with :func:`apply_record`. A record is one row of ``candidates.jsonl`` (module
    docstring); ``stats`` holds seconds and token counts of this turn::

        {"sample_assistant_s": 41.2, "score_s": 9.8, "sample_user_s": 3.1,
         "assistant_tokens": 10240, "user_tokens": 512, "candidates": 128, "scored": 126}
    """
    n, a = r.candidates, r.assistant
    last = turn == r.assistant_turns - 1
    stats: dict = {}
    t0 = time.perf_counter()
    prompts = [open_turn(_history(d)) for d in dialogues for _ in range(n)]
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            stop=STOP_STRINGS, seed=_seed(seed, unit, "assistant"))
    raw = engine.generate(prompts, params, prefix=prefixes["assistant"], desc=f"rmsp {unit} assistant")
    stats["sample_assistant_s"] = round(time.perf_counter() - t0, 6)
    texts = [clean_candidate(t, r.trim_to_last_sentence) for t in raw]
    stats["assistant_tokens"] = sum(count_tokens(cut_at_stop(t, STOP_STRINGS)[0]) for t in raw)
    stats["candidates"] = len(texts)

    t0 = time.perf_counter()
    scores = _score_candidates(scorer, [_history(d) for d in dialogues for _ in range(n)], texts)
    stats["score_s"] = round(time.perf_counter() - t0, 6)
    stats["scored"] = sum(x is not None for x in scores)

    records = []
    for j, d in enumerate(dialogues):
        mine = range(j * n, (j + 1) * n)
        cands = [{"text": texts[i], "score": scores[i], "chars": len(texts[i]), "tokens": count_tokens(texts[i])}
                 for i in mine]
        picks = {"rm": pick_best([c["score"] for c in cands])}
        if turn == 0:
            picks["random"] = pick_random([c["text"] for c in cands], picker_rng(seed, d["id"]))
            picks["longest"] = pick_longest([c["text"] for c in cands])
        records.append({"dialogue_id": d["id"], "query_id": d["query_id"], "turn": turn, "candidates": cands,
                        "picks": picks, "user": None,
                        "end": END_NO_CANDIDATE if picks["rm"] is None else (END_BUDGET if last else None)})

    t0 = time.perf_counter()
    going = [(d, rec) for d, rec in zip(dialogues, records) if rec["end"] is None]
    follow_ups = _follow_ups(going, r, engine, prefixes["user"], _seed(seed, unit, "user"), unit) if going else []
    stats["sample_user_s"] = round(time.perf_counter() - t0, 6)
    stats["user_tokens"] = sum(count_tokens(f["text"]) for f in follow_ups)
    for (_, rec), follow in zip(going, follow_ups):
        rec["user"] = follow
        rec["end"] = f"user agent {follow['problem']}" if follow["problem"] else None
    return records, stats


def _score_candidates(scorer, histories: list[list[Turn]], texts: list[str]) -> list[float | None]:
    """RM scores of the non-empty candidates in one scorer call; ``None`` for empty ones."""
    idx = [i for i, t in enumerate(texts) if t]
    got = scorer.score([histories[i] for i in idx], [texts[i] for i in idx]) if idx else []
    scores: list[float | None] = [None] * len(texts)
    for i, s in zip(idx, got):
        scores[i] = float(s)
    return scores


def _follow_ups(going: list[tuple[dict, dict]], r: RMSPConfig, engine, prefix: str, seed: int,
                unit: str) -> list[dict]:
    """The user agent's next turn for each ``(dialogue, record)``, in one engine call:
    ``[{"text": "And if ...?", "problem": None}, ...]`` (see :func:`user_turn_problem`)."""
    u = r.user
    histories = [_history(d) + [("Assistant", rec["candidates"][rec["picks"]["rm"]]["text"])] for d, rec in going]
    params = SamplingParams(max_new_tokens=u.max_new_tokens, temperature=u.temperature, top_p=u.top_p,
                            stop=USER_STOP, seed=seed)
    raw = engine.generate([open_turn(h, "Human") for h in histories], params, prefix=prefix, desc=f"rmsp {unit} user")
    out = []
    for h, text in zip(histories, raw):
        follow = clean_user_turn(text)
        out.append({"text": follow, "problem": user_turn_problem(follow, h, r.user_min_chars)})
    return out


def apply_record(d: dict, rec: dict) -> None:
    """Advance dialogue state ``d`` by one record of :func:`play_turn`: the RM's pick becomes the
    Assistant turn, a usable follow-up the next Human turn, and ``end`` says whether it goes on."""
    if rec["dialogue_id"] != d["id"] or d["end"] is not None:
        raise ValueError(f"record of dialogue {rec['dialogue_id']} turn {rec['turn']} does not continue "
                         f"dialogue {d['id']} (ended: {d['end']})")
    k = rec["picks"]["rm"]
    if k is not None:
        d["turns"].append(["Assistant", rec["candidates"][k]["text"]])
        d["scores"].append(rec["candidates"][k]["score"])
    if rec["user"] is not None and rec["user"]["problem"] is None:
        d["turns"].append(["Human", rec["user"]["text"]])
    d["end"] = rec["end"]


# --------------------------------------------------------------------------- artifacts
def dialogue_row(d: dict) -> dict | None:
    """A finished dialogue as a demonstration row (module docstring), or ``None`` without an answer.

    A trailing Human turn (the assistant had no candidate for it) is dropped: a demonstration ends
    with the assistant.
    """
    turns = [list(t) for t in d["turns"]]
    if turns[-1][0] == "Human":
        turns = turns[:-1]
    if len(turns) < 2:
        return None
    return {"id": d["id"], "query_id": d["query_id"], "query": d["query"], "turns": turns,
            "assistant_turns": sum(role == "Assistant" for role, _ in turns), "rm_scores": d["scores"],
            "end": d["end"]}


def single_turn_rows(records: list[dict], queries: dict[int, str], picker: str) -> list[dict]:
    """First-turn demonstrations of one picker: ``{"id", "query_id", "query", "turns", "picker", "score"}``.

    ``queries`` maps a dialogue id to its opening query.
    """
    rows = []
    for rec in records:
        k = rec["picks"].get(picker) if rec["turn"] == 0 else None
        if k is None:
            continue
        cand = rec["candidates"][k]
        q = queries[rec["dialogue_id"]]
        rows.append({"id": rec["dialogue_id"], "query_id": rec["query_id"], "query": q,
                     "turns": [["Human", q], ["Assistant", cand["text"]]], "picker": picker, "score": cand["score"]})
    return rows


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def summarize(records: list[dict], dialogues: list[dict]) -> dict:
    """Counts for the manifest: how dialogues ended, turns, candidates, and the pickers on turn 0."""
    ends: dict[str, int] = {}
    for d in dialogues:
        ends[d["end"]] = ends.get(d["end"], 0) + 1
    rows = [dialogue_row(d) for d in dialogues]
    turns: dict[str, int] = {}
    for row in rows:
        if row is not None:
            turns[str(row["assistant_turns"])] = turns.get(str(row["assistant_turns"]), 0) + 1
    first = [rec for rec in records if rec["turn"] == 0]
    cands = [c for rec in records for c in rec["candidates"]]

    def picked(picker):
        return [rec["candidates"][rec["picks"][picker]] for rec in first if rec["picks"].get(picker) is not None]

    both = [rec for rec in first if rec["picks"]["rm"] is not None]
    return {
        "dialogues": len(dialogues), "demonstrations": sum(r is not None for r in rows),
        "without_an_answer": sum(r is None for r in rows), "ends": ends, "assistant_turns": turns,
        "candidates": len(cands), "empty_candidates": sum(not c["text"] for c in cands),
        "first_turn": {
            "mean_candidate_score": _mean(c["score"] for rec in first for c in rec["candidates"]),
            **{f"mean_score_{p}": _mean(c["score"] for c in picked(p)) for p in PICKERS},
            **{f"mean_chars_{p}": _mean(c["chars"] for c in picked(p)) for p in PICKERS},
            "rm_pick_is_longest": _mean(float(rec["picks"]["rm"] == rec["picks"]["longest"]) for rec in both),
            "rm_pick_is_random": _mean(float(rec["picks"]["rm"] == rec["picks"]["random"]) for rec in both)},
        "mean_kept_score_all_turns": _mean(rec["candidates"][rec["picks"]["rm"]]["score"]
                                           for rec in records if rec["picks"]["rm"] is not None)}


# --------------------------------------------------------------------------- the stage
def _rmsp_cfg(cfg: RunConfig) -> RMSPConfig:
    if cfg.rmsp is None:
        raise ConfigError("rmsp: this recipe has no rmsp section")
    return cfg.rmsp


def reward_model_folder(cfg: RunConfig, need_weights: bool = True) -> Path:
    """The Step-2 RM that picks: ``results/<run>/reward_model/rm``, checked without loading it.

    Stops when Step 2 has not finished with this recipe, or finished but its adapter files are gone
    (trained adapters are not kept in git), saying how to recreate them.
    """
    from .reward import META_FILE
    stage = cfg.run_dir / "reward_model"
    if stage_status(cfg, "reward_model") != "done":
        raise ConfigError(f"rmsp: Step 2 (the reward model) has not finished in {stage}: run it first "
                          "(notebook 02, or python -m almost_utils.cli reward_model)")
    folder = stage / "rm"
    missing = [name for name in ("adapter_model.safetensors", "adapter_config.json", META_FILE)
               if not (folder / name).is_file()]
    if need_weights and missing:
        raise ConfigError(
            f"rmsp: Step 2 finished with this recipe, but the reward model's adapter is missing from {folder} "
            f"({', '.join(missing)}): trained adapters are model weights and are not kept in git. Recreate it by "
            f"retraining Step 2 with the same recipe: delete {stage / 'manifest.json'} and {folder}, then rerun "
            "notebook 02 (or python -m almost_utils.cli reward_model); the other RM and the stored scores are reused "
            "where they still match.")
    return folder


def check_inputs(cfg: RunConfig, need_rm_weights: bool = True) -> tuple[str, list[dict], Path]:
    """Everything RMSP reads, checked before any model loads: ``(user prefix, queries, RM folder)``.

    Raises :class:`ConfigError` naming the field or file: an empty or unparsable user prompt, a
    missing or unfinished RM, unfinished splits, or a split with fewer queries than dialogues.
    """
    from .queries import load_split
    r = _rmsp_cfg(cfg)
    user_prefix = load_user_prompt(cfg.path(r.user_prompt))
    rm_folder = reward_model_folder(cfg, need_rm_weights)
    queries = load_split(cfg, "rmsp")[:r.num_dialogues]
    if len(queries) < r.num_dialogues:
        raise ConfigError(f"rmsp.num_dialogues: {r.num_dialogues} dialogues asked, but the rmsp split in "
                          f"{cfg.run_dir / 'splits'} holds {len(queries)} queries (splits.sizes.rmsp)")
    return user_prefix, queries, rm_folder


class _Models:
    """The assistant/user engine and the RM scorer, loaded on first use only (a finished or fully
    resumed stage loads nothing)."""

    def __init__(self, cfg: RunConfig, rm_folder: Path, engine, scorer, progress: bool):
        self.cfg, self.rm_folder, self.engine, self.scorer, self.progress = cfg, rm_folder, engine, scorer, progress
        self.load_s = 0.0

    def __call__(self):
        t0 = time.perf_counter()
        if self.engine is None:
            from .comparisons import configurations
            from .engines import load_engine
            self.engine = load_engine(self.cfg, configurations(self.cfg)[0].model, progress=self.progress)
        if self.scorer is None:
            from .reward import load_reward_model
            self.scorer = load_reward_model(self.rm_folder, self.cfg.device, self.cfg.reward_model.score_batch_size)
        self.load_s += time.perf_counter() - t0
        return self.engine, self.scorer


def play_dialogue(cfg: RunConfig, query: str, engine=None, scorer=None, seed: int | None = None,
                  count_tokens=None) -> tuple[dict, list[dict]]:
    """Self-play one dialogue from ``query`` with the stage's models and settings, for a live look:
    ``(dialogue state, records)``, one record per assistant turn as in ``candidates.jsonl``.

    Nothing is written. ``engine`` and ``scorer`` default to the models :func:`run_rmsp` uses.
    """
    r = _rmsp_cfg(cfg)
    user_prefix, _, rm_folder = check_inputs(cfg, need_rm_weights=scorer is None)
    from .comparisons import configurations, prompt_prefix
    prefixes = {"assistant": prompt_prefix(cfg, configurations(cfg)[0]), "user": user_prefix}
    engine, scorer = _Models(cfg, rm_folder, engine, scorer, progress=False)()
    d = new_dialogue(0, {"id": -1, "query": query})
    records = []
    for turn in range(r.assistant_turns):
        if d["end"] is not None:
            break
        recs, _ = play_turn([d], turn, r, engine, scorer, prefixes, cfg.seed if seed is None else seed,
                            count_tokens or token_counter(engine), unit=f"live.t{turn}")
        apply_record(d, recs[0])
        records.extend(recs)
    return d, records


def token_counter(engine):
    """``count(text) -> int`` with the engine's tokenizer (no special tokens)."""
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        raise TypeError("rmsp: the engine has no tokenizer to count tokens with; pass count_tokens")
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def run_rmsp(cfg: RunConfig, engine=None, scorer=None, progress: bool = True, count_tokens=None) -> list[dict]:
    """Run (or resume) Step 3 and return the demonstration rows of ``dialogues.jsonl``.

    ``engine`` and ``scorer`` default to the best configuration's model (both agents) and the
    Step-2 RM, loaded only when a unit is left to compute. Units are one turn of a chunk of
    ``rmsp.chunk_dialogues`` dialogues; finished units are read back, never recomputed.
    """
    r = _rmsp_cfg(cfg)
    if stage_status(cfg, STAGE) == "done":        # reads files only; another recipe's folder stops here
        rows = read_jsonl(cfg.run_dir / STAGE / "dialogues.jsonl")
        say(f"rmsp: reusing {len(rows)} dialogues of {cfg.run_dir} (recipe unchanged)")
        return rows
    # bad input stops here, before the folder is claimed and before any model loads
    user_prefix, queries, rm_folder = check_inputs(cfg, need_rm_weights=scorer is None)
    _, fp = begin_stage(cfg, STAGE)
    out = cfg.stage_dir(STAGE)
    from .comparisons import configurations, prompt_prefix
    seed = r.seed if r.seed is not None else cfg.seed
    prefixes = {"assistant": prompt_prefix(cfg, configurations(cfg)[0]), "user": user_prefix}
    store = ResumableJsonl(out / UNITS, fp)
    timings_path = store.folder / TIMINGS_FILE
    timings = read_json(timings_path) if timings_path.is_file() else {}
    models = _Models(cfg, rm_folder, engine, scorer, progress)
    dialogues = [new_dialogue(i, q) for i, q in enumerate(queries)]
    chunks = [dialogues[i:i + r.chunk_dialogues] for i in range(0, len(dialogues), r.chunk_dialogues)]
    records: list[dict] = []
    t_stage, n_new, n_reused = time.perf_counter(), 0, 0
    with Manifest(cfg, STAGE, fp) as man:
        for ci, chunk in enumerate(chunks):
            for turn in range(r.assistant_turns):
                live = [d for d in chunk if d["end"] is None]
                if not live:
                    break
                key = f"c{ci:04d}.t{turn}"
                if store.done(key):
                    rows, n_reused = [{k: v for k, v in row.items() if k != "fingerprint"}
                                      for row in store.get(key)], n_reused + 1
                else:
                    eng, sc = models()
                    rows, stats = play_turn(live, turn, r, eng, sc, prefixes, seed,
                                            count_tokens or token_counter(eng), unit=key)
                    store.put(key, rows)
                    timings[key] = stats
                    write_json(timings_path, timings)
                    n_new += 1
                    say(f"rmsp: chunk {ci + 1}/{len(chunks)}, assistant turn {turn + 1}/{r.assistant_turns} done "
                        f"({len(live)} dialogues x {r.candidates} candidates), "
                        f"{(time.perf_counter() - t_stage) / 60:.1f} min so far")
                if [row["dialogue_id"] for row in rows] != [d["id"] for d in live]:
                    raise ValueError(f"{store.folder / key}.jsonl does not hold the open dialogues of chunk {ci}, "
                                     f"turn {turn}; delete {out} to recompute the stage")
                for d, row in zip(live, rows):
                    apply_record(d, row)
                records.extend(rows)
        if n_reused:
            say(f"rmsp: resumed {cfg.run_dir}: {n_reused} finished units read back, {n_new} computed now")
        _write_outputs(out, dialogues, records)
        _fill_manifest(man, r, summarize(records, dialogues), timings, models.load_s)
    return read_jsonl(out / "dialogues.jsonl")


def _write_outputs(out: Path, dialogues: list[dict], records: list[dict]) -> None:
    records = sorted(records, key=lambda rec: (rec["dialogue_id"], rec["turn"]))
    queries = {d["id"]: d["query"] for d in dialogues}
    write_jsonl(out / "candidates.jsonl", records)
    write_jsonl(out / "dialogues.jsonl", [row for row in map(dialogue_row, dialogues) if row is not None])
    for picker in ("random", "longest"):
        write_jsonl(out / f"dialogues_{picker}.jsonl", single_turn_rows(records, queries, picker))


def _fill_manifest(man: Manifest, r: RMSPConfig, summary: dict, timings: dict, load_s: float) -> None:
    """Counts, and seconds and tokens summed over every unit, whichever session computed it."""
    total = {k: sum(t.get(k, 0) for t in timings.values())
             for k in ("sample_assistant_s", "score_s", "sample_user_s", "assistant_tokens", "user_tokens",
                       "scored")}
    for k, v in summary.items():
        man.count(k, v)
    man.count("units", len(timings))
    man.set_time("sampling_assistant_all_sessions", total["sample_assistant_s"])
    man.set_time("scoring_all_sessions", total["score_s"])
    man.set_time("sampling_user_all_sessions", total["sample_user_s"])
    man.set_time("loading_models", load_s)
    man.count("tokens_sampled", {"assistant": total["assistant_tokens"], "user": total["user_tokens"]})
    man.count("tokens_per_s", {
        "assistant": round(total["assistant_tokens"] / total["sample_assistant_s"], 2)
        if total["sample_assistant_s"] else None,
        "user": round(total["user_tokens"] / total["sample_user_s"], 2) if total["sample_user_s"] else None})
    man.count("candidates_scored_per_s",
              round(total["scored"] / total["score_s"], 2) if total["score_s"] else None)
    man.note("tokens", "tokens of the returned texts after the stop-string cut, counted with the model's tokenizer")
    man.note("candidates_per_turn", r.candidates)
