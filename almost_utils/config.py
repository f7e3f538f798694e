"""One YAML recipe holds every parameter of a run.

The recipe is parsed into typed dataclasses and validated before anything heavy happens, so a
typo or a bad value fails in a second with the dotted path of the offending field
(``comparisons.rubric[2].shots: expected an integer, got 'three'``) instead of an hour into a
run. Recipes live in ``data/configs/<scale>.yaml``; notebooks take the path plus overrides::

    cfg = load_config("data/configs/cpu.yaml", {"queries.num_queries": 40})
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A recipe is malformed; the message names the field."""


# --------------------------------------------------------------------------- schema
@dataclass
class TinySpec:
    """Shape of a randomly initialised model built around a real tokenizer (tests, demos)."""
    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    sliding_window: int = 16


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    ``source`` is a hub id or local folder (``Qwen/Qwen2.5-0.5B``), a packaged offline model
    (``packaged:gemma-3-270m``, ``packaged:smollm2-135m-instruct``) or ``tiny:<source>`` for a
    random model that borrows the tokenizer of ``<source>``.
    """
    source: str
    drop_layers: Optional[list[int]] = None   # remove these decoder layers (a smaller model)
    load_in_4bit: bool = False            # bitsandbytes NF4 (QLoRA); CUDA only
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16
    tiny: Optional[TinySpec] = None


@dataclass
class SamplingConfig:
    backend: str = "transformers"         # transformers | vllm
    batch_size: int = 16
    gpu_memory_utilization: float = 0.85  # vllm only
    max_model_len: Optional[int] = None   # vllm only: context to reserve KV cache for (None = the model's)
    tensor_parallel_size: int = 1         # vllm only: GPUs one model is split over


@dataclass
class QueriesConfig:
    """Step 0: self-instruct query generation (docs/method.md)."""
    model: str
    seeds_file: str = "data/seed_queries.txt"
    num_queries: int = 200
    shots: int = 10
    temperature: float = 1.2
    top_p: float = 0.9
    max_new_tokens: int = 64
    min_chars: int = 30
    max_chars: int = 250
    rouge_threshold: float = 0.5
    max_attempts: int = 4000              # give up after this many generations


@dataclass
class Configuration:
    """One way of prompting a vanilla model: (model, demonstration set, shots)."""
    model: str
    demos: str
    shots: int
    name: Optional[str] = None

    def __post_init__(self):
        if self.name is None:
            self.name = f"{self.model}-{self.demos}-{self.shots}shot"


@dataclass
class ComparisonsConfig:
    """Step 1: synthetic comparisons from a rubric of configurations."""
    rubric: list[list[Configuration]]     # best rank first; several entries in a rank = a tie
    preamble: str = "data/demonstrations/preamble.txt"
    demonstrations: dict[str, str] = field(default_factory=lambda: {
        "hhh": "data/demonstrations/hhh.txt", "faithful": "data/demonstrations/faithful.txt"})
    num_queries: Optional[int] = None     # None = every Step-0 query
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"faithful": 768, "hhh": 384})
    min_chars: int = 50
    require_final_punctuation: bool = True   # drop responses not ending in . or ! (tiny: off)
    trim_to_last_sentence: bool = False      # cut an unfinished response back to its last . or !
    heuristic_filter: bool = True
    pairing: str = "authors"                 # authors (their released ranking code) | chain (one link per response)


@dataclass
class RewardModelConfig:
    """Step 2: reward model on the synthetic comparisons (LoRA on CPU, QLoRA on CUDA)."""
    model: str                            # a key of ``models``: the backbone
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    epochs: int = 1
    batch_size: int = 8                   # pairs per device step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_length: int = 1024                # tokens, left-truncated
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    eval_fraction: float = 0.1            # held-out share of the synthetic pairs (split by query)
    ablation_no_heuristic_filter: bool = True
    bootstrap_samples: int = 1000
    lora_layers: Optional[int] = None     # LoRA on the top N decoder layers only (None = all): backward stops early
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    logging_steps: int = 5                # optimizer steps between training-log rows
    eval_steps: Optional[int] = None      # held-out evaluation every N optimizer steps while training (None: at the end only)
    max_train_pairs: Optional[int] = None  # seeded subsample of the training pairs of each RM (None = all)
    score_batch_size: int = 16            # sequences per forward pass when scoring
    hhh_dir: Optional[str] = None         # a folder laid out like data/bigbench/ (None = that cache, fetched once)


@dataclass
class SplitsConfig:
    """Fresh queries for Steps 3-6, mined after Step 0 with its model, prompt and filters.

    ``sizes`` names each split and its number of queries (``{"rmsp": 60, "ppo": 64, "heldout": 40}``);
    the mined queries are assigned to the splits by a seeded shuffle (almost_utils/queries.py).
    """
    sizes: dict[str, int] = field(default_factory=lambda: {"rmsp": 60, "ppo": 64, "heldout": 40})
    max_attempts: int = 4000              # give up after this many generations


@dataclass
class AgentSampling:
    """How one self-play agent samples its turns."""
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 256


@dataclass
class RMSPConfig:
    """Step 3: RM-guided self-play (almost_utils/rmsp.py)."""
    user_prompt: str = "data/prompts/user_agent.txt"   # the user agent's instructions and example dialogues
    num_dialogues: int = 48               # the first this many queries of the ``rmsp`` split
    candidates: int = 4                   # N: assistant replies sampled per turn; the RM keeps one
    assistant_turns: int = 2              # assistant turns per dialogue (fewer when it ends early)
    assistant: AgentSampling = field(default_factory=AgentSampling)
    user: AgentSampling = field(default_factory=lambda: AgentSampling(max_new_tokens=64))
    user_min_chars: int = 10              # a shorter follow-up ends the dialogue
    trim_to_last_sentence: bool = False   # cut an unfinished candidate back to its last . or !
    chunk_dialogues: int = 32             # dialogues per resumable unit (one turn of a chunk)
    seed: Optional[int] = None            # None: the run's seed


@dataclass
class SFTConfig:
    """Step 4: LoRA fine-tuning of the vanilla policy on the RMSP dialogues (almost_utils/sft.py).

    One section drives both variants, ALMoST-SFT (stage ``sft``) and SFT-noRM (``sft_norm``):
    same model, seed and settings, each on its own Step-3 file (``dialogues``).
    """
    model: str                            # a key of ``models``: the vanilla policy (4-bit spec = QLoRA on CUDA)
    dialogues: dict[str, str] = field(default_factory=lambda: {
        "sft": "dialogues.jsonl", "sft_norm": "dialogues_random.jsonl"})   # per stage: a file of results/<run>/rmsp/
    turns_field: str = "turns"            # the field of a dialogue row holding [[role, text], ...]
    max_dialogues: Optional[int] = None   # seeded subsample of each file (None = all)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 3
    batch_size: int = 8                   # dialogues per device step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_length: int = 512                 # tokens; longer dialogues lose leading exchanges (sft.py)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: Optional[int] = None     # LoRA on the top N decoder layers only (None = all)
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    gradient_checkpointing: bool = False
    masked_logits: bool = True            # output layer only where the loss counts (same loss, less work)
    head_chunk: int = 512                 # output-layer rows at once: bounds the logits' memory
    save_steps: int = 20                  # optimizer steps between checkpoints (a killed run resumes there)
    logging_steps: int = 1
    logprob_batch_size: int = 8           # sequences per forward pass when a loaded policy scores answers


@dataclass
class AnswersConfig:
    """Answers of the policies to held-out queries, scored by the Step-2 RM (almost_utils/answers.py).

    Every policy answers the same queries with the same sampling settings and seeds; the vanilla
    model reads the assistant agent's few-shot prefix (the prompted baseline), trained policies
    the bare inference format.
    """
    split: str = "heldout"                # a split of ``splits.sizes``
    num_queries: Optional[int] = None     # the first this many queries of the split (None = all)
    samples: int = 2                      # answers per query (the bootstrap resamples queries)
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: Optional[int] = None            # None: the run's seed


@dataclass
class EvaluationConfig:
    """Step 6: every policy on the same benchmarks (almost_utils/evaluation.py).

    ``policies`` are the contestants: ``vanilla`` (the base model behind a few-shot prefix of
    ``vanilla_demos``, the paper's prompted baseline), ``sft_norm``, ``sft``, ``ppo`` (trained in
    this run) and ``instruct`` (the model ``instruct_model`` of ``models``, read with its own chat
    template). Subset sizes (``None`` = everything) keep the CPU run inside its budget; a subset
    is a seeded draw, stratified by category where there are categories.
    """
    policies: list[str] = field(default_factory=lambda: ["vanilla", "sft_norm", "sft", "ppo", "instruct"])
    instruct_model: Optional[str] = None  # a key of models (e.g. SmolLM2-135M-Instruct); needed by 'instruct'
    vanilla_demos: str = "hhh"            # a key of comparisons.demonstrations
    vanilla_shots: int = 3
    bigbench_dir: Optional[str] = None    # None: the cached BIG-bench tasks; a folder laid out like it (tests)
    hhh_pairs: Optional[int] = None       # BIG-bench hhh_alignment pairs (221), stratified by category
    truthfulqa_questions: Optional[int] = None   # BIG-bench truthful_qa questions (299)
    questions_file: str = "data/eval/questions.jsonl"    # our open questions for pairwise A/B
    num_questions: Optional[int] = None
    probe_file: str = "data/eval/harm_probe.jsonl"       # requests to decline, and benign controls
    temperature: float = 0.7              # the paper's A/B answers were sampled at 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    probe_max_new_tokens: int = 64
    bootstrap_samples: int = 1000
    seed: Optional[int] = None            # None: the run's seed


@dataclass
class PPOConfig:
    """Step 5: PPO of ALMoST-SFT against the Step-2 RM (almost_utils/ppo.py).

    The policy is the SFT adapter merged into its base, with a new LoRA adapter trained here;
    the reference policy is the same model with that adapter disabled. Defaults are common
    choices of open PPO implementations for language models, not the paper's (it gives none).
    """
    start_from: str = "sft"               # the SFT stage PPO starts from
    split: str = "ppo"                    # rollout queries: a split of ``splits.sizes``
    steps: int = 20                       # PPO steps (one rollout batch each)
    rollout_batch: int = 16               # prompts per step, over all processes
    minibatch: int = 4                    # sequences per gradient step, per process
    ppo_epochs: int = 4                   # passes over a rollout batch
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0             # dropout off: log-probs of the same tokens must not change between passes
    lora_layers: Optional[int] = None     # the top N decoder layers only (None = all)
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    kl_coef: float = 0.05                 # per-token KL penalty (k1 estimator) in the reward
    kl_target: Optional[float] = None     # adaptive KL controller's target (None: fixed kl_coef)
    kl_horizon: int = 10000               # the controller's horizon, in sequences
    kl_limit: float = 20.0                # stop when the mean KL of a batch exceeds this (nats per sequence)
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    normalize_reward: bool = True         # divide RM scores by their running standard deviation
    temperature: float = 0.7              # rollouts; log-probs are computed at the same temperature
    max_new_tokens: int = 64
    no_eos_penalty: float = -1.0          # added to the score of a response that never ends its turn
    save_steps: int = 5                   # checkpoint (adapter, value head, optimizer) every this many steps
    logprob_batch: int = 8                # sequences per forward pass when scoring rollouts
    seed: Optional[int] = None            # None: the run's seed


@dataclass
class RunConfig:
    run_name: str
    seed: int
    models: dict[str, ModelSpec]
    queries: QueriesConfig
    comparisons: ComparisonsConfig
    output_dir: Optional[str] = None      # None = results/<run_name>: a new run name is a new folder
    device: str = "auto"                  # auto | cpu | cuda
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward_model: Optional[RewardModelConfig] = None
    splits: Optional[SplitsConfig] = None
    rmsp: Optional[RMSPConfig] = None
    sft: Optional[SFTConfig] = None
    answers: Optional[AnswersConfig] = None
    ppo: Optional[PPOConfig] = None
    evaluation: Optional[EvaluationConfig] = None

    # ---------------------------------------------------------------- helpers
    def path(self, p: str | Path) -> Path:
        """Resolve a config path relative to the repository root."""
        p = Path(p)
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def run_dir(self) -> Path:
        return self.path(self.output_dir or f"results/{self.run_name}")

    def stage_dir(self, stage: str) -> Path:
        d = self.run_dir / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VALID_DEVICES = ("auto", "cpu", "cuda")
VALID_BACKENDS = ("transformers", "vllm")
VALID_DTYPES = ("auto", "float32", "bfloat16", "float16")
VALID_PAIRING = ("authors", "chain")      # Step-1 pairing rules, see almost_utils/comparisons.py


# --------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str):
    """Check ``value`` against type hint ``tp`` and build dataclasses recursively."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):       # built earlier with a more precise path (the rubric)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required field")
    return cls(**kwargs)


def _rubric_ranks(raw, where: str) -> list[list[Configuration]]:
    """Each rank is one configuration mapping or a list of tied ones; paths name both forms."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list of configurations")
    ranks = []
    for i, r in enumerate(raw):
        if isinstance(r, list):
            ranks.append([_convert(c, Configuration, f"{where}[{i}][{j}]") for j, c in enumerate(r)])
        else:
            ranks.append([_convert(r, Configuration, f"{where}[{i}]")])
    return ranks


def _check_positive(value, where: str, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate(cfg: RunConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.run_name):
        raise ConfigError(f"run_name: use letters, digits, '.', '_' or '-' (it names a folder), got {cfg.run_name!r}")
    if cfg.device not in VALID_DEVICES:
        raise ConfigError(f"device: must be one of {VALID_DEVICES}, got {cfg.device!r}")
    if cfg.sampling.backend not in VALID_BACKENDS:
        raise ConfigError(f"sampling.backend: must be one of {VALID_BACKENDS}, got {cfg.sampling.backend!r}")
    _check_positive(cfg.sampling.batch_size, "sampling.batch_size")
    _check_positive(cfg.sampling.max_model_len, "sampling.max_model_len")
    _check_positive(cfg.sampling.tensor_parallel_size, "sampling.tensor_parallel_size")
    if not 0 < cfg.sampling.gpu_memory_utilization <= 1:
        raise ConfigError(f"sampling.gpu_memory_utilization: must be in (0, 1], "
                          f"got {cfg.sampling.gpu_memory_utilization}")
    if not cfg.models:
        raise ConfigError("models: at least one model is needed")
    for name, spec in cfg.models.items():
        if spec.dtype not in VALID_DTYPES:
            raise ConfigError(f"models.{name}.dtype: must be one of {VALID_DTYPES}, got {spec.dtype!r}")
        if spec.drop_layers is not None and (not spec.drop_layers or min(spec.drop_layers) < 0):
            raise ConfigError(f"models.{name}.drop_layers: give layer indices >= 0, got {spec.drop_layers}")
        if spec.source.startswith("tiny:") != (spec.tiny is not None):
            raise ConfigError(f"models.{name}.tiny: give a tiny shape exactly when source starts with 'tiny:'")
    q = cfg.queries
    if q.model not in cfg.models:
        raise ConfigError(f"queries.model: unknown model {q.model!r} (models: {', '.join(cfg.models)})")
    for key in ("num_queries", "shots", "max_new_tokens", "min_chars", "max_chars", "max_attempts"):
        _check_positive(getattr(q, key), f"queries.{key}")
    if q.min_chars > q.max_chars:
        raise ConfigError(f"queries.min_chars: {q.min_chars} is above queries.max_chars {q.max_chars}")
    if not 0 < q.rouge_threshold <= 1:
        raise ConfigError(f"queries.rouge_threshold: must be in (0, 1], got {q.rouge_threshold}")
    for section, sec in (("queries", q), ("comparisons", cfg.comparisons)):
        if sec.temperature < 0:
            raise ConfigError(f"{section}.temperature: must be >= 0, got {sec.temperature}")
        if not 0 < sec.top_p <= 1:
            raise ConfigError(f"{section}.top_p: must be in (0, 1], got {sec.top_p}")
    c = cfg.comparisons
    _check_positive(c.num_queries, "comparisons.num_queries")
    if c.pairing not in VALID_PAIRING:
        raise ConfigError(f"comparisons.pairing: must be one of {VALID_PAIRING}, got {c.pairing!r}")
    names = set()
    n_configs = sum(len(rank) for rank in c.rubric)
    if n_configs < 2:
        raise ConfigError("comparisons.rubric: needs at least two configurations to compare")
    for i, rank in enumerate(c.rubric):
        if not rank:
            raise ConfigError(f"comparisons.rubric[{i}]: empty rank")
        for j, conf in enumerate(rank):
            where = f"comparisons.rubric[{i}]" + (f"[{j}]" if len(rank) > 1 else "")
            if conf.model not in cfg.models:
                raise ConfigError(f"{where}.model: unknown model {conf.model!r} (models: {', '.join(cfg.models)})")
            if conf.demos not in c.demonstrations:
                raise ConfigError(f"{where}.demos: unknown demonstration set {conf.demos!r} "
                                  f"(known: {', '.join(c.demonstrations)})")
            if conf.demos not in c.max_new_tokens:
                raise ConfigError(f"comparisons.max_new_tokens: no entry for demonstration set {conf.demos!r}")
            _check_positive(conf.shots, f"{where}.shots", allow_zero=True)
            if conf.name in names:
                raise ConfigError(f"{where}.name: configuration {conf.name!r} appears twice")
            names.add(conf.name)
    rm = cfg.reward_model
    if rm is not None:
        if rm.model not in cfg.models:
            raise ConfigError(f"reward_model.model: unknown model {rm.model!r} (models: {', '.join(cfg.models)})")
        for key in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "bootstrap_samples",
                    "lora_layers", "logging_steps", "eval_steps", "max_train_pairs", "score_batch_size",
                    "learning_rate"):
            _check_positive(getattr(rm, key), f"reward_model.{key}")
        if not 0 < rm.eval_fraction < 1:
            raise ConfigError(f"reward_model.eval_fraction: must be in (0, 1), got {rm.eval_fraction}")
        _check_lora_training(cfg, rm, "reward_model")


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def _check_lora_training(cfg: RunConfig, t, section: str) -> None:
    """Fields every LoRA training section shares (reward_model, sft)."""
    _check_positive(t.weight_decay, f"{section}.weight_decay", allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"{section}.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.lora_dropout < 1:
        raise ConfigError(f"{section}.lora_dropout: must be in [0, 1), got {t.lora_dropout}")
    if t.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"{section}.lr_scheduler: must be one of {SCHEDULERS}, got {t.lr_scheduler!r}")
    if not t.lora_target_modules:
        raise ConfigError(f"{section}.lora_target_modules: name at least one module")
    if t.max_length < 16:
        raise ConfigError(f"{section}.max_length: {t.max_length} tokens cannot hold a dialogue; use >= 16")
    spec = cfg.models[t.model]
    if spec.tiny is not None and t.lora_layers is not None and t.lora_layers > spec.tiny.num_layers:
        raise ConfigError(f"{section}.lora_layers: {t.lora_layers} asked, but models.{t.model} has "
                          f"{spec.tiny.num_layers} layers")


def _validate_rmsp(cfg: RunConfig) -> None:
    """The ``splits`` and ``rmsp`` sections (Steps 3+): sizes, sampling settings, and what RMSP reads."""
    s = cfg.splits
    if s is not None:
        if not s.sizes:
            raise ConfigError("splits.sizes: name at least one split, e.g. {rmsp: 60}")
        for name, n in s.sizes.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ConfigError(f"splits.sizes.{name}: use letters, digits, '_' or '-' in split names")
            _check_positive(n, f"splits.sizes.{name}")
        _check_positive(s.max_attempts, "splits.max_attempts")
    r = cfg.rmsp
    if r is None:
        return
    if cfg.reward_model is None:
        raise ConfigError("rmsp: needs a reward_model section (the Step-2 RM picks the candidates)")
    if s is None or "rmsp" not in s.sizes:
        raise ConfigError("rmsp: needs splits.sizes.rmsp, the split of fresh queries the dialogues start from")
    for key in ("num_dialogues", "candidates", "assistant_turns", "chunk_dialogues"):
        _check_positive(getattr(r, key), f"rmsp.{key}")
    _check_positive(r.user_min_chars, "rmsp.user_min_chars", allow_zero=True)
    if r.num_dialogues > s.sizes["rmsp"]:
        raise ConfigError(f"rmsp.num_dialogues: {r.num_dialogues} dialogues asked, but the rmsp split holds "
                          f"{s.sizes['rmsp']} queries (splits.sizes.rmsp)")
    for agent in ("assistant", "user"):
        a = getattr(r, agent)
        _check_positive(a.max_new_tokens, f"rmsp.{agent}.max_new_tokens")
        _check_sampling(f"rmsp.{agent}", a.temperature, a.top_p)


def _validate_sft(cfg: RunConfig) -> None:
    """The ``sft`` section (Step 4): model, training numbers, and one Step-3 file per variant."""
    t = cfg.sft
    if t is None:
        return
    if t.model not in cfg.models:
        raise ConfigError(f"sft.model: unknown model {t.model!r} (models: {', '.join(cfg.models)})")
    if set(t.dialogues) != {"sft", "sft_norm"}:
        raise ConfigError(f"sft.dialogues: give exactly the files for sft and sft_norm, got {sorted(t.dialogues)}")
    for variant, name in t.dialogues.items():
        if not name or "/" in name:
            raise ConfigError(f"sft.dialogues.{variant}: a file name in the rmsp stage folder, got {name!r}")
    if not t.turns_field:
        raise ConfigError("sft.turns_field: name the field that holds the turns")
    for key in ("max_dialogues", "learning_rate", "epochs", "batch_size", "grad_accum", "max_length", "lora_r",
                "lora_alpha", "lora_layers", "head_chunk", "save_steps", "logging_steps", "logprob_batch_size"):
        _check_positive(getattr(t, key), f"sft.{key}")
    _check_lora_training(cfg, t, "sft")


def _split_size(cfg: RunConfig, where: str, split: str) -> int:
    """The number of queries of a named split; an unknown split names ``where``."""
    sizes = cfg.splits.sizes if cfg.splits is not None else {}
    if split not in sizes:
        raise ConfigError(f"{where}: unknown split {split!r} (splits.sizes: {', '.join(sizes) or 'none'})")
    return sizes[split]


def _check_sampling(where: str, temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ConfigError(f"{where}.temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{where}.top_p: must be in (0, 1], got {top_p}")


def _validate_answers(cfg: RunConfig) -> None:
    """The ``answers`` section: a known split, sampling settings, and the sections it reads."""
    a = cfg.answers
    if a is None:
        return
    if cfg.sft is None or cfg.reward_model is None:
        raise ConfigError("answers: needs the sft and reward_model sections (it compares the SFT policies by the RM)")
    size = _split_size(cfg, "answers.split", a.split)
    for key in ("num_queries", "samples", "max_new_tokens"):
        _check_positive(getattr(a, key), f"answers.{key}")
    if a.num_queries is not None and a.num_queries > size:
        raise ConfigError(f"answers.num_queries: {a.num_queries} asked, but the {a.split} split holds "
                          f"{size} queries (splits.sizes.{a.split})")
    _check_sampling("answers", a.temperature, a.top_p)


def _validate_ppo(cfg: RunConfig) -> None:
    """The ``ppo`` section: what it starts from, its split, and every number's range."""
    p = cfg.ppo
    if p is None:
        return
    if cfg.sft is None or cfg.reward_model is None:
        raise ConfigError("ppo: needs the sft and reward_model sections (PPO starts from SFT, the RM rewards)")
    if p.start_from not in ("sft", "sft_norm"):
        raise ConfigError(f"ppo.start_from: an SFT stage, 'sft' or 'sft_norm', got {p.start_from!r}")
    size = _split_size(cfg, "ppo.split", p.split)
    for key in ("steps", "rollout_batch", "minibatch", "ppo_epochs", "learning_rate", "max_grad_norm", "lora_r",
                "lora_alpha", "lora_layers", "kl_horizon", "kl_limit", "max_new_tokens", "save_steps",
                "logprob_batch", "kl_target"):
        _check_positive(getattr(p, key), f"ppo.{key}")
    for key in ("kl_coef", "vf_coef"):
        _check_positive(getattr(p, key), f"ppo.{key}", allow_zero=True)
    for key in ("clip_range", "value_clip"):
        if not 0 < getattr(p, key) < 1:
            raise ConfigError(f"ppo.{key}: must be in (0, 1), got {getattr(p, key)}")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(p, key) <= 1:
            raise ConfigError(f"ppo.{key}: must be in [0, 1], got {getattr(p, key)}")
    if p.minibatch > p.rollout_batch:
        raise ConfigError(f"ppo.minibatch: {p.minibatch} is larger than ppo.rollout_batch = {p.rollout_batch}")
    if p.rollout_batch > size:
        raise ConfigError(f"ppo.rollout_batch: {p.rollout_batch} prompts a step, but the {p.split} split holds "
                          f"{size} queries (splits.sizes.{p.split})")
    if p.temperature <= 0:
        raise ConfigError(f"ppo.temperature: must be > 0 (log-probs are computed at it), got {p.temperature}")


EVAL_POLICIES = ("vanilla", "sft_norm", "sft", "ppo", "instruct")


def _validate_evaluation(cfg: RunConfig) -> None:
    """The ``evaluation`` section: known policies, what each needs, and every number's range."""
    e = cfg.evaluation
    if e is None:
        return
    if not e.policies:
        raise ConfigError("evaluation.policies: empty; name at least one of " + ", ".join(EVAL_POLICIES))
    for name in e.policies:
        if name not in EVAL_POLICIES:
            raise ConfigError(f"evaluation.policies: unknown policy {name!r} (known: {', '.join(EVAL_POLICIES)})")
    if len(set(e.policies)) != len(e.policies):
        raise ConfigError(f"evaluation.policies: a policy is named twice in {e.policies}")
    trained = [n for n in e.policies if n in ("sft_norm", "sft", "vanilla")]
    if trained and cfg.sft is None:
        raise ConfigError(f"evaluation.policies: {trained[0]} needs the sft section (its model and training)")
    if "ppo" in e.policies and cfg.ppo is None:
        raise ConfigError("evaluation.policies: ppo needs the ppo section")
    if cfg.reward_model is None:
        raise ConfigError("evaluation: needs the reward_model section (the RM judges the pairwise answers)")
    if "instruct" in e.policies:
        if e.instruct_model is None:
            raise ConfigError("evaluation.instruct_model: the policy 'instruct' needs a model (a key of models)")
        if e.instruct_model not in cfg.models:
            raise ConfigError(f"evaluation.instruct_model: {e.instruct_model!r} is not a key of models "
                              f"({', '.join(cfg.models)})")
    if e.vanilla_demos not in cfg.comparisons.demonstrations:
        raise ConfigError(f"evaluation.vanilla_demos: {e.vanilla_demos!r} is not a key of comparisons.demonstrations")
    for key in ("vanilla_shots", "hhh_pairs", "truthfulqa_questions", "num_questions", "max_new_tokens",
                "probe_max_new_tokens", "bootstrap_samples"):
        _check_positive(getattr(e, key), f"evaluation.{key}")
    _check_sampling("evaluation", e.temperature, e.top_p)
    if e.bigbench_dir is not None and not cfg.path(e.bigbench_dir).is_dir():
        raise ConfigError(f"evaluation.bigbench_dir: folder not found: {cfg.path(e.bigbench_dir)}")


def _check_files(cfg: RunConfig) -> None:
    """Every input file must exist before a model is loaded."""
    files = {"queries.seeds_file": cfg.queries.seeds_file,
             "comparisons.preamble": cfg.comparisons.preamble}
    files.update({f"comparisons.demonstrations.{k}": v for k, v in cfg.comparisons.demonstrations.items()})
    if cfg.rmsp is not None:
        files["rmsp.user_prompt"] = cfg.rmsp.user_prompt
    if cfg.evaluation is not None:
        files["evaluation.questions_file"] = cfg.evaluation.questions_file
        files["evaluation.probe_file"] = cfg.evaluation.probe_file
    for where, p in files.items():
        if not cfg.path(p).is_file():
            raise ConfigError(f"{where}: file not found: {cfg.path(p)}")


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set dotted keys (``"queries.num_queries": 40``) in a raw recipe dict.

    ``overrides`` may also be a YAML/JSON mapping as text (papermill ``-p`` passes strings).
    """
    data = copy.deepcopy(data)
    if isinstance(overrides, str):
        overrides = yaml.safe_load(overrides) or {}
    if not isinstance(overrides or {}, dict):
        raise ConfigError(f"overrides: expected a mapping of dotted keys, got {overrides!r}")
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"override {key}: {part} is not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return data


def parse_config(data: dict, check_files: bool = True) -> RunConfig:
    """Validate a raw recipe dict and return a :class:`RunConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"the recipe must be a mapping at the top level, got {type(data).__name__}")
    data = copy.deepcopy(data)
    if isinstance(data.get("comparisons"), dict) and "rubric" in data["comparisons"]:
        data["comparisons"]["rubric"] = _rubric_ranks(data["comparisons"]["rubric"], "comparisons.rubric")
    cfg = _build(RunConfig, data, "")
    _validate(cfg)
    _validate_rmsp(cfg)
    _validate_sft(cfg)
    _validate_answers(cfg)
    _validate_ppo(cfg)
    _validate_evaluation(cfg)
    if check_files:
        _check_files(cfg)
    return cfg


def load_config(path: str | Path, overrides: dict | None = None, check_files: bool = True) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, validate and return it."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(apply_overrides(data, overrides), check_files=check_files)

