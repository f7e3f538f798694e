"""Step 3 (RM-guided self-play) and the query splits it starts from, on the tiny recipe.

Unit tests use stand-ins: an engine whose text depends only on (prompt, seed, how often the prompt
already came in this call) and a scorer with a ``.score(histories, responses)`` method. The
integration test runs the real tiny models and an RM trained by the real Step-2 stage on the
Step-1 output of notebook 01 (the ``tiny_run`` fixture).
"""
import random
import shutil
import zlib

import pytest

from almost_utils.artifacts import read_json, read_jsonl, write_jsonl
from almost_utils.config import ConfigError, load_config
from almost_utils.dialogue import STOP_STRINGS
from almost_utils.fingerprint import check_run
from almost_utils.queries import NearDuplicateFilter, generate_splits, load_split
from almost_utils.rmsp import (END_BUDGET, END_NO_CANDIDATE, apply_record, load_user_prompt, new_dialogue,
                               parse_user_prompt, pick_best, pick_longest, pick_random, play_turn, run_rmsp,
                               user_turn_problem)
from conftest import ROOT, TINY, EchoEngine, claim_upstream, mine_queries, mined_query


# --------------------------------------------------------------------------- stand-ins
def _last_human(prompt):
    return prompt.rsplit("Human:", 1)[-1].split("\n")[0].strip() if "Human:" in prompt else ""


def assistant_text(prompt, seed, k):
    """k-th sample for a prompt; special queries make every candidate empty or carry a stop string."""
    q = _last_human(prompt.rsplit("\n\nAssistant:", 1)[0])
    if "SILENT" in q:
        return "\nHuman: nothing to say"                          # cut at the stop string: empty
    words = " ".join(["more"] * ((seed + k * 7) % 5))
    return f" Reply {k} to {q[:20]} {words}.\nHuman: a turn the model should not write"


def user_text(prompt, seed, k):
    first = prompt.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
    if "MUTE" in first:
        return "\nAssistant: the user agent wrote the reply instead"   # cut at the newline: empty
    if "ECHO" in first:
        return " " + first + "\nmore"                                    # repeats the opening question
    return f" And what about case {seed % 97}?\nAssistant: should be cut"


class StandInEngine:
    """Sampling stand-in with a whitespace 'tokenizer'; ``fail_after`` interrupts like Ctrl-C."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    @staticmethod
    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def generate(self, prompts, params, prefix="", desc=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append({"prefix": prefix, "prompts": list(prompts), "params": params})
        seen, out = {}, []
        for p in prompts:
            seen[p] = k = seen.get(p, -1) + 1
            make = user_text if p.endswith("\n\nHuman:") else assistant_text
            out.append(make(p, params.seed, k))
        return out


class StandInScorer:
    """A deterministic score per text that is not its length, so argmax and longest can differ."""

    def __init__(self):
        self.calls = []

    def score(self, histories, responses):
        assert len(histories) == len(responses) and all(responses)    # empty candidates are never scored
        self.calls.append(len(responses))
        return [zlib.crc32(r.encode()) % 1000 / 1000 for r in responses]


def _cfg(out, **extra):
    return load_config(TINY, {"output_dir": str(out), "queries.num_queries": 6, **extra})


def _upstream(cfg):
    """Step 0 with the stand-in miner, Steps 1-2 claimed as finished, then the real splits stage."""
    mine_queries(cfg)
    claim_upstream(cfg, ("comparisons", "reward_model"))
    return generate_splits(cfg, EchoEngine(mined_query), progress=False)


@pytest.fixture
def no_model_loads(monkeypatch):
    import almost_utils.engines as engines
    import almost_utils.reward as reward

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(engines, "load_engine", refuse)
    monkeypatch.setattr(reward, "load_reward_model", refuse)


# --------------------------------------------------------------------------- pickers and prompt
def test_pickers_argmax_first_on_ties_longest_and_seeded_random():
    assert pick_best([0.1, 0.9, 0.9, None]) == 1
    assert pick_best([None, -2.0, -1.5]) == 2
    assert pick_best([None, None]) is None and pick_best([]) is None
    assert pick_longest(["abc", "", "abcd", "wxyz"]) == 2
    assert pick_longest(["", ""]) is None
    texts = ["", "a", "", "b", "c"]
    picks = [pick_random(texts, random.Random(f"s|{i}")) for i in range(40)]
    assert set(picks) == {1, 3, 4}                                     # never an empty candidate
    assert picks == [pick_random(texts, random.Random(f"s|{i}")) for i in range(40)]   # seeded


def test_user_prompt_file_parses_and_bad_files_name_the_field(tmp_path):
    instructions, examples = parse_user_prompt((ROOT / "data" / "prompts" / "user_agent.txt").read_text())
    assert instructions and len(examples) >= 2
    assert all(ex[-1][0] == "Human" and len(ex) >= 3 for ex in examples)
    prefix = load_user_prompt(ROOT / "data" / "prompts" / "user_agent.txt")
    assert prefix.startswith(instructions) and prefix.endswith("\n\n-----")
    bad = {"empty": "  \n", "no examples": "Play a person.\n",
           "starts with a turn": "Human: hi\n\n-----\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n",
           "ends with the assistant": "Play a person.\n\n-----\n\nHuman: a\n\nAssistant: b\n",
           "no follow-up": "Play a person.\n\n-----\n\nHuman: just one question\n"}
    for name, text in bad.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        with pytest.raises(ConfigError, match="rmsp.user_prompt") as err:
            load_user_prompt(path)
        assert str(path) in str(err.value), name


def test_user_turn_problems():
    hist = [("Human", "How do tides work?"), ("Assistant", "The moon pulls the oceans.")]
    assert user_turn_problem("Why twice a day though?", hist, 10) is None
    assert user_turn_problem("", hist, 10) == "wrote nothing"
    assert user_turn_problem("Ok.", hist, 10) == "wrote fewer than 10 characters"
    assert user_turn_problem("how do tides work?", hist, 1) == "repeated an earlier question"
    assert user_turn_problem("Thanks. Assistant: you're welcome", hist, 1) == "wrote a speaker label or separator"


# --------------------------------------------------------------------------- the state machine
def test_play_turn_keeps_the_argmax_stores_all_candidates_and_handles_stops(tiny_cfg):
    r = tiny_cfg.rmsp
    queries = [{"id": 10 + i, "query": q} for i, q in
               enumerate(["How do tides work?", "SILENT question?", "MUTE question here?", "ECHO this one?"])]
    dialogues = [new_dialogue(i, q) for i, q in enumerate(queries)]
    engine, scorer = StandInEngine(), StandInScorer()
    prefixes = {"assistant": "FAITHFUL PREFIX", "user": "USER PREFIX"}
    count = lambda t: len(t.split())                                     # noqa: E731
    records, stats = play_turn(dialogues, 0, r, engine, scorer, prefixes, seed=5, count_tokens=count, unit="u0")

    # one engine call for every candidate of every dialogue, one scorer call, one user call
    assert len(engine.calls) == 2 and len(scorer.calls) == 1
    a_call, u_call = engine.calls
    assert a_call["prefix"] == "FAITHFUL PREFIX" and len(a_call["prompts"]) == r.candidates * len(dialogues)
    assert a_call["prompts"][0] == "\n\nHuman: How do tides work?\n\nAssistant:"
    assert list(a_call["params"].stop) == STOP_STRINGS
    assert u_call["prefix"] == "USER PREFIX" and list(u_call["params"].stop) == ["\n"]
    assert scorer.calls == [3 * r.candidates]                             # the SILENT dialogue has nothing to score
    assert stats["candidates"] == 12 and stats["scored"] == 9 and stats["assistant_tokens"] > 0

    ok, silent, mute, echo = records
    kept = ok["candidates"][ok["picks"]["rm"]]["text"]
    assert len(u_call["prompts"]) == 3                                   # no reply to answer in SILENT's
    assert u_call["prompts"][0] == f"\n\nHuman: How do tides work?\n\nAssistant: {kept}\n\nHuman:"
    for rec in records:                                                   # the record format
        assert set(rec) == {"dialogue_id", "query_id", "turn", "candidates", "picks", "user", "end"}
        assert all(set(c) == {"text", "score", "chars", "tokens"} for c in rec["candidates"])
        assert len(rec["candidates"]) == r.candidates and rec["turn"] == 0
        assert set(rec["picks"]) == {"rm", "random", "longest"}
    for rec in (ok, mute, echo):
        scores = [c["score"] for c in rec["candidates"]]
        assert rec["picks"]["rm"] == scores.index(max(scores))
        for c in rec["candidates"]:
            assert "Human:" not in c["text"] and c["text"].endswith(".")   # cut at the stop string
            assert c["chars"] == len(c["text"]) and c["tokens"] == len(c["text"].split())
    assert any(rec["picks"]["rm"] != rec["picks"]["longest"] for rec in (ok, mute, echo))
    assert silent["picks"] == {"rm": None, "random": None, "longest": None} and silent["end"] == END_NO_CANDIDATE
    assert all(c["text"] == "" and c["score"] is None for c in silent["candidates"]) and silent["user"] is None
    assert ok["end"] is None and ok["user"]["problem"] is None and "\n" not in ok["user"]["text"]
    assert ok["user"]["text"].startswith("And what about case")
    assert mute["end"] == "user agent wrote nothing"
    assert echo["end"] == "user agent repeated an earlier question"

    for d, rec in zip(dialogues, records):
        apply_record(d, rec)
    assert [t[0] for t in dialogues[0]["turns"]] == ["Human", "Assistant", "Human"]
    assert dialogues[0]["turns"][1][1] == ok["candidates"][ok["picks"]["rm"]]["text"]
    assert dialogues[1]["turns"] == [["Human", "SILENT question?"]]
    assert [t[0] for t in dialogues[2]["turns"]] == ["Human", "Assistant"] and dialogues[2]["end"]
    with pytest.raises(ValueError, match="does not continue"):
        apply_record(dialogues[2], mute)                                 # an ended dialogue takes no more turns

    # the last turn: only the first dialogue is open; no user call, the budget ends it
    last, _ = play_turn([dialogues[0]], 1, r, engine, scorer, prefixes, seed=5, count_tokens=count, unit="u1")
    assert len(engine.calls) == 3 and last[0]["end"] == END_BUDGET and last[0]["user"] is None
    assert set(last[0]["picks"]) == {"rm"}                               # other pickers: first turn only
    apply_record(dialogues[0], last[0])
    assert [t[0] for t in dialogues[0]["turns"]] == ["Human", "Assistant", "Human", "Assistant"]


# --------------------------------------------------------------------------- splits
def test_splits_continue_step0_without_overlap_and_resume_to_the_same_rows(tmp_path):
    cfg = _cfg(tmp_path / "a")
    rows = _upstream(cfg)
    step0 = read_jsonl(cfg.run_dir / "queries" / "queries.jsonl")
    sizes = cfg.splits.sizes
    assert len(rows) == sum(sizes.values())
    assert {s: sum(r["split"] == s for r in rows) for s in sizes} == sizes
    assert min(r["id"] for r in rows) == max(q["id"] for q in step0) + 1
    assert len({r["id"] for r in rows}) == len(rows)
    assert min(r["round"] for r in rows) > max(q["round"] for q in step0)
    dedup = NearDuplicateFilter([q["query"] for q in step0], cfg.queries.rouge_threshold)
    assert all(dedup.is_new(r["query"]) for r in rows)                   # nothing Step 1 saw, no near duplicate
    assert load_split(cfg, "rmsp") == [r for r in rows if r["split"] == "rmsp"]
    assert read_json(cfg.run_dir / "splits" / "manifest.json")["counts"]["per_split"] == dict(sorted(sizes.items()))

    again = _cfg(tmp_path / "b")
    mine_queries(again)
    claim_upstream(again, ("comparisons", "reward_model"))
    with pytest.raises(KeyboardInterrupt):
        generate_splits(again, EchoEngine(mined_query, fail_after=1), progress=False)
    assert check_run(again)["splits"] == "resume"
    assert generate_splits(again, EchoEngine(mined_query), progress=False) == rows
    with pytest.raises(ConfigError, match="splits.sizes.nope"):
        load_split(again, "nope")


# --------------------------------------------------------------------------- the stage
def test_stage_writes_every_artifact_and_resumes_to_the_same_result(tmp_path):
    cfg = _cfg(tmp_path / "a")
    _upstream(cfg)
    engine = StandInEngine()
    rows = run_rmsp(cfg, engine, StandInScorer(), progress=False)
    out = cfg.run_dir / "rmsp"
    r = cfg.rmsp
    cands = read_jsonl(out / "candidates.jsonl")
    assert all(len(c["candidates"]) == r.candidates for c in cands)
    assert {c["dialogue_id"] for c in cands} == set(range(r.num_dialogues))
    assert len(rows) == r.num_dialogues and rows == read_jsonl(out / "dialogues.jsonl")
    for row in rows:
        assert row["turns"][0] == ["Human", row["query"]] and row["turns"][-1][0] == "Assistant"
        assert [t[0] for t in row["turns"]] == ["Human", "Assistant"] * row["assistant_turns"]
        kept = [c for c in cands if c["dialogue_id"] == row["id"]]
        assert [t[1] for t in row["turns"][1::2]] == [c["candidates"][c["picks"]["rm"]]["text"] for c in kept]
        assert row["rm_scores"] == [max(x["score"] for x in c["candidates"] if x["score"] is not None) for c in kept]
    split = {q["id"]: q["query"] for q in load_split(cfg, "rmsp")}
    assert all(split[row["query_id"]] == row["query"] for row in rows)
    for picker in ("random", "longest"):
        single = read_jsonl(out / f"dialogues_{picker}.jsonl")
        assert len(single) == r.num_dialogues and all(len(s["turns"]) == 2 and s["picker"] == picker for s in single)
    man = read_json(out / "manifest.json")
    assert man["counts"]["dialogues"] == r.num_dialogues and man["counts"]["units"] == 4
    assert man["counts"]["tokens_per_s"]["assistant"] > 0
    assert set(man["timings_s"]) >= {"sampling_assistant_all_sessions", "scoring_all_sessions",
                                     "sampling_user_all_sessions", "total"}
    # 2 chunks x 2 turns; each turn one assistant call, the first also one user call
    assert len(engine.calls) == 6
    assert run_rmsp(cfg, progress=False) == rows                          # finished: reused, nothing loads

    other = _cfg(tmp_path / "b")
    _upstream(other)
    with pytest.raises(KeyboardInterrupt):
        run_rmsp(other, StandInEngine(fail_after=3), StandInScorer(), progress=False)
    units = sorted(p.name for p in (other.run_dir / "rmsp" / "turns").glob("c*.jsonl"))
    assert units == ["c0000.t0.jsonl", "c0000.t1.jsonl"]
    before = {u: (other.run_dir / "rmsp" / "turns" / u).read_bytes() for u in units}
    resumed = StandInEngine()
    assert run_rmsp(other, resumed, StandInScorer(), progress=False) == rows
    assert len(resumed.calls) == 3                                        # only chunk 1 was computed
    assert {u: (other.run_dir / "rmsp" / "turns" / u).read_bytes() for u in units} == before
    for name in ("candidates.jsonl", "dialogues.jsonl", "dialogues_random.jsonl", "dialogues_longest.jsonl"):
        assert (other.run_dir / "rmsp" / name).read_text() == (out / name).read_text(), name


def test_bad_input_stops_before_any_model_loads_naming_the_field(tmp_path, no_model_loads):
    cfg = _cfg(tmp_path / "run")
    mine_queries(cfg)
    claim_upstream(cfg, ("comparisons",))
    with pytest.raises(ConfigError, match=r"Step 2 \(the reward model\) has not finished"):
        run_rmsp(cfg, progress=False)
    claim_upstream(cfg, ("reward_model",))
    generate_splits(cfg, EchoEngine(mined_query), progress=False)
    with pytest.raises(ConfigError, match="adapter is missing") as err:
        run_rmsp(cfg, progress=False)
    assert "not kept in git" in str(err.value) and "notebook 02" in str(err.value)

    empty = tmp_path / "user.txt"
    empty.write_text("")
    bad = _cfg(tmp_path / "run", **{"rmsp.user_prompt": str(empty)})
    with pytest.raises(ConfigError, match=r"rmsp.user_prompt: .*user.txt is empty"):
        run_rmsp(bad, StandInEngine(), StandInScorer(), progress=False)
    with pytest.raises(ConfigError, match="rmsp.user_prompt: file not found"):
        _cfg(tmp_path / "run", **{"rmsp.user_prompt": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match=r"rmsp.num_dialogues: 7 dialogues asked, .*\(splits.sizes.rmsp\)"):
        _cfg(tmp_path / "run", **{"rmsp.num_dialogues": 7})
    with pytest.raises(ConfigError, match="rmsp: needs splits.sizes.rmsp"):
        _cfg(tmp_path / "run", **{"splits.sizes": {"ppo": 4}})

    # a split file that lost rows (edited by hand) is caught before sampling too
    path = cfg.run_dir / "splits" / "queries.jsonl"
    split = read_jsonl(path)
    write_jsonl(path, [q for q in split if q["split"] != "rmsp"] + [q for q in split if q["split"] == "rmsp"][:3])
    with pytest.raises(ConfigError, match="rmsp.num_dialogues: 6 dialogues asked, but the rmsp split"):
        run_rmsp(cfg, StandInEngine(), StandInScorer(), progress=False)
    assert not (cfg.run_dir / "rmsp").exists()                            # nothing claimed or written


# --------------------------------------------------------------------------- real tiny models
class _Interrupting:
    """A real engine that stops (Ctrl-C) after ``n`` calls."""

    def __init__(self, engine, n):
        self.engine, self.n, self.tokenizer = engine, n, engine.tokenizer

    def generate(self, *args, **kwargs):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.engine.generate(*args, **kwargs)


def test_real_tiny_models_and_a_real_tiny_rm(tiny_run, tmp_path):
    """Step 2 trained for real on notebook 01's tiny pairs, real splits, real self-play; an
    interrupted copy resumes to the same artifact."""
    from almost_utils.comparisons import configurations
    from almost_utils.engines import load_engine
    from almost_utils.reward import load_reward_model
    from almost_utils.reward_stage import run_reward_model_stage
    over = {"reward_model.ablation_no_heuristic_filter": False}     # one RM is enough here (time)
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "a"), **over})
    for stage in ("queries", "comparisons"):
        shutil.copytree(tiny_run / stage, cfg.run_dir / stage)
    run_reward_model_stage(cfg, progress=False)
    assert (cfg.run_dir / "reward_model" / "rm" / "adapter_model.safetensors").is_file()
    engine = load_engine(cfg, configurations(cfg)[0].model, progress=False)
    assert cfg.queries.model == configurations(cfg)[0].model           # one model mines and plays both agents
    generate_splits(cfg, engine, progress=False)
    rows = run_rmsp(cfg, progress=False)                                  # loads its own engine and the RM
    out = cfg.run_dir / "rmsp"
    cands = read_jsonl(out / "candidates.jsonl")
    assert rows and all(len(c["candidates"]) == cfg.rmsp.candidates for c in cands)
    man = read_json(out / "manifest.json")
    assert man["counts"]["tokens_sampled"]["assistant"] > 0 and man["timings_s"]["loading_models"] > 0

    # the stored score of each kept candidate is the RM's score of that text after that history
    scorer = load_reward_model(cfg.run_dir / "reward_model", cfg.device)
    by_id = {row["id"]: row for row in rows}
    checked = 0
    for c in cands:
        if c["picks"]["rm"] is None or c["dialogue_id"] not in by_id:
            continue
        history = [tuple(t) for t in by_id[c["dialogue_id"]]["turns"][:2 * c["turn"] + 1]]
        kept = c["candidates"][c["picks"]["rm"]]
        assert scorer.score([history], [kept["text"]], progress=False)[0] == pytest.approx(kept["score"], abs=1e-4)
        checked += 1
    assert checked >= len(rows)

    # the same recipe in a second folder, interrupted after its first two engine calls, resumes
    copy = load_config(TINY, {"output_dir": str(tmp_path / "b"), **over})
    for stage in ("queries", "comparisons", "reward_model", "splits"):
        shutil.copytree(cfg.run_dir / stage, copy.run_dir / stage)
    with pytest.raises(KeyboardInterrupt):
        run_rmsp(copy, _Interrupting(engine, 2), scorer, progress=False)
    assert check_run(copy)["rmsp"] == "resume"
    assert run_rmsp(copy, engine, scorer, progress=False) == rows
    assert (copy.run_dir / "rmsp" / "candidates.jsonl").read_text() == (out / "candidates.jsonl").read_text()
