"""What a stage's outputs depend on, and the rule that keeps stale outputs out of a run.

Every stage records, next to its outputs, the exact inputs it read, flattened to dotted keys:
the recipe fields, the content (sha256) of its input files, the sources of its models, and the
fingerprint of the stage it reads from. Their hash is the stage's *fingerprint*::

    results/<run>/<stage>/fingerprint.json
    {"stage": "queries", "fingerprint": "3f1c...",
     "inputs": {"seed": 1234, "queries.num_queries": 210, "file:queries.seeds_file": "9a0b...", ...}}

On a rerun, the same fingerprint means *reuse* (the stage finished) or *resume* (it did not);
any other fingerprint stops the run before a model loads, with the fields that differ and the
two ways out. Because a stage's fingerprint includes its upstream's, every fingerprint of a run
can be computed from the recipe alone, so :func:`check_run` vets every stage up front.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .artifacts import read_json, write_json
from .config import ConfigError, RunConfig

FINGERPRINT_FILE = "fingerprint.json"
# Stages in the order a run computes them, each with the stage it reads from.
# rmsp also reads the splits: their fingerprint is one of its inputs (a stage names one upstream here).
UPSTREAM: dict[str, str | None] = {"queries": None, "comparisons": "queries", "reward_model": "comparisons",
                                   "splits": "queries", "rmsp": "reward_model", "sft": "rmsp", "sft_norm": "rmsp",
                                   "sft_answers": "sft_norm", "ppo": "sft", "ppo_answers": "ppo",
                                   "evaluation": "reward_model"}
# Stages that run only when the recipe has these sections.
SECTIONS: dict[str, tuple[str, ...]] = {"reward_model": ("reward_model",), "splits": ("splits",),
                                        "rmsp": ("reward_model", "splits", "rmsp"),
                                        "sft": ("reward_model", "splits", "rmsp", "sft"),
                                        "sft_norm": ("reward_model", "splits", "rmsp", "sft"),
                                        "sft_answers": ("reward_model", "splits", "rmsp", "sft", "answers"),
                                        "ppo": ("reward_model", "splits", "rmsp", "sft", "ppo"),
                                        "ppo_answers": ("reward_model", "splits", "rmsp", "sft", "answers", "ppo"),
                                        "evaluation": ("reward_model", "splits", "rmsp", "sft", "evaluation")}


class StaleOutputError(ConfigError):
    """A stage folder holds outputs of another recipe; the message names what differs."""


# --------------------------------------------------------------------------- inputs of a stage
def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, dataclasses -> dicts) so recorded and fresh values compare equal."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``; lists stay whole values."""
    value = _plain(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def file_digest(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _folder_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.json")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _models(cfg: RunConfig, keys) -> dict[str, Any]:
    out = {}
    for key in sorted(set(keys)):
        out.update(_flatten(f"models.{key}", cfg.models[key]))
    return out


def _common(cfg: RunConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "device": cfg.device, **_flatten("sampling", cfg.sampling)}


def _queries_inputs(cfg: RunConfig) -> dict[str, Any]:
    q = cfg.queries
    return {**_common(cfg), **_flatten("queries", q), **_models(cfg, [q.model]),
            "file:queries.seeds_file": file_digest(cfg.path(q.seeds_file))}


def _comparisons_inputs(cfg: RunConfig) -> dict[str, Any]:
    c = cfg.comparisons
    used = sorted({conf.demos for rank in c.rubric for conf in rank})
    files = {"file:comparisons.preamble": file_digest(cfg.path(c.preamble))}
    files.update({f"file:comparisons.demonstrations.{k}": file_digest(cfg.path(c.demonstrations[k])) for k in used})
    models = [conf.model for rank in c.rubric for conf in rank]
    return {**_common(cfg), **_flatten("comparisons", c), **_models(cfg, models), **files}


def _reward_model_inputs(cfg: RunConfig) -> dict[str, Any]:
    rm = cfg.reward_model
    if rm is None:
        raise ConfigError("reward_model: this recipe has no reward_model section")
    from .bigbench import SDIST_NAME, SDIST_VERSION
    if rm.hhh_dir:
        hhh_dir = cfg.path(rm.hhh_dir)
        if not hhh_dir.is_dir():
            raise ConfigError(f"reward_model.hhh_dir: folder not found: {hhh_dir}")
        bench = f"folder:{_folder_digest(hhh_dir)}"
    else:        # the pinned, sha256-checked source archive: its name says what it holds
        bench = f"{SDIST_NAME}=={SDIST_VERSION}"
    return {"seed": cfg.seed, "device": cfg.device, **_flatten("reward_model", rm), **_models(cfg, [rm.model]),
            "benchmark:hhh": bench}


def _splits_inputs(cfg: RunConfig) -> dict[str, Any]:
    """Mining settings come through the upstream (queries) fingerprint; here only the split sizes."""
    if cfg.splits is None:
        raise ConfigError("splits: this recipe has no splits section")
    return {**_common(cfg), **_flatten("splits", cfg.splits)}


def _rmsp_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The self-play settings, the user agent's prompt file, the assistant's configuration (its
    Faithful prefix files are in the comparisons fingerprint, upstream of the RM) and the splits."""
    r = cfg.rmsp
    if r is None:
        raise ConfigError("rmsp: this recipe has no rmsp section")
    assistant = cfg.comparisons.rubric[0][0]       # the best configuration (comparisons.configurations()[0])
    return {**_common(cfg), **_flatten("rmsp", r), **_flatten("rmsp.assistant_configuration", assistant),
            **_models(cfg, [assistant.model]), "file:rmsp.user_prompt": file_digest(cfg.path(r.user_prompt)),
            "upstream:splits": stage_fingerprint(cfg, "splits")}


def _sft_inputs(variant: str):
    """One SFT variant: the whole sft section (both variants' files, so that either stage's
    fingerprint covers everything the other reads) and the policy model."""
    def inputs(cfg: RunConfig) -> dict[str, Any]:
        t = cfg.sft
        if t is None:
            raise ConfigError(f"{variant}: this recipe has no sft section")
        return {"seed": cfg.seed, "device": cfg.device, "sft.variant": variant, **_flatten("sft", t),
                **_models(cfg, [t.model])}
    return inputs


def _sft_answers_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The answer settings, the prompted baseline's configuration, and every stage whose outputs it
    loads: both SFT adapters (sft_norm is the registered upstream), the RM and the splits."""
    a = cfg.answers
    if a is None:
        raise ConfigError("sft_answers: this recipe has no answers section")
    assistant = cfg.comparisons.rubric[0][0]
    return {**_common(cfg), **_flatten("answers", a), **_flatten("answers.baseline_configuration", assistant),
            **_models(cfg, [cfg.sft.model]), "upstream:sft": stage_fingerprint(cfg, "sft"),
            "upstream:reward_model": stage_fingerprint(cfg, "reward_model"),
            "upstream:splits": stage_fingerprint(cfg, "splits")}


def _ppo_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The PPO settings and the stages it loads: the SFT policy it starts from (its registered
    upstream is sft; another start is named here), the RM and the splits."""
    p = cfg.ppo
    if p is None:
        raise ConfigError("ppo: this recipe has no ppo section")
    return {**_common(cfg), **_flatten("ppo", p), f"upstream:{p.start_from}": stage_fingerprint(cfg, p.start_from),
            "upstream:reward_model": stage_fingerprint(cfg, "reward_model"),
            "upstream:splits": stage_fingerprint(cfg, "splits")}


def _ppo_answers_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The answer settings and Step 4's answers, which its summary pairs with (ppo is the upstream)."""
    if cfg.answers is None:
        raise ConfigError("ppo_answers: this recipe has no answers section")
    return {**_common(cfg), **_flatten("answers", cfg.answers), "upstream:sft_answers": stage_fingerprint(cfg, "sft_answers")}


def _evaluation_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The evaluation settings, its data files, the prompted baseline's demonstrations, the
    instruction-tuned model, the benchmark archive, and every trained policy it loads."""
    e = cfg.evaluation
    if e is None:
        raise ConfigError("evaluation: this recipe has no evaluation section")
    from .bigbench import SDIST_NAME, SDIST_VERSION
    c = cfg.comparisons
    files = {"file:evaluation.questions_file": file_digest(cfg.path(e.questions_file)),
             "file:evaluation.probe_file": file_digest(cfg.path(e.probe_file)),
             "file:comparisons.preamble": file_digest(cfg.path(c.preamble)),
             f"file:comparisons.demonstrations.{e.vanilla_demos}": file_digest(cfg.path(c.demonstrations[e.vanilla_demos]))}
    models = [cfg.sft.model] + ([e.instruct_model] if "instruct" in e.policies else [])
    upstream = {f"upstream:{p}": stage_fingerprint(cfg, p) for p in e.policies if p in ("sft", "sft_norm", "ppo")}
    return {**_common(cfg), **_flatten("evaluation", e), **_models(cfg, models), **files, **upstream,
            "benchmark:bigbench": (f"folder:{_folder_digest(cfg.path(e.bigbench_dir))}" if e.bigbench_dir
                                   else f"{SDIST_NAME}=={SDIST_VERSION}")}


INPUTS = {"queries": _queries_inputs, "comparisons": _comparisons_inputs, "reward_model": _reward_model_inputs,
          "splits": _splits_inputs, "rmsp": _rmsp_inputs,
          "sft": _sft_inputs("sft"), "sft_norm": _sft_inputs("sft_norm"),
          "sft_answers": _sft_answers_inputs, "ppo": _ppo_inputs, "ppo_answers": _ppo_answers_inputs,
          "evaluation": _evaluation_inputs}


def stage_inputs(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """Everything ``stage`` reads, as ``{dotted key: value}``, its upstream's fingerprint included."""
    if stage not in INPUTS:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(INPUTS)})")
    inputs = INPUTS[stage](cfg)
    up = UPSTREAM[stage]
    if up is not None:
        inputs[f"upstream:{up}"] = stage_fingerprint(cfg, up)
    return inputs


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(cfg: RunConfig, stage: str) -> str:
    return fingerprint_of(stage_inputs(cfg, stage))


def run_stages(cfg: RunConfig) -> list[str]:
    """The stages this recipe computes, in order."""
    return [s for s in UPSTREAM if all(getattr(cfg, sec, None) is not None for sec in SECTIONS.get(s, ()))]


def run_fingerprint(cfg: RunConfig) -> str:
    """The fingerprint of the whole recipe: of every stage's fingerprint (the stages branch after
    Step 4, so no single stage covers all the others)."""
    return fingerprint_of({s: stage_fingerprint(cfg, s) for s in run_stages(cfg)})


# --------------------------------------------------------------------------- the rule
def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every input that changed (``<absent>`` where one lacks it)."""
    missing = "<absent>"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)]


def _short(value: Any, limit: int = 90) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _has_outputs(folder: Path) -> bool:
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


def stale_message(cfg: RunConfig, stage: str, folder: Path, diffs: list[tuple[str, Any, Any]] | None) -> str:
    if diffs is None:
        what = (f"{stage}: {folder} holds outputs without a {FINGERPRINT_FILE} (an older version of this "
                "project or a hand-made folder), so nothing says which recipe made them.")
    else:
        lines = [f"  {k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs]
        what = (f"{stage}: {folder} was computed with a different recipe; {len(diffs)} input(s) differ "
                "(recorded -> now):\n" + "\n".join(lines))
    return (f"{what}\nIts outputs are left as they are. Two ways out:\n"
            f"  - a new run name: OVERRIDES='{{\"run_name\": \"{cfg.run_name}-b\"}}' bash run_all.sh "
            f"(CLI: --set run_name={cfg.run_name}-b), or\n"
            f"  - recompute this recipe from nothing into a new folder: FRESH=1 bash run_all.sh (CLI: --fresh).")


def stage_status(cfg: RunConfig, stage: str) -> str:
    """``"new"``, ``"resume"`` (started, same recipe) or ``"done"`` (finished, same recipe).

    Raises :class:`StaleOutputError` when the folder holds outputs of another recipe. Reads files
    only: no model is loaded.
    """
    folder = cfg.run_dir / stage
    inputs = stage_inputs(cfg, stage)
    record_path = folder / FINGERPRINT_FILE
    if not record_path.is_file():
        if _has_outputs(folder):
            raise StaleOutputError(stale_message(cfg, stage, folder, None))
        return "new"
    record = read_json(record_path)
    if record.get("fingerprint") != fingerprint_of(inputs):
        raise StaleOutputError(stale_message(cfg, stage, folder, differences(record.get("inputs", {}), inputs)))
    manifest = folder / "manifest.json"
    done = manifest.is_file() and read_json(manifest).get("fingerprint") == record["fingerprint"]
    return "done" if done else "resume"


def begin_stage(cfg: RunConfig, stage: str) -> tuple[str, str]:
    """Check the stage folder and claim it for this recipe; returns ``(status, fingerprint)``.

    A new stage gets its ``fingerprint.json`` before its first unit of work is written, so every
    unit on disk belongs to the recorded recipe.
    """
    status = stage_status(cfg, stage)
    inputs = stage_inputs(cfg, stage)
    fp = fingerprint_of(inputs)
    if status == "new":
        write_json(cfg.stage_dir(stage) / FINGERPRINT_FILE, {"stage": stage, "fingerprint": fp, "inputs": inputs})
    return status, fp


def check_run(cfg: RunConfig, stages: list[str] | None = None) -> dict[str, str]:
    """Vet every stage of the run before anything heavy starts; ``{stage: status}``.

    Raises :class:`StaleOutputError` for the first stage whose folder holds another recipe's outputs.
    """
    return {s: stage_status(cfg, s) for s in (stages or run_stages(cfg))}


def fresh_output_dir(cfg: RunConfig) -> str:
    """Where ``--fresh`` / ``FRESH=1`` recomputes this recipe: a folder named by its fingerprint.

    Rerunning with ``FRESH=1`` after an interruption resumes in the same folder; a changed recipe
    gets a folder of its own. Delete the folder to recompute it again from nothing.
    """
    return str(Path("results") / f"{cfg.run_name}-fresh-{run_fingerprint(cfg)[:8]}")
