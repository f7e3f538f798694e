"""Rough GPU memory needed by each stage of a recipe, computed offline from model shapes.

Nothing is downloaded: the shapes of the hub checkpoints the recipes name are in
:data:`KNOWN_ARCHS` (copied from their ``config.json``); a local folder's ``config.json`` is
read; a tiny model's shape comes from the recipe. A hub id missing from the table gives an
"unknown size" row instead of an error. Add a row to :data:`KNOWN_ARCHS` for a new model.

Per stage, for one process on one GPU (models are loaded one at a time):

* ``queries`` / ``comparisons`` (sampling): weights in the model's dtype (bf16 on CUDA, NF4 when
  ``load_in_4bit``) + KV cache for one copy of the shared few-shot prefix plus
  ``batch_size x (query + new tokens)`` + the prefill activations of one layer + the logits; vLLM splits weights and cache over
  ``tensor_parallel_size`` GPUs and reserves ``gpu_memory_utilization`` of the card regardless.
* ``reward_model``: weights (NF4 for the 4-bit linear layers and fp32 for the rest, as peft's
  k-bit preparation leaves them; the model's dtype without 4-bit) + LoRA adapters and the scalar
  head with fp32 AdamW (16 bytes per trainable parameter) + activations of ``2 x batch_size``
  sequences of ``max_length`` tokens (one saved hidden state per layer and one layer's full
  activations with gradient checkpointing; every layer's without), fp32 with 4-bit backbones.
  Calibrated once on an H100 against a QLoRA run of ``almost_utils.reward.train_reward_model``
  (random Qwen2.5 weights, every sequence 1024 tokens; peak allocated 8.4 / 20.5 GiB for 1.5B /
  7B with 16 sequences, 13.0 GiB for 7B with 8). That run's log was not kept, so treat these
  figures as unverified until ``scripts/gpu_smoke.sh`` logs a new measurement under results/.

* ``rmsp`` (self-play): the assistant agent's sampling row at its longest prompt (Faithful prefix +
  the dialogue so far: every earlier assistant and user turn at its token cap), with
  ``candidates`` rows per dialogue, plus the RM's weights (both models stay loaded).
* ``sft`` / ``sft_norm``: as the RM, for ``batch_size`` dialogues of ``max_length`` tokens, plus
  the output layer's logits: ``head_chunk`` rows at a time with ``masked_logits`` (three fp32
  copies: logits, softmax, gradient), else every position of the batch.
* ``ppo``: two copies of the merged SFT policy in its compute dtype (the trained one with the PPO
  LoRA and value head, and the plain rollout copy), LoRA + AdamW, the activations of a
  ``minibatch`` of prompt + response sequences, response-position logits, and the RM's weights.
* ``sft_answers``: the prompted baseline's sampling row (the Faithful prefix; the trained
  policies read no prefix), plus the RM's weights.
* ``evaluation``: a merged policy behind the prompted baseline's prefix, with an HHH judge prompt
  as its query (the longest input of Step 6; its scoring passes read no more), plus the RM's
  weights (it scores the answers to the open questions).

Each total adds 0.75 GiB (CUDA context) and 10% (allocator fragmentation). Estimates, not
measurements: expect +-20%. Prompt lengths count 3.5 characters per token (conservative for
English text with 32k-262k vocabularies).

CLI::

    python -m almost_utils.memory data/configs/gpu.yaml [--set key=value ...] [--gpu-gib 24]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError, ModelSpec, RunConfig, load_config
from .dialogue import few_shot_prefix, load_dialogues

GIB = 1024 ** 3
CHARS_PER_TOKEN = 3.5
CUDA_CONTEXT_GIB = 0.75
FRAGMENTATION = 0.10
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8   # NF4 + double-quantised absmax, per weight
QUERY_INSTRUCTION_CHARS = 100                      # Step 0's instruction line (queries.INSTRUCTION)
STAGES = ("queries", "comparisons", "reward_model", "rmsp", "sft", "ppo", "sft_answers", "evaluation")
EVAL_PROMPT_TOKENS = 1024      # the longest BIG-bench HHH conversation with both replies, in a judge prompt
QUESTION_CHARS = 200           # our open questions are shorter (data/eval/questions.jsonl)
# Activations of QLoRA RM training come out near the formula at fp32 plus 10% (one unlogged H100
# run of trl's RewardTrainer, 16 x 1024 tokens, checkpointing, random Qwen2.5-1.5B / 7B weights).
RM_ACTIVATION_FACTOR = 1.1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _arch(hidden, inter, layers, heads, kv, vocab, ctx, tie, head_dim=None, bias=False) -> dict:
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": ctx, "tie_word_embeddings": tie,
            "head_dim": head_dim or hidden // heads, "attention_bias": bias}


# Shapes of hub checkpoints (from their config.json), so that sizes resolve offline.
KNOWN_ARCHS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": _arch(896, 4864, 24, 14, 2, 151936, 32768, True, bias=True),
    "Qwen/Qwen2.5-1.5B": _arch(1536, 8960, 28, 12, 2, 151936, 32768, True, bias=True),
    "Qwen/Qwen2.5-3B": _arch(2048, 11008, 36, 16, 2, 151936, 32768, True, bias=True),
    "Qwen/Qwen2.5-7B": _arch(3584, 18944, 28, 28, 4, 152064, 32768, False, bias=True),
    "Qwen/Qwen2.5-14B": _arch(5120, 13824, 48, 40, 8, 152064, 32768, False, bias=True),
    "Qwen/Qwen2.5-32B": _arch(5120, 27648, 64, 40, 8, 152064, 32768, False, bias=True),
    "huggyllama/llama-7b": _arch(4096, 11008, 32, 32, 32, 32000, 2048, False),
    "huggyllama/llama-13b": _arch(5120, 13824, 40, 40, 40, 32000, 2048, False),
    "huggyllama/llama-30b": _arch(6656, 17920, 60, 52, 52, 32000, 2048, False),
    "huggyllama/llama-65b": _arch(8192, 22016, 80, 64, 64, 32000, 2048, False),
    "meta-llama/Llama-2-7b-hf": _arch(4096, 11008, 32, 32, 32, 32000, 4096, False),
    "meta-llama/Llama-2-13b-hf": _arch(5120, 13824, 40, 40, 40, 32000, 4096, False),
    "meta-llama/Llama-2-70b-hf": _arch(8192, 28672, 80, 64, 8, 32000, 4096, False),
    "meta-llama/Llama-3.1-8B": _arch(4096, 14336, 32, 32, 8, 128256, 131072, False),
    "google/gemma-3-270m": _arch(640, 2048, 18, 4, 1, 262144, 32768, True, head_dim=256),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _arch(576, 1536, 30, 9, 3, 49152, 8192, True),
}
KNOWN_ARCHS["meta-llama/Meta-Llama-3.1-8B"] = KNOWN_ARCHS["meta-llama/Llama-3.1-8B"]
KNOWN_ARCHS["Qwen/Qwen2.5-7B-Instruct"] = KNOWN_ARCHS["Qwen/Qwen2.5-7B"]    # the same config.json shape


# --------------------------------------------------------------------------- shapes
@dataclass
class Arch:
    """The shape numbers that memory depends on."""
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    tied: bool
    bias: bool = False

    @classmethod
    def from_config(cls, c: dict) -> "Arch":
        c = c.get("text_config", c) if "hidden_size" not in c else c
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], inter=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   max_context=c.get("max_position_embeddings") or 2048,
                   tied=bool(c.get("tie_word_embeddings", False)),
                   bias=bool(c.get("attention_bias", False) or c.get("model_type") == "qwen2"))

    # parameter counts
    @property
    def layer_linear(self) -> int:
        """Weights of one decoder layer's linear maps (what NF4 quantises and LoRA adapts)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv + 3 * self.hidden * self.inter

    @property
    def layer_other(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.bias else 0
        return bias + 2 * self.hidden

    @property
    def embed(self) -> int:
        return self.vocab * self.hidden

    def params(self, lm_head: bool = True) -> int:
        """All parameters; without the output head (a sequence classifier replaces it)."""
        head = self.embed if (lm_head and not self.tied) else 0
        return self.layers * (self.layer_linear + self.layer_other) + self.embed + self.hidden + head

    def lora_params(self, r: int, targets=LORA_TARGETS, layers: Optional[int] = None) -> int:
        """LoRA of rank r on the ``targets`` linear maps of the top ``layers`` layers (None = all)."""
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        dims = {"q_proj": (self.hidden, qd), "k_proj": (self.hidden, kvd), "v_proj": (self.hidden, kvd),
                "o_proj": (qd, self.hidden), "gate_proj": (self.hidden, self.inter),
                "up_proj": (self.hidden, self.inter), "down_proj": (self.inter, self.hidden)}
        if targets == "all-linear" or "all-linear" in targets:
            targets = list(dims)
        n = self.layers if layers is None else min(layers, self.layers)
        return n * r * sum(sum(dims[t]) for t in targets if t in dims)

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _strip_prefixes(source: str) -> str:
    from .models import PACKAGED   # lazy: models imports heavy things only inside functions
    while source.startswith("tiny:"):
        source = source[len("tiny:"):]
    if source.startswith("packaged:"):
        name = source[len("packaged:"):]
        if name in PACKAGED:
            return PACKAGED[name].hub_id
    return source


def _tokenizer_vocab(folder: Path) -> Optional[int]:
    """Vocabulary size from a folder's tokenizer.json (a tokenizer without a model config)."""
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    t = json.loads(f.read_text())
    ids = list(t.get("model", {}).get("vocab", {}).values()) if isinstance(t.get("model", {}).get("vocab"), dict) else []
    ids += [a["id"] for a in t.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def model_arch(spec: ModelSpec) -> tuple[Optional[Arch], str]:
    """``(arch, note)`` for a model spec without downloading; ``arch`` is None when unknown."""
    from .models import check_source
    kind = check_source(spec.source)
    base_src = _strip_prefixes(spec.source)
    base: Optional[Arch] = None
    if Path(base_src).expanduser().is_dir():
        cfg_file = Path(base_src).expanduser() / "config.json"
        if cfg_file.is_file():
            base = Arch.from_config(json.loads(cfg_file.read_text()))
    elif base_src in KNOWN_ARCHS:
        base = Arch.from_config(KNOWN_ARCHS[base_src])
    if kind == "tiny":
        t = spec.tiny
        vocab = base.vocab if base else _tokenizer_vocab(Path(base_src).expanduser()) or 262144
        arch = Arch(hidden=t.hidden_size, inter=t.intermediate_size, layers=t.num_layers,
                    heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                    vocab=vocab, max_context=8192, tied=True)
    elif base is None:
        return None, (f"unknown size: {spec.source!r} is not in almost_utils.memory.KNOWN_ARCHS "
                      "(add its config.json numbers there, or use a local folder)")
    else:
        arch = base
    keep = arch.layers
    if getattr(spec, "num_layers", None) is not None:
        keep = min(spec.num_layers, keep)
    if getattr(spec, "drop_layers", None):
        keep -= len({i for i in spec.drop_layers if 0 <= i < arch.layers})
    if keep != arch.layers:
        arch = Arch(**{**arch.__dict__, "layers": max(keep, 1)})
    return arch, ""


# --------------------------------------------------------------------------- prompts
def _tokens(chars: int) -> int:
    return int(math.ceil(chars / CHARS_PER_TOKEN))


def query_prompt_tokens(cfg: RunConfig) -> tuple[int, int]:
    """Longest Step-0 prompt as (shared prefix, per-request part): the instruction, then
    ``shots`` queries of ``max_chars`` and an open ``Query:`` line."""
    q = cfg.queries
    return _tokens(QUERY_INSTRUCTION_CHARS) + 1, _tokens(q.shots * (q.max_chars + len("\nQuery: ")) + 7)


def comparison_prompt_tokens(cfg: RunConfig, demos: str, shots: int) -> tuple[int, int]:
    """Longest Step-1 prompt of a configuration as (few-shot prefix, longest query turn)."""
    c = cfg.comparisons
    prefix = few_shot_prefix(cfg.path(c.preamble).read_text(),
                             load_dialogues(cfg.path(c.demonstrations[demos])), shots)
    turn = len("\n\nHuman: ") + cfg.queries.max_chars + len("\n\nAssistant:")
    return _tokens(len(prefix)) + 1, _tokens(turn)


# --------------------------------------------------------------------------- estimates
@dataclass
class Row:
    stage: str
    model: str
    source: str
    params: Optional[int] = None        # parameters loaded
    precision: str = ""
    parts: dict = field(default_factory=dict)    # GiB by component
    total_gib: Optional[float] = None
    context: str = ""                   # tokens needed / model context
    fits_context: bool = True
    note: str = ""


def _dtype_bytes(spec: ModelSpec, device: str) -> tuple[float, str]:
    if spec.dtype == "auto":
        return (4, "fp32") if device == "cpu" else (2, "bf16")
    return {"float32": (4, "fp32"), "bfloat16": (2, "bf16"), "float16": (2, "fp16")}[spec.dtype]


def _finish(row: Row) -> Row:
    sub = sum(row.parts.values())
    row.total_gib = (sub + CUDA_CONTEXT_GIB) * (1 + FRAGMENTATION)
    return row


def _sampling_row(cfg: RunConfig, stage: str, key: str, prompt: tuple[int, int], new_tokens: int,
                  what: str) -> Row:
    spec = cfg.models[key]
    row = Row(stage, key, spec.source)
    arch, note = model_arch(spec)
    if arch is None:
        row.note = note
        return row
    s = cfg.sampling
    vllm = s.backend == "vllm"
    tp = s.tensor_parallel_size if vllm else 1
    nbytes, prec = _dtype_bytes(spec, cfg.device)
    params = arch.params()
    if spec.load_in_4bit and cfg.device != "cpu":
        frozen = arch.layers * arch.layer_linear
        weights = frozen * NF4_BYTES + (params - frozen) * 2
        prec, kv_bytes = "nf4", 2
    else:
        weights, kv_bytes = params * nbytes, nbytes
    prefix_tokens, tail_tokens = prompt
    seq = prefix_tokens + tail_tokens + new_tokens
    limit = arch.max_context
    if vllm and s.max_model_len:
        limit = min(limit, s.max_model_len)
    batch = s.batch_size
    act_bytes = kv_bytes
    # prefill: the shared prefix is computed once (its KV cache is reused), then each row's tail;
    # vLLM prefills in chunks of at most ~8k tokens
    prefill = prefix_tokens + batch * tail_tokens
    if vllm:
        prefill = min(prefill, 8192)
    row.params, row.precision = params, prec + (f"/tp{tp}" if tp > 1 else "")
    row.parts = {
        "weights": weights / tp / GIB,
        # one copy of the shared prefix (the transformers engine keeps it without a batch
        # dimension; vLLM's prefix caching shares its blocks) + each row's own tokens
        "kv_cache": (prefix_tokens + batch * max(0, min(seq, limit) - prefix_tokens))
                    * arch.kv_bytes_per_token(kv_bytes) / tp / GIB,
        # prefill of one layer (hidden states, q/k/v/o, MLP) + fp32 logits and top-p sorting
        "activations": (prefill * (6 * arch.hidden + 3 * arch.inter) * act_bytes
                        + 3 * batch * arch.vocab * 4) / GIB,
    }
    row.context = f"{seq}/{limit}"
    row.fits_context = seq <= limit
    notes = [what, f"batch {batch}" + (" (vllm: reserves "
                                      f"{s.gpu_memory_utilization:.0%} of each GPU)" if vllm else "")]
    if not row.fits_context:
        notes.append(f"CONTEXT: prompt+response needs {seq} tokens, model allows {limit}")
    row.note = "; ".join(notes)
    return _finish(row)


def _lora_training_row(cfg: RunConfig, stage: str, t, sequences: int, head: str | None = None) -> Row:
    """LoRA (QLoRA with a 4-bit spec on CUDA) training of ``t.model`` on ``sequences`` sequences of
    ``t.max_length`` tokens per device step. ``head``: ``None`` for a scalar head (the RM);
    ``"masked"`` or ``"full"`` for an LM head whose logits are computed at answer rows in chunks of
    ``t.head_chunk`` or at every position."""
    spec = cfg.models[t.model]
    row = Row(stage, t.model, spec.source)
    arch, note = model_arch(spec)
    if arch is None:
        row.note = note
        return row
    params = arch.params(lm_head=head is not None) + (arch.hidden if head is None else 0)
    frozen_linear = arch.layers * arch.layer_linear
    nbytes, prec = _dtype_bytes(spec, cfg.device)
    quant = spec.load_in_4bit and cfg.device != "cpu"
    if quant:
        # peft's prepare_model_for_kbit_training casts every non-quantized weight (embeddings,
        # norms, head) to fp32, and the fp32 norms make the residual stream fp32 too
        weights = frozen_linear * NF4_BYTES + (params - frozen_linear) * 4
        prec, act_bytes = "nf4+lora", 4
    else:
        weights, act_bytes = params * nbytes, nbytes
        prec += "+lora"
    trainable = arch.lora_params(t.lora_r, getattr(t, "lora_target_modules", LORA_TARGETS),
                                 getattr(t, "lora_layers", None)) + (arch.hidden if head is None else 0)
    tokens = sequences * t.max_length
    per_layer = tokens * (12 * arch.hidden + 4 * arch.inter) * act_bytes
    if t.gradient_checkpointing:
        acts = arch.layers * tokens * arch.hidden * act_bytes + per_layer
    else:
        acts = arch.layers * per_layer
    acts *= RM_ACTIVATION_FACTOR
    row.params, row.precision = params, prec
    row.parts = {"weights": weights / GIB, "lora+adamw": trainable * 16 / GIB, "activations": acts / GIB}
    if head is not None:
        rows = min(t.head_chunk, tokens) if head == "masked" else tokens
        row.parts["logits"] = 3 * rows * arch.vocab * 4 / GIB
    row.context = f"{t.max_length}/{arch.max_context}"
    row.fits_context = t.max_length <= arch.max_context
    row.note = (f"{sequences} seqs x {t.max_length} tokens, LoRA r={t.lora_r} "
                f"({_fmt_params(trainable)} trainable), checkpointing "
                f"{'on' if t.gradient_checkpointing else 'off'}"
                + (f", logits {head}" if head else "") + "; per process")
    if not row.fits_context:
        row.note += f"; CONTEXT: max_length {t.max_length} > model's {arch.max_context}"
    return _finish(row)


def _reward_row(cfg: RunConfig) -> Optional[Row]:
    rm = cfg.reward_model
    if rm is None:
        return None
    return _lora_training_row(cfg, "reward_model", rm, 2 * rm.batch_size)   # chosen and rejected of each pair


def _with_rm(cfg: RunConfig, row: Row) -> Row:
    """A sampling row plus the RM's weights (scoring shares the GPU with the sampler)."""
    arch, _ = model_arch(cfg.models[cfg.reward_model.model])
    if arch is None or row.total_gib is None:
        return row
    spec = cfg.models[cfg.reward_model.model]
    nbytes = NF4_BYTES if (spec.load_in_4bit and cfg.device != "cpu") else _dtype_bytes(spec, cfg.device)[0]
    row.parts["rm_weights"] = arch.params(lm_head=False) * nbytes / GIB
    row.note += "; + the RM for scoring"
    return _finish(row)


def _ppo_row(cfg: RunConfig) -> Row:
    """PPO: the policy trained with LoRA (its logits at response positions, ``minibatch`` sequences,
    log-softmax and entropy kept for backward), its plain rollout copy, and the RM's weights."""
    p, key = cfg.ppo, cfg.sft.model
    spec = cfg.models[key]
    arch, note = model_arch(spec)
    row = Row("ppo", key, spec.source)
    if arch is None:
        row.note = note
        return row
    nbytes, prec = _dtype_bytes(spec, cfg.device)       # merged SFT weights: the compute dtype, never 4-bit
    params = arch.params()
    seq = _tokens(cfg.queries.max_chars) + 16 + p.max_new_tokens
    tokens = p.minibatch * seq
    acts = arch.layers * tokens * (12 * arch.hidden + 4 * arch.inter) * nbytes * RM_ACTIVATION_FACTOR
    trainable = arch.lora_params(p.lora_r, p.lora_target_modules, p.lora_layers) + arch.hidden
    rm = cfg.models[cfg.reward_model.model]
    rm_arch, _ = model_arch(rm)
    rm_bytes = NF4_BYTES if (rm.load_in_4bit and cfg.device != "cpu") else _dtype_bytes(rm, cfg.device)[0]
    row.params, row.precision = params, prec + "+lora"
    row.parts = {"weights": 2 * params * nbytes / GIB,          # the trained copy and the rollout copy
                 "lora+adamw": trainable * 16 / GIB, "activations": acts / GIB,
                 "logits": 3 * p.minibatch * p.max_new_tokens * arch.vocab * 4 / GIB,
                 "rm_weights": (rm_arch.params(lm_head=False) * rm_bytes / GIB) if rm_arch else 0.0}
    row.context = f"{seq}/{arch.max_context}"
    row.fits_context = seq <= arch.max_context
    row.note = (f"policy + rollout copy + RM; {p.minibatch} seqs x {seq} tokens a gradient step, LoRA r={p.lora_r} "
                f"({_fmt_params(trainable)} trainable); per process")
    return _finish(row)


def _steps_rows(cfg: RunConfig) -> list[Row]:
    """Steps 3-6: self-play, SFT, PPO, the held-out answers, the evaluation."""
    rows = []
    best = cfg.comparisons.rubric[0][0]
    if cfg.rmsp is not None and cfg.reward_model is not None:
        r = cfg.rmsp
        prefix, turn = comparison_prompt_tokens(cfg, best.demos, best.shots)
        history = (r.assistant_turns - 1) * (r.assistant.max_new_tokens + r.user.max_new_tokens + 8)
        row = _sampling_row(cfg, "rmsp", best.model, (prefix, turn + history), r.assistant.max_new_tokens,
                            f"assistant turn {r.assistant_turns}, {r.candidates} candidates a dialogue")
        rows.append(_with_rm(cfg, row))
    if cfg.sft is not None:
        t = cfg.sft
        rows.append(_lora_training_row(cfg, "sft", t, t.batch_size, "masked" if t.masked_logits else "full"))
    if cfg.ppo is not None and cfg.sft is not None and cfg.reward_model is not None:
        rows.append(_ppo_row(cfg))
    if cfg.answers is not None and cfg.sft is not None and cfg.reward_model is not None:
        prefix, turn = comparison_prompt_tokens(cfg, best.demos, best.shots)
        # trained adapters are merged into the base in its compute dtype (sft.load_policy), never 4-bit
        key = cfg.sft.model
        merged = dataclasses.replace(cfg, models={**cfg.models, key: dataclasses.replace(cfg.models[key],
                                                                                         load_in_4bit=False)})
        row = _sampling_row(merged, "sft_answers", key, (prefix, turn), cfg.answers.max_new_tokens,
                            "a merged policy behind the Faithful prefix (the prompted baseline's prompt)")
        rows.append(_with_rm(cfg, row))
    if cfg.evaluation is not None and cfg.sft is not None and cfg.reward_model is not None:
        e, key = cfg.evaluation, cfg.sft.model
        prefix, _ = comparison_prompt_tokens(cfg, e.vanilla_demos, e.vanilla_shots)
        merged = dataclasses.replace(cfg, models={**cfg.models, key: dataclasses.replace(cfg.models[key],
                                                                                         load_in_4bit=False)})
        # the longest row: an HHH judge prompt (scored, one next token) or a question and its answer
        longest = max(EVAL_PROMPT_TOKENS, _tokens(QUESTION_CHARS) + e.max_new_tokens)
        row = _sampling_row(merged, "evaluation", key, (prefix, longest), 1,
                            f"a merged policy behind {e.vanilla_shots} {e.vanilla_demos} demonstrations, its longest "
                            f"row {longest} tokens (an HHH judge prompt, or a question with its answer)")
        rows.append(_with_rm(cfg, row))
    return rows


def estimate_rows(cfg: RunConfig) -> list[Row]:
    """One row per (stage, model): Step 0's model, each Step-1 model at its longest prompt, the RM."""
    q = cfg.queries
    rows = [_sampling_row(cfg, "queries", q.model, query_prompt_tokens(cfg), q.max_new_tokens,
                          f"{q.shots}-shot query prompt")]
    longest: dict[str, tuple[tuple[int, int], int, str]] = {}
    for rank in cfg.comparisons.rubric:
        for conf in rank:
            prompt = comparison_prompt_tokens(cfg, conf.demos, conf.shots)
            need = (prompt, cfg.comparisons.max_new_tokens[conf.demos], conf.name)
            old = longest.get(conf.model)
            if old is None or sum(prompt) + need[1] > sum(old[0]) + old[1]:
                longest[conf.model] = need
    for key, (prompt, new, name) in longest.items():
        rows.append(_sampling_row(cfg, "comparisons", key, prompt, new, f"longest: {name}"))
    rm = _reward_row(cfg)
    if rm is not None:
        rows.append(rm)
    return rows + _steps_rows(cfg)


def estimate_memory(cfg: RunConfig) -> dict[str, float | str]:
    """Peak GiB per stage (the largest model of the stage), or an "unknown size ..." string."""
    return estimate_memory_from_rows(estimate_rows(cfg))


def _fmt_params(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def format_memory_table(cfg_or_rows, gpu_gib: Optional[float] = None) -> str:
    """A plain-text table of :func:`estimate_rows` (pass the config or the rows)."""
    rows = cfg_or_rows if isinstance(cfg_or_rows, list) else estimate_rows(cfg_or_rows)
    head = ["stage", "model", "source", "params", "precision", "weights", "cache/act", "optim",
            "total GiB", "context"]
    table = [head]
    for r in rows:
        p = r.parts
        cache = p.get("kv_cache", 0) + p.get("activations", 0)
        total = "?" if r.total_gib is None else f"{r.total_gib:.1f}"
        if gpu_gib is not None and r.total_gib is not None and r.total_gib > gpu_gib:
            total += " !"
        table.append([r.stage, r.model, r.source, _fmt_params(r.params), r.precision or "?",
                      f"{p['weights']:.1f}" if p else "?", f"{cache:.1f}" if p else "?",
                      f"{p['lora+adamw']:.1f}" if "lora+adamw" in p else "-", total, r.context or "?"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.stage}/{r.model}: {r.note}" for r in rows if r.note]
    peak = estimate_memory_from_rows(rows)
    summary = ", ".join(f"{k} {v:.1f} GiB" if isinstance(v, float) else f"{k} ?" for k, v in peak.items())
    out = "\n".join(lines) + "\nnotes:\n" + "\n".join(notes) + f"\npeak per stage: {summary}"
    if gpu_gib is not None:
        over = [r for r in rows if r.total_gib is not None and r.total_gib > gpu_gib]
        out += (f"\nover {gpu_gib:g} GiB (!): " + ", ".join(f"{r.stage}/{r.model}" for r in over)
                if over else f"\nevery stage fits {gpu_gib:g} GiB")
    bad_ctx = [r for r in rows if not r.fits_context]
    if bad_ctx:
        out += "\nCONTEXT TOO SHORT: " + ", ".join(f"{r.stage}/{r.model} ({r.context})" for r in bad_ctx)
    return out + ("\nestimates (+-20%), one process per GPU; tokens counted as "
                  f"{CHARS_PER_TOKEN} characters")


def estimate_memory_from_rows(rows: list[Row]) -> dict[str, float | str]:
    """Peak GiB per stage from rows; an unknown model makes its stage an "unknown size" string."""
    out: dict[str, float | str] = {}
    for row in rows:
        if row.total_gib is None:
            out[row.stage] = row.note
        elif not isinstance(out.get(row.stage), str):
            out[row.stage] = max(out.get(row.stage, 0.0), row.total_gib)
    return out


def print_memory_estimate(cfg: RunConfig, gpu_gib: Optional[float] = None) -> dict[str, float | str]:
    """Print the table (for notebooks) and return :func:`estimate_memory`."""
    rows = estimate_rows(cfg)
    print(f"GPU memory estimate for {cfg.run_name} (device {cfg.device}, sampling {cfg.sampling.backend}):")
    print(format_memory_table(rows, gpu_gib))
    return estimate_memory_from_rows(rows)


def _parse_set(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m almost_utils.memory",
                                 description="Estimate the GPU memory of each stage of a recipe (offline).")
    ap.add_argument("config", help="a recipe, e.g. data/configs/gpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (dotted key), e.g. reward_model.batch_size=4")
    ap.add_argument("--gpu-gib", type=float, default=None, help="flag stages over this much memory")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, _parse_set(args.set))
        print_memory_estimate(cfg, args.gpu_gib)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
