"""Answers of several policies to the same held-out queries, scored by the Step-2 reward model.

Step 4 compares three policies this way (stage ``sft_answers``), Step 5 adds ALMoST-PPO (stage
``ppo_answers``, the same queries and seeds):

* ``vanilla``  - the vanilla model behind the assistant agent's few-shot prefix (the Faithful
  demonstrations of the best Step-1 configuration): the prompted baseline;
* ``sft_norm`` - SFT-noRM, trained on self-play turns picked at random (no RM);
* ``sft``      - ALMoST-SFT, trained on the RM's picks.

Every policy answers the first ``answers.num_queries`` queries of ``answers.split`` (fresh
queries no earlier step used), ``answers.samples`` times each, with the same sampling settings
and seeds; the trained policies read the bare inference format ``\\n\\nHuman: {query}\\n\\nAssistant:``.
The RM scores every answer. Our RM leans on length, so each answer also keeps its length and
whether it ended by itself or ran into the token cap.

Outputs under ``results/<run>/sft_answers/``::

    units/<policy>.jsonl   # the resumable units: one policy's answers, scored
    answers.jsonl          # every unit's rows, in policy order
    {"policy": "sft", "query_id": 412, "query": "...", "sample": 0, "answer": "...",
     "score": 0.37, "chars": 311, "tokens": 74, "ended": true}
    summary.json           # per policy: mean score, chars, tokens, ended, each with a cluster-
                           # bootstrap interval (clusters = queries); paired differences
    manifest.json          # seconds per policy (sampling, scoring), counts

Usage::

    rows = run_answers_stage(cfg)            # computes, resumes or reuses
    summary = read_json(cfg.run_dir / "sft_answers" / "summary.json")
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np

from .artifacts import Manifest, ResumableJsonl, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, RunConfig
from .fingerprint import begin_stage, stage_status
from .progress import say
from .sampling import SamplingParams, cut_at_stop

STAGE = "sft_answers"
POLICIES = {"vanilla": "vanilla, prompted (Faithful few-shot)", "sft_norm": "SFT-noRM", "sft": "ALMoST-SFT",
            "ppo": "ALMoST-PPO"}
# which policies each stage samples: Step 4's three, then Step 5's one (compared with Step 4's rows)
STAGE_POLICIES = {"sft_answers": ("vanilla", "sft_norm", "sft"), "ppo_answers": ("ppo",)}
METRICS = ("score", "chars", "tokens", "ended")
# the comparisons a reader asks for first: the RM's guidance, SFT against prompting, PPO against SFT
PAIRS = (("sft", "sft_norm"), ("sft", "vanilla"), ("sft_norm", "vanilla"), ("ppo", "sft"), ("ppo", "vanilla"))


def _answers_cfg(cfg: RunConfig):
    if cfg.answers is None:
        raise ConfigError("answers: this recipe has no answers section")
    return cfg.answers


def check_inputs(cfg: RunConfig, need_rm_weights: bool = True, stage: str = STAGE) -> tuple[list[dict], Path]:
    """The queries and the RM folder, checked before any model loads.

    Raises :class:`ConfigError` naming what is missing: an unfinished SFT variant (or its adapter
    folder), an unfinished RM, unmined splits.
    """
    from .queries import load_split
    from .rmsp import reward_model_folder
    from .sft import ADAPTER_DIR, META_FILE
    a = _answers_cfg(cfg)
    if stage == "ppo_answers":
        for need in ("ppo", "sft_answers"):
            if stage_status(cfg, need) != "done":
                raise ConfigError(f"{stage}: the {need} stage has not finished in {cfg.run_dir / need}: run it first "
                                  f"(python -m almost_utils.cli {need})")
    for variant in ("sft", "sft_norm"):
        if stage_status(cfg, variant) != "done":
            raise ConfigError(f"{STAGE}: Step 4's {variant} stage has not finished in {cfg.run_dir / variant}: "
                              f"train it first (notebook 04, or python -m almost_utils.cli {variant})")
    for variant in ("sft", "sft_norm"):
        if not (cfg.run_dir / variant / ADAPTER_DIR / META_FILE).is_file():
            raise ConfigError(f"{STAGE}: {cfg.run_dir / variant / ADAPTER_DIR} is missing: the {variant} adapter "
                              "was deleted after training; delete that stage folder and train it again")
    rm_folder = reward_model_folder(cfg, need_rm_weights)
    queries = load_split(cfg, a.split)[:a.num_queries]
    if not queries:
        raise ConfigError(f"answers.split: the {a.split} split in {cfg.run_dir / 'splits'} is empty")
    return queries, rm_folder


def sampling_params(cfg: RunConfig, policy: str) -> SamplingParams:
    """The same settings for every policy; the seed depends on the run seed only, so that every
    policy draws its random numbers from the same streams."""
    from .dialogue import STOP_STRINGS
    a = _answers_cfg(cfg)
    seed = a.seed if a.seed is not None else cfg.seed
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          stop=STOP_STRINGS, seed=(seed * 1_000_003 + zlib.crc32(b"answers")) % 2**63)


def answer_rows(policy_name: str, policy, queries: list[dict], params: SamplingParams, samples: int,
                prefix: str = "") -> list[dict]:
    """Sample ``samples`` answers per query with ``policy`` (a :class:`~almost_utils.sft.Policy`) in
    one engine call; rows as in ``answers.jsonl`` without the score."""
    asked = [q for q in queries for _ in range(samples)]
    tokens = policy.generate_tokens([q["query"] for q in asked], params, prefix=prefix,
                                    desc=f"answers {policy_name}")
    tok = policy.tokenizer
    rows = []
    for i, (q, ids) in enumerate(zip(asked, tokens)):
        text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), params.stop)
        text = text.strip()
        rows.append({"policy": policy_name, "query_id": q["id"], "query": q["query"], "sample": i % samples,
                     "answer": text, "chars": len(text),
                     "tokens": len(tok(text, add_special_tokens=False)["input_ids"]),
                     "ended": bool(stopped or len(ids) < params.max_new_tokens)})
    return rows


def score_rows(rows: list[dict], scorer, prompt_key: str = "query") -> None:
    """Add the RM's ``score`` to every row (``None`` for an empty answer), in one scorer call; the
    question is the row's ``prompt_key``."""
    idx = [i for i, r in enumerate(rows) if r["answer"]]
    got = scorer.score([[("Human", rows[i][prompt_key])] for i in idx], [rows[i]["answer"] for i in idx]) if idx else []
    for r in rows:
        r["score"] = None
    for i, s in zip(idx, got):
        rows[i]["score"] = float(s)


def load_answer_policy(cfg: RunConfig, policy: str, progress: bool = True):
    """``(Policy, prefix)``: the vanilla model with the Faithful prefix, or a trained SFT policy bare."""
    from .comparisons import configurations, prompt_prefix
    from .sft import load_policy
    if policy == "ppo":
        from .ppo import load_ppo_policy
        return load_ppo_policy(cfg.run_dir, cfg.device, progress=progress), ""
    if policy == "vanilla":
        return load_policy(cfg, vanilla=True, progress=progress), prompt_prefix(cfg, configurations(cfg)[0])
    return load_policy(cfg, policy, progress=progress), ""


# --------------------------------------------------------------------------- statistics
def summarize(rows: list[dict], n_samples: int = 1000, seed: int = 0) -> dict:
    """Per policy the mean of each metric with a cluster-bootstrap interval (clusters = queries;
    an empty answer's score counts as missing), and paired differences between policies on the
    same (query, sample) items::

        {"policies": {"sft": {"n": 80, "clusters": 40, "score": {"mean", "ci_low", "ci_high"}, ...}},
         "differences": {"sft - sft_norm": {"score": {"mean", "ci_low", "ci_high", "n"}, "chars": {...}}}}
    """
    from .rm_eval import bootstrap_ci
    by_policy: dict[str, dict] = {}
    for r in rows:
        by_policy.setdefault(r["policy"], {})[(r["query_id"], r["sample"])] = r
    out: dict = {"policies": {}, "differences": {}}
    for name, items in by_policy.items():
        entry: dict = {"n": len(items), "clusters": len({k[0] for k in items}),
                       "empty": sum(not r["answer"] for r in items.values())}
        for m in METRICS:
            keep = [(k, float(r[m])) for k, r in items.items() if r[m] is not None]
            vals = np.array([v for _, v in keep])
            lo, hi = bootstrap_ci(vals, n_samples, seed, clusters=[k[0] for k, _ in keep])
            entry[m] = {"mean": float(vals.mean()) if len(vals) else None, "ci_low": lo, "ci_high": hi}
        out["policies"][name] = entry
    for a, b in PAIRS:
        if a not in by_policy or b not in by_policy:
            continue
        diff: dict = {}
        for m in ("score", "chars"):
            common = [k for k in by_policy[a] if k in by_policy[b]
                      and by_policy[a][k][m] is not None and by_policy[b][k][m] is not None]
            d = np.array([float(by_policy[a][k][m]) - float(by_policy[b][k][m]) for k in common])
            lo, hi = bootstrap_ci(d, n_samples, seed, clusters=[k[0] for k in common])
            diff[m] = {"mean": float(d.mean()) if len(d) else None, "ci_low": lo, "ci_high": hi, "n": len(d)}
        out["differences"][f"{a} - {b}"] = diff
    return out


def _pairs(answers: list[dict], a: str, b: str) -> list[tuple[dict, dict]]:
    by = {(r["policy"], r["query_id"], r["sample"]): r for r in answers}
    return [(by[(a, q, s)], by[(b, q, s)]) for (p, q, s) in by if p == a and (b, q, s) in by
            and by[(a, q, s)]["score"] is not None and by[(b, q, s)]["score"] is not None]


def _fit(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``score ~ 1 + chars + is_policy``: ``(c, b)`` = the policy coefficient and the slope."""
    x = np.array([[1.0, ch, is_policy] for ch, _, is_policy in rows])
    y = np.array([s for _, s, _ in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(coef[2]), float(coef[1])


def matched_length_gain(answers: list[dict], policy: str, base: str, n_samples: int = 1000,
                        seed: int = 0) -> dict:
    """The RM-score change from ``base`` to ``policy``, split into the part at equal length and
    the part explained by length; intervals resample queries.

    Our RM prefers longer answers, so a policy can raise its score by writing more. One least-
    squares fit ``score = a + b * chars + c * [policy]`` over both policies' answers gives ``c``,
    the score gained *at equal length*, and ``b * (mean change in chars)``, the part the length
    change explains::

        {"total": {"mean", "ci_low", "ci_high"}, "at_equal_length": {...}, "through_length": {...},
         "slope_per_100_chars": float, "pairs": int, "queries": int}
    """
    pairs = _pairs(answers, policy, base)
    if len(pairs) < 3:
        return {"pairs": len(pairs)}
    qids = sorted({a["query_id"] for a, _ in pairs})
    by_q = {q: [(a, b) for a, b in pairs if a["query_id"] == q] for q in qids}

    def stats(chosen):
        rows = [(b["chars"], b["score"], 0.0) for _, b in chosen] + [(a["chars"], a["score"], 1.0) for a, _ in chosen]
        c, slope = _fit(rows)
        total = float(np.mean([a["score"] - b["score"] for a, b in chosen]))
        dchars = float(np.mean([a["chars"] - b["chars"] for a, b in chosen]))
        return total, c, slope * dchars, slope

    total, c, through, slope = stats(pairs)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_samples):
        draw = [pair for q in rng.choice(qids, size=len(qids)) for pair in by_q[q]]
        boot.append(stats(draw)[:3])
    boot = np.array(boot)
    ci = lambda j: (float(np.quantile(boot[:, j], 0.025)), float(np.quantile(boot[:, j], 0.975)))  # noqa: E731
    return {"total": {"mean": total, "ci_low": ci(0)[0], "ci_high": ci(0)[1]},
            "at_equal_length": {"mean": c, "ci_low": ci(1)[0], "ci_high": ci(1)[1]},
            "through_length": {"mean": through, "ci_low": ci(2)[0], "ci_high": ci(2)[1]},
            "slope_per_100_chars": 100 * slope, "pairs": len(pairs), "queries": len(qids)}


# --------------------------------------------------------------------------- the stage
def run_answers_stage(cfg: RunConfig, progress: bool = True, scorer=None, policies=None,
                      stage: str = STAGE) -> list[dict]:
    """Run (or resume, or reuse) ``stage`` (``sft_answers`` or ``ppo_answers``); returns the rows
    of its ``answers.jsonl``. ``ppo_answers``' summary also holds Step 4's rows, for pairing.

    One unit per policy; a finished unit is read back. ``scorer`` and ``policies``
    (``{name: (Policy, prefix)}``) are for tests; by default the RM and each policy load when
    their unit is computed, one policy in memory at a time.
    """
    if stage not in STAGE_POLICIES:
        raise ConfigError(f"unknown answers stage {stage!r} (known: {', '.join(STAGE_POLICIES)})")
    a = _answers_cfg(cfg)
    out = cfg.run_dir / stage
    if stage_status(cfg, stage) == "done":
        rows = read_jsonl(out / "answers.jsonl")
        say(f"{stage}: reusing {len(rows)} answers of {cfg.run_dir} (recipe unchanged)")
        return rows
    queries, rm_folder = check_inputs(cfg, need_rm_weights=scorer is None, stage=stage)
    _, fp = begin_stage(cfg, stage)
    store = ResumableJsonl(cfg.stage_dir(stage) / "units", fp)
    timings_path = store.folder / "timings.json"
    timings = read_json(timings_path) if timings_path.is_file() else {}
    rows: list[dict] = []
    with Manifest(cfg, stage, fp) as man:
        for name in STAGE_POLICIES[stage]:
            if store.done(name):
                rows.extend({k: v for k, v in r.items() if k != "fingerprint"} for r in store.get(name))
                continue
            t0 = time.perf_counter()
            policy, prefix = (policies or {}).get(name) or load_answer_policy(cfg, name, progress)
            t1 = time.perf_counter()
            unit = answer_rows(name, policy, queries, sampling_params(cfg, name), a.samples, prefix)
            t2 = time.perf_counter()
            del policy
            if scorer is None:
                from .reward import load_reward_model
                scorer = load_reward_model(rm_folder, cfg.device, cfg.reward_model.score_batch_size)
            score_rows(unit, scorer)
            timings[name] = {"loading_s": round(t1 - t0, 3), "sampling_s": round(t2 - t1, 3),
                             "scoring_s": round(time.perf_counter() - t2, 3),
                             "tokens": sum(r["tokens"] for r in unit)}
            store.put(name, unit)
            write_json(timings_path, timings)
            say(f"{stage}: {POLICIES[name]} answered {len(unit)} times, "
                f"{timings[name]['sampling_s']:.0f} s sampling, {timings[name]['scoring_s']:.0f} s scoring")
            rows.extend(unit)
        earlier = read_jsonl(cfg.run_dir / STAGE / "answers.jsonl") if stage != STAGE else []
        summary = summarize(earlier + rows, cfg.reward_model.bootstrap_samples, cfg.seed)
        write_jsonl(out / "answers.jsonl", rows)
        write_json(out / "summary.json", summary)
        for name, t in timings.items():
            for k, v in t.items():
                if k.endswith("_s"):
                    man.set_time(f"{name}_{k[:-2]}", v)
            man.count(f"{name}_tokens_per_s", round(t["tokens"] / t["sampling_s"], 2) if t["sampling_s"] else None)
        man.count("queries", len(queries))
        man.count("answers", len(rows))
        for name, entry in summary["policies"].items():
            man.count(f"{name}_mean_score", entry["score"]["mean"])
            man.count(f"{name}_mean_chars", entry["chars"]["mean"])
    return rows
