"""Step 4: supervised fine-tuning (SFT) of the vanilla policy on self-play dialogues, and the
:class:`Policy` that the later steps sample from and score with.

**Data.** Step 3 (RMSP) writes one dialogue per JSONL row; the SFT stages read the turns field
(``sft.turns_field``) and nothing else::

    {"id": 7, "turns": [["Human", "How do I keep basil alive?"], ["Assistant", "Water it ..."],
                        ["Human", "And indoors?"], ["Assistant", "Give it a sunny window ..."]]}

``results/<run>/rmsp/dialogues.jsonl`` (the RM's pick at every assistant turn) trains ALMoST-SFT,
stage ``sft``; ``dialogues_random.jsonl`` (a random candidate, N = 1: no RM) trains SFT-noRM,
stage ``sft_norm``. Both run the same code with the same seed and settings.

**Text.** A dialogue is trained in the inference format, with the tokenizer's BOS (gemma needs it)
and an EOS closing every assistant turn, so that the policy learns to end its turn::

    <bos>\\n\\nHuman: {q1}\\n\\nAssistant: {a1}<eos>\\n\\nHuman: {q2}\\n\\nAssistant: {a2}<eos>
                                         ~~~~~~~~~~~                           ~~~~~~~~~~~
The loss counts the marked tokens only (every assistant turn, EOS included). Each prompt piece
and each answer is tokenized on its own and the ids are joined, so the mask falls exactly on the
answer, and a one-turn prompt has exactly the ids the sampling engine gives
``\\n\\nHuman: {query}\\n\\nAssistant:`` at inference.

**Too long.** A dialogue over ``sft.max_length`` tokens loses whole exchanges (a Human turn and
its answer) from the start, keeping the BOS, until it fits: the later turns keep the context
they are trained in. If the last exchange alone is too long, its answer is cut on the right
(no EOS: nothing teaches stopping mid-sentence); if its prompt alone fills the window, the
dialogue is dropped. Each case is counted in the stage's manifest.

**Cheap logits.** gemma's output layer (262k x 640) is most of a training step, yet the loss
reads it only at answer tokens. :func:`add_masked_head` runs the decoder, gathers the positions
whose next-token label counts, and applies the output layer there only, in row chunks whose
gradient is computed on the spot (:func:`_head_nll`), so no ``[tokens, vocab]`` tensor outlives
a chunk. The loss is the same number as the full-logits loss (tests/test_sft.py).

**Outputs** (``results/<run>/sft/``, ``sft_norm/`` alike)::

    adapter/               # LoRA adapter + policy.json (base model spec, seed, recipe, fingerprint,
                           # training summary); renamed into place only when complete
    loss_curve.jsonl       # {"step", "epoch", "loss", "learning_rate", "grad_norm"} per logged step
    data.json              # what became of the dialogues (kept, truncated, cut, dropped, tokens)
    manifest.json          # times, tokens/s, counts; its presence marks the stage finished
    checkpoints/           # adapter + optimizer every ``sft.save_steps`` steps, while training

Usage::

    run_sft_stage(cfg, "sft"); run_sft_stage(cfg, "sft_norm")
    policy = load_policy("results/cpu", "sft")             # ALMoST-SFT, LoRA merged for sampling
    vanilla = load_policy("results/cpu", "sft", vanilla=True)   # its base model, no adapter
    policy.generate(["How do I keep basil alive?"], SamplingParams(max_new_tokens=128, temperature=0.7))
    policy.logprobs(["How do I keep basil alive?"], ["Water it when the soil is dry."])
    # -> [{"sum": -23.1, "tokens": [-2.3, ...], "ids": [...]}]
"""
from __future__ import annotations

import dataclasses
import functools
import random
import shutil
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Union

from .artifacts import Manifest, read_json, write_json, write_jsonl
from .config import ConfigError, ModelSpec, RunConfig
from .dialogue import ROLES, STOP_STRINGS, Turn
from .progress import headless as progress_headless
from .progress import quiet_trainer, say, trainer_callback

SFT_STAGES = {"sft": "ALMoST-SFT (the RM's pick at every turn)",
              "sft_norm": "SFT-noRM (a random candidate at every turn, N = 1)"}
UPSTREAM_STAGE = "rmsp"
META_FILE = "policy.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
IGNORE = -100                       # label of a token the loss does not count
LOSS_MODES = ("masked", "trl", "full")

Query = Union[str, Sequence[Turn]]  # a question, or a dialogue so far ending in a Human turn


# --------------------------------------------------------------------------- reading dialogues
def _check_turns(turns, where: str) -> list[Turn]:
    """``[[role, text], ...]`` alternating from Human, with at least one answer; a trailing
    Human turn (a follow-up nobody answered) is dropped, as nothing in it is trained."""
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: expected a non-empty list of [role, text] turns, got {turns!r:.80}")
    out = []
    for j, turn in enumerate(turns):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and isinstance(turn[1], str)):
            raise ConfigError(f"{where}: turn {j + 1} is not a [role, text] pair: {turn!r:.80}")
        if turn[0] != ROLES[j % 2]:
            raise ConfigError(f"{where}: turn {j + 1} should be {ROLES[j % 2]}, is {turn[0]!r}")
        out.append((turn[0], turn[1]))
    if out[-1][0] == "Human":
        out = out[:-1]
    if not out:
        raise ConfigError(f"{where}: the dialogue has no Assistant turn")
    return out


def read_dialogues(path: str | Path, turns_field: str = "turns", where: str = "sft.dialogues") -> list[dict]:
    """Dialogue rows ``{"id", "turns": [(role, text), ...]}`` from a JSONL file, validated.

    Reads files only (no model): a missing or empty file, a row without ``turns_field`` or
    malformed turns stop here, naming the file, the line and the field.
    """
    from .artifacts import read_input_jsonl
    path = Path(path)
    rows = []
    for i, row in read_input_jsonl(path, where, " (has Step 3, RMSP, run?)"):
        if not isinstance(row, dict) or turns_field not in row:
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{path}, line {i}: no field {turns_field!r} (sft.turns_field); the row has: {fields}")
        rows.append({"id": row.get("id", i - 1), "turns": _check_turns(row[turns_field], f"{path}, line {i}")})
    if not rows:
        raise ConfigError(f"{where}: {path} holds no dialogues")
    return rows


def subsample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most ``limit`` rows, a seeded choice kept in file order (both variants pick the same rows)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------- text -> ids and loss mask
def prompt_piece(query: str) -> str:
    """The text before an answer: ``\\n\\nHuman: {query}\\n\\nAssistant:`` (dialogue.open_turn's format)."""
    return f"\n\nHuman: {query.strip()}\n\nAssistant:"


def answer_ids(tok, answer: str, eos: bool = True) -> list[int]:
    """`` {answer}`` as ids (no specials), plus EOS; an empty answer is the EOS alone."""
    text = answer.strip()
    ids = tok(" " + text, add_special_tokens=False).input_ids if text else []
    return ids + ([tok.eos_token_id] if eos else [])


def exchanges(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` of a validated dialogue."""
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]


def encode_exchanges(tok, pairs: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_mask)``: BOS (when the tokenizer has one), then per exchange the
    prompt piece (mask 0) and the answer with its EOS (mask 1)."""
    ids, mask = [], []
    for j, (q, a) in enumerate(pairs):
        p = tok(prompt_piece(q), add_special_tokens=(j == 0)).input_ids
        r = answer_ids(tok, a)
        ids += p + r
        mask += [0] * len(p) + [1] * len(r)
    return ids, mask


def fit_dialogue(tok, turns: Sequence[Turn], max_length: int) -> tuple[list[int] | None, list[int] | None, str]:
    """``(input_ids, assistant_mask, what)`` for one dialogue within ``max_length`` tokens.

    ``what`` is ``"kept"``, ``"truncated"`` (leading exchanges dropped), ``"cut"`` (the last
    answer cut on the right) or ``"dropped"`` (ids and mask None); see the module docstring.
    """
    pairs = exchanges(turns)
    for start in range(len(pairs)):
        ids, mask = encode_exchanges(tok, pairs[start:])
        if len(ids) <= max_length:
            return ids, mask, "kept" if start == 0 else "truncated"
    if mask.index(1) >= max_length:          # the prompt alone fills the window: nothing to learn
        return None, None, "dropped"
    return ids[:max_length], mask[:max_length], "cut"


def sft_dataset(rows: Sequence[dict], tok, max_length: int):
    """``(datasets.Dataset, counts)``: ``input_ids`` and ``assistant_masks`` per kept dialogue
    (trl's SFTTrainer turns the mask into labels, -100 where it is 0), and what became of each.

    ``counts``: ``{"dialogues", "kept", "truncated", "cut", "dropped", "tokens", "assistant_tokens"}``.
    """
    from datasets import Dataset
    data = {"input_ids": [], "assistant_masks": []}
    counts = {"dialogues": len(rows), "kept": 0, "truncated": 0, "cut": 0, "dropped": 0}
    for row in rows:
        ids, mask, what = fit_dialogue(tok, row["turns"], max_length)
        counts[what] += 1
        if ids is not None:
            data["input_ids"].append(ids)
            data["assistant_masks"].append(mask)
    counts["tokens"] = sum(map(len, data["input_ids"]))
    counts["assistant_tokens"] = sum(map(sum, data["assistant_masks"]))
    return Dataset.from_dict(data), counts


# --------------------------------------------------------------------------- the output layer where the loss counts
SCALED_LOGITS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def _softcap(lm) -> float | None:
    """gemma-2/3 squash logits by ``cap * tanh(z / cap)``; models that scale them otherwise are refused,
    so that the cheap head never silently computes another loss than the model's own."""
    text = lm.config.get_text_config()
    scaled = [a for a in SCALED_LOGITS if getattr(text, a, None) not in (None, 1, 1.0)]
    if scaled:
        raise ConfigError(f"sft.masked_logits: {type(lm).__name__} scales its logits ({scaled[0]}), which the "
                          "masked head does not reproduce; set sft.masked_logits: false")
    return getattr(text, "final_logit_softcapping", None)


@functools.cache
def _head_nll():
    """An autograd function: summed negative log-likelihood of ``targets`` under
    ``softmax(head(hidden))``, in row chunks.

    Each chunk's logits ``[chunk, vocab]`` live only while that chunk is processed: the gradient
    with respect to the hidden states (and to the weight, when it trains) is computed in the
    forward pass, ``(softmax - onehot) @ W``, and only scaled by the incoming gradient in
    backward. The same products as autograd through a full-logits loss (one forward and one
    backward matmul per row), without the memory of the logits and without recomputing them.
    Built on first use so that importing this module does not import torch.
    """
    import torch

    class HeadNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, softcap, chunk):
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, hidden.shape[0], chunk):
                h, y = hidden[s:s + chunk], targets[s:s + chunk]
                z = (h @ weight.t()).float()
                if bias is not None:
                    z += bias.float()
                if softcap is not None:
                    t = torch.tanh(z / softcap)
                    z = t * softcap
                lse = torch.logsumexp(z, dim=-1)
                total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    g = z.sub_(lse[:, None]).exp_()                 # softmax, in place of the logits
                    g[torch.arange(len(y), device=y.device), y] -= 1.0
                    if softcap is not None:
                        g *= 1.0 - t * t                            # d(cap * tanh(z / cap)) / dz
                    g = g.to(h.dtype)
                    if need_h:
                        grad_h[s:s + chunk] = g @ weight
                    if need_w:
                        grad_w += (g.t() @ h).float()
            ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.grads
            ctx.grads = None
            scale = lambda g: None if g is None else g * grad_out.to(g.dtype)   # noqa: E731
            return scale(grad_h), scale(grad_w), None, None, None, None

    return HeadNLL


def masked_nll(lm, hidden, labels, chunk: int = 512):
    """``(nll_sum, n_tokens)`` of the next-token labels that are not ``-100``, reading the output
    layer only at those positions. ``hidden``: the decoder's last hidden states ``[B, T, H]``;
    ``labels``: ``[B, T]`` aligned with the inputs (shifted here, as the model's own loss does)."""
    head = lm.get_output_embeddings()
    keep = labels[:, 1:] != IGNORE
    h = hidden[:, :-1][keep]                                     # [n, H]: positions that predict a label
    y = labels[:, 1:][keep].to(h.device)
    return _head_nll().apply(h, head.weight, head.bias, y, _softcap(lm), chunk), keep.sum()


@functools.cache
def _masked_output_class():
    from transformers.utils import ModelOutput

    @dataclass
    class MaskedHeadOutput(ModelOutput):
        """``loss`` = ``nll_sum / n_tokens``; the trainer rescales ``nll_sum`` for gradient accumulation."""
        loss: object = None
        nll_sum: object = None
        n_tokens: object = None

    return MaskedHeadOutput


def add_masked_head(lm, chunk: int = 512) -> None:
    """Let ``lm(..., labels=labels, masked_head=True)`` return the loss from the cheap head.

    Patched onto the causal LM (before peft wraps it) so calls keep going through every wrapper
    (peft, DDP, accelerate); without ``masked_head`` the model's own forward runs unchanged.
    """
    original = lm.forward
    output_cls = _masked_output_class()

    @functools.wraps(type(lm).forward)
    def forward(self, *args, masked_head: bool = False, **kwargs):
        if not masked_head:
            return original(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:
            raise ValueError("masked_head=True computes the loss: pass labels")
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        nll, n = masked_nll(self, hidden, labels, chunk)
        return output_cls(loss=nll / n.clamp(min=1), nll_sum=nll, n_tokens=n)

    lm.forward = types.MethodType(forward, lm)


@functools.cache
def _sft_trainer_class():
    """trl's SFTTrainer with the loss from :func:`add_masked_head` (``loss_mode="masked"``), trl's own
    (``"trl"``: on CPU its fused head scores every position) or the model's full logits (``"full"``)."""
    from transformers import Trainer
    from trl import SFTTrainer

    class AssistantSFTTrainer(SFTTrainer):
        loss_mode = "masked"
        tokens_seen = 0                  # every token of every batch (tokens/s counts these)
        assistant_tokens_seen = 0        # tokens whose next-token label counts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
                self.assistant_tokens_seen += int((inputs["labels"][:, 1:] != IGNORE).sum())
                self._metrics["train"]["num_tokens"] = [self.tokens_seen]
            if self.loss_mode == "trl":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.loss_mode == "full":
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=inputs["labels"], masked_head=True)
            # as the model's own loss: over the tokens of the whole accumulated batch when the trainer counts them
            denom = num_items_in_batch if num_items_in_batch is not None else out.n_tokens.clamp(min=1)
            loss = out.nll_sum / denom
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, out) if return_outputs else loss

    return AssistantSFTTrainer


# --------------------------------------------------------------------------- training
def _sft_cfg(cfg: RunConfig):
    if getattr(cfg, "sft", None) is None:
        raise ConfigError("sft: this recipe has no sft section")
    return cfg.sft


def lora_config(sft, num_layers: int):
    """The policy's LoRA (:func:`almost_utils.reward.lora_config` for a causal LM, no extra module)."""
    from .reward import lora_config as shared_lora_config
    return shared_lora_config(sft, num_layers, task="CAUSAL_LM", where="sft", modules_to_save=None)


def build_trainer(cfg: RunConfig, model, tok, dataset, output_dir: str | Path, *, loss_mode: str | None = None,
                  max_steps: int = -1, save_steps: int | None = None, progress: bool = True, callbacks=None,
                  desc: str = "sft"):
    """An SFT trainer for ``model`` (a plain causal LM: LoRA is added here) on a :func:`sft_dataset`.

    ``loss_mode`` (default: ``"masked"`` when ``sft.masked_logits``, else ``"trl"``) picks the loss
    computation; ``max_steps`` > 0 overrides the epochs (benchmarks); ``save_steps`` 0 saves nothing.
    """
    import torch

    from .models import resolve_device
    from .reward import _quiet_deprecations, decoder_layers

    sft = _sft_cfg(cfg)
    spec = cfg.models[sft.model]
    device = resolve_device(cfg.device)
    mode = loss_mode or ("masked" if sft.masked_logits else "trl")
    if mode not in LOSS_MODES:
        raise ConfigError(f"loss_mode: must be one of {LOSS_MODES}, got {mode!r}")
    add_masked_head(model, sft.head_chunk)
    quantized = spec.load_in_4bit and device == "cuda"
    if quantized:
        from peft import prepare_model_for_kbit_training
        with _quiet_deprecations():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=sft.gradient_checkpointing)
    save_steps = sft.save_steps if save_steps is None else save_steps
    bf16 = next(model.parameters()).dtype == torch.bfloat16 or quantized
    with _quiet_deprecations():
        from trl import SFTConfig as TrlSFTConfig
        args = TrlSFTConfig(
            output_dir=str(output_dir), per_device_train_batch_size=sft.batch_size,
            gradient_accumulation_steps=sft.grad_accum, num_train_epochs=sft.epochs, max_steps=max_steps,
            learning_rate=sft.learning_rate, weight_decay=sft.weight_decay, warmup_steps=sft.warmup_ratio,
            lr_scheduler_type=sft.lr_scheduler, logging_steps=sft.logging_steps, logging_first_step=True,
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1, save_total_limit=1,
            report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=device == "cpu", bf16=bool(bf16),
            fp16=False, gradient_checkpointing=sft.gradient_checkpointing,
            max_length=None,                 # dialogues arrive fitted (fit_dialogue): trl would cut the end
            packing=False, dataset_num_proc=None, dataloader_num_workers=0,
            disable_tqdm=not progress or progress_headless(),
            train_sampling_strategy="group_by_length",     # batches of similar lengths: less padding
            ddp_find_unused_parameters=False)
    if progress and progress_headless():
        callbacks = [*(callbacks or []), trainer_callback(f"training {desc}")]
    with _quiet_deprecations():
        trainer = _sft_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                       peft_config=lora_config(sft, decoder_layers(model)), callbacks=callbacks)
    quiet_trainer(trainer)
    trainer.loss_mode = mode
    return trainer


def last_checkpoint(folder: Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` (trainer_state.json is written last); half-written ones are removed."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for p in reversed(found):
        if (p / "trainer_state.json").is_file() and (p / "adapter_model.safetensors").is_file():
            return p
        shutil.rmtree(p, ignore_errors=True)
    return None


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The training rows of the trainer's log: ``{"step", "epoch", "loss", "learning_rate", "grad_norm"}``."""
    keys = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: r.get(k) for k in keys} for r in log_history if "loss" in r]


def train_sft(cfg: RunConfig, rows: Sequence[dict], folder: str | Path, variant: str = "sft", *,
              progress: bool = True, callbacks=None, extra_meta: dict | None = None, return_policy: bool = False):
    """Fine-tune ``sft.model`` with LoRA on dialogue ``rows`` and save the adapter to ``folder/adapter``.

    Checkpoints (adapter, optimizer, scheduler, RNG states) go to ``folder/checkpoints`` every
    ``sft.save_steps`` optimizer steps; a rerun after a kill resumes from the newest complete one.
    The adapter folder appears only when complete and the checkpoints are then removed. Returns
    the training summary stored in ``adapter/policy.json["train"]``; with ``return_policy`` also a
    :class:`Policy` around the in-memory model (adapter unmerged), as ``(summary, policy)``.
    """
    from .models import load_model, load_tokenizer, resolve_device
    from .reward import _quiet_deprecations

    sft = _sft_cfg(cfg)
    spec = cfg.models[sft.model]
    folder = Path(folder)
    t0 = time.perf_counter()
    data, counts = sft_dataset(rows, load_tokenizer(spec), sft.max_length)
    if len(data) == 0:
        raise ConfigError(f"{variant}: every dialogue is longer than sft.max_length = {sft.max_length} tokens "
                          "in its prompt alone; nothing to train on")
    write_json(folder / "data.json", counts)
    model, tok = load_model(spec, cfg.device, cfg.seed)
    trainer = build_trainer(cfg, model, tok, data, folder / CHECKPOINT_DIR, progress=progress,
                            callbacks=callbacks, desc=variant)
    resume = last_checkpoint(folder / CHECKPOINT_DIR)
    if resume is not None:
        say(f"{variant}: resuming from {resume.name}")
    with _quiet_deprecations():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = result.metrics.get("train_runtime", 0.0)
    losses = [r["loss"] for r in loss_curve(trainer.state.log_history)]
    summary = {
        "variant": variant, "device": resolve_device(cfg.device), "loss_mode": trainer.loss_mode,
        "optimizer_steps": trainer.state.global_step, "epochs": sft.epochs, **counts,
        "resumed_from": resume.name if resume else None, "seconds": round(time.perf_counter() - t0, 1),
        "train_runtime_s": round(runtime, 1),
        # tokens of this session's steps only (a resumed run counts what it trained itself)
        "tokens_per_s": round(trainer.tokens_seen / runtime, 1) if runtime else None,
        "assistant_tokens_per_s": round(trainer.assistant_tokens_seen / runtime, 1) if runtime else None,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        **(extra_meta or {})}
    save_policy_adapter(trainer.model, tok, folder / ADAPTER_DIR, spec=spec, cfg=cfg, train=summary)
    write_jsonl(folder / "loss_curve.jsonl", loss_curve(trainer.state.log_history))
    write_json(folder / "log_history.json", trainer.state.log_history)
    shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
    if return_policy:
        lm = trainer.model.get_base_model().eval()
        return summary, Policy(lm, tok, name=variant, batch_size=sft.logprob_batch_size)
    return summary


def save_policy_adapter(model, tok, folder: str | Path, *, spec: ModelSpec, cfg: RunConfig, train: dict) -> Path:
    """Save a peft adapter and ``policy.json`` (what rebuilds its base) atomically: written to
    ``.<name>.tmp`` and renamed, so ``folder`` is either complete or absent."""
    import os
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if not (tmp / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"{tmp}: peft saved no adapter_model.safetensors")
    meta = {"base": asdict(spec), "seed": cfg.seed, "eos_token": tok.eos_token,
            "format": "<bos>\\n\\nHuman: {query}\\n\\nAssistant: {answer}<eos> per turn",
            "sft_config": asdict(cfg.sft), "train": train}
    write_json(tmp / META_FILE, meta)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------- the stage
def dialogues_path(cfg: RunConfig, variant: str) -> Path:
    """The Step-3 file a variant trains on: ``results/<run>/rmsp/<sft.dialogues[variant]>``."""
    sft = _sft_cfg(cfg)
    if variant not in SFT_STAGES:
        raise ConfigError(f"unknown SFT variant {variant!r} (known: {', '.join(SFT_STAGES)})")
    return cfg.run_dir / UPSTREAM_STAGE / sft.dialogues[variant]


def run_sft_stage(cfg: RunConfig, variant: str = "sft", progress: bool = True, callbacks=None) -> dict:
    """Train (or reuse, or resume) one SFT variant: ``"sft"`` (ALMoST-SFT) or ``"sft_norm"`` (SFT-noRM).

    Everything that can be wrong with the input stops before a model loads: no sft section, an
    unfinished Step 3, another recipe's outputs in the folder, a missing, empty or malformed
    dialogues file. Returns the training summary (also in ``adapter/policy.json``).
    """
    from .fingerprint import begin_stage, file_digest, stage_status

    sft = _sft_cfg(cfg)
    path = dialogues_path(cfg, variant)
    if stage_status(cfg, UPSTREAM_STAGE) != "done":
        raise ConfigError(f"{variant}: Step 3 (RMSP) has not finished in {cfg.run_dir / UPSTREAM_STAGE}: run it first")
    rows = subsample(read_dialogues(path, sft.turns_field, f"sft.dialogues.{variant}"), sft.max_dialogues, cfg.seed)
    status, fp = begin_stage(cfg, variant)     # a recipe change stops here, before a model loads
    stage = cfg.stage_dir(variant)
    meta_path = stage / ADAPTER_DIR / META_FILE
    if status == "done":
        say(f"{variant}: reusing the trained adapter in {stage / ADAPTER_DIR} (recipe unchanged)")
        return read_json(meta_path)["train"]
    with Manifest(cfg, variant, fp) as man:
        man.note("dialogues_file", str(path))
        man.note("dialogues_sha256", file_digest(path))
        man.note("description", SFT_STAGES[variant])
        if meta_path.is_file() and read_json(meta_path)["train"].get("fingerprint") == fp:
            summary = read_json(meta_path)["train"]   # killed after the adapter was saved: nothing to redo
            shutil.rmtree(stage / CHECKPOINT_DIR, ignore_errors=True)
        else:
            with man.timer("train"):
                summary = train_sft(cfg, rows, stage, variant, progress=progress, callbacks=callbacks,
                                    extra_meta={"fingerprint": fp})
        for key in ("dialogues", "kept", "truncated", "cut", "dropped", "tokens", "assistant_tokens",
                    "optimizer_steps"):
            man.count(key, summary[key])
        for key in ("tokens_per_s", "assistant_tokens_per_s", "first_loss", "final_loss", "resumed_from",
                    "loss_mode", "device"):
            man.note(key, summary[key])
    return summary


def load_training(cfg_or_dir, variant: str = "sft") -> dict:
    """What the notebook plots, read back: ``{"summary", "loss_curve", "data"}`` of one variant."""
    from .artifacts import read_jsonl
    stage = (cfg_or_dir.run_dir if isinstance(cfg_or_dir, RunConfig) else Path(cfg_or_dir))
    stage = stage / variant if (stage / variant).is_dir() else stage
    return {"summary": read_json(stage / ADAPTER_DIR / META_FILE)["train"],
            "loss_curve": read_jsonl(stage / "loss_curve.jsonl"), "data": read_json(stage / "data.json")}


# --------------------------------------------------------------------------- the policy
def _history(query: Query) -> list[Turn]:
    """A query as the dialogue so far: ``"text"`` -> ``[("Human", "text")]``; a list of turns as is."""
    if isinstance(query, str):
        return [("Human", query)]
    turns = [tuple(t) for t in query]
    if not turns or turns[-1][0] != "Human":
        raise ValueError(f"a dialogue to answer must end with a Human turn, got {turns[-1:]!r}")
    return _check_turns([list(t) for t in turns] + [["Assistant", ""]], "query")[:-1]


def prompt_ids(tok, query: Query, prefix: str = "") -> list[int]:
    """The ids of a dialogue so far as in training (pieces tokenized apart, BOS first), ending in
    an open Assistant turn; a few-shot ``prefix`` gets the special tokens and the dialogue none,
    as the engine joins them."""
    pairs = exchanges(_history(query) + [("Assistant", "")])
    ids, _ = encode_exchanges(tok, pairs)
    ids = ids[:-1]                                               # the open turn has no answer (nor EOS)
    if prefix:
        specials = len(tok("").input_ids)                        # BOS the dialogue no longer needs
        ids = tok(prefix).input_ids + ids[specials:]
    return ids


class Policy:
    """A causal LM in the inference format: sampling through the engine, log-probs by a plain forward.

    ``generate`` prompts ``\\n\\nHuman: {query}\\n\\nAssistant:`` (earlier assistant turns of a
    dialogue end with EOS, as in training) and returns the answers, stripped, cut at the next
    speaker turn. ``logprobs`` scores given answers under the same prompt ids as training.
    """

    def __init__(self, model, tokenizer, name: str = "policy", batch_size: int = 8, progress: bool = True,
                 meta: dict | None = None):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size, self.progress, self.meta = batch_size, progress, meta or {}
        self._engine = None

    @property
    def engine(self):
        """The sampling engine over this policy's weights (built on first use)."""
        if self._engine is None:
            from .sampling import TransformersEngine
            self._engine = TransformersEngine(self.model, self.tokenizer, batch_size=self.batch_size,
                                              progress=self.progress)
        return self._engine

    # ---------------------------------------------------------------- prompts
    def prompt_text(self, query: Query) -> str:
        """``\\n\\nHuman: q1\\n\\nAssistant: a1<eos>\\n\\nHuman: q2\\n\\nAssistant:`` for a dialogue so far."""
        pairs = exchanges(_history(query) + [("Assistant", "")])
        done = "".join(prompt_piece(q) + " " + a.strip() + self.tokenizer.eos_token for q, a in pairs[:-1])
        return done + prompt_piece(pairs[-1][0])

    def prompt_ids(self, query: Query, prefix: str = "") -> list[int]:
        """The prompt's ids exactly as in training (see :func:`prompt_ids`)."""
        return prompt_ids(self.tokenizer, query, prefix)

    # ---------------------------------------------------------------- sampling
    def _params(self, params):
        stop = list(dict.fromkeys([*params.stop, *STOP_STRINGS]))   # a turn ends at the next speaker, always
        return dataclasses.replace(params, stop=stop)

    def generate(self, queries: Sequence[Query], params, prefix: str = "", desc: str | None = None) -> list[str]:
        """One answer per query (text, stripped); ``params`` is a :class:`~almost_utils.sampling.SamplingParams`."""
        prompts = [self.prompt_text(q) for q in queries]
        outs = self.engine.generate(prompts, self._params(params), prefix=prefix, desc=desc or f"sampling {self.name}")
        return [o.strip() for o in outs]

    def generate_tokens(self, queries: Sequence[Query], params, prefix: str = "",
                        desc: str | None = None) -> list[list[int]]:
        """Sampled token ids per query (EOS excluded), for scoring exactly what was sampled."""
        prompts = [self.prompt_text(q) for q in queries]
        return self.engine.generate_tokens(prompts, self._params(params), prefix=prefix, desc=desc)

    # ---------------------------------------------------------------- scoring
    def logprobs(self, queries: Sequence[Query], responses: Sequence[str | Sequence[int]], eos: bool = False,
                 prefix: str = "", batch_size: int | None = None) -> list[dict]:
        """Log-probabilities of each response given its prompt: ``[{"sum", "tokens", "ids"}]``.

        A response is text (tokenized as `` {text}``, as in training) or token ids (e.g. from
        :meth:`generate_tokens`); ``eos=True`` also scores the EOS that ends the turn. Batched,
        right-padded plain forward; the output layer runs at response positions only.
        """
        import torch
        if len(queries) != len(responses):
            raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
        tok = self.tokenizer
        rows = []
        for q, r in zip(queries, responses):
            r_ids = answer_ids(tok, r, eos=eos) if isinstance(r, str) else list(r) + ([tok.eos_token_id] if eos else [])
            rows.append((self.prompt_ids(q, prefix), r_ids))
        out: list[dict | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
        bs = batch_size or self.batch_size
        device = next(self.model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                chunk = order[s:s + bs]
                width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, i in enumerate(chunk):
                    seq = rows[i][0] + rows[i][1]
                    ids[b, :len(seq)] = torch.tensor(seq)
                    mask[b, :len(seq)] = 1
                hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                               use_cache=False).last_hidden_state
                for b, i in enumerate(chunk):
                    p, r = rows[i]
                    out[i] = {"sum": 0.0, "tokens": [], "ids": r}
                    if r:
                        lp = self._token_logprobs(hidden[b, len(p) - 1:len(p) + len(r) - 1], r)
                        out[i] = {"sum": float(sum(lp)), "tokens": lp, "ids": r}
        return out

    def _token_logprobs(self, hidden, targets: list[int]) -> list[float]:
        """log p(target) at each row of ``hidden`` ``[n, H]`` under the model's output layer (softcap included)."""
        import torch
        head = self.model.get_output_embeddings()
        z = head(hidden).float()
        cap = _softcap(self.model)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        lp = torch.log_softmax(z, dim=-1)
        return lp.gather(1, torch.tensor(targets, device=lp.device)[:, None]).squeeze(1).tolist()


def find_adapter(path: str | Path, variant: str = "sft") -> Path:
    """The adapter folder for ``path``: an adapter folder, a stage folder or a run folder (with ``variant``)."""
    path = Path(path)
    for cand in (path, path / ADAPTER_DIR, path / variant / ADAPTER_DIR):
        if (cand / META_FILE).is_file():
            return cand
    raise FileNotFoundError(f"no trained policy under {path} (looked for {META_FILE} in ., {ADAPTER_DIR}/, "
                            f"{variant}/{ADAPTER_DIR}/); run the SFT stage first")


def load_policy(where, variant: str = "sft", *, vanilla: bool = False, device: str | None = None,
                batch_size: int | None = None, progress: bool = True) -> Policy:
    """A :class:`Policy`: a trained SFT adapter merged into a fresh copy of its base weights, or
    with ``vanilla=True`` that base model alone (the prompted baseline).

    ``where`` is a recipe (:class:`RunConfig`: its run folder; ``vanilla`` needs no training, it
    loads ``sft.model``), a run folder, a stage folder or an adapter folder. Merging keeps the
    engine's speed (plain linear layers). A base trained in 4-bit (QLoRA) is loaded in its compute
    dtype for merging and sampling, as QLoRA adapters are usually served.
    """
    from .models import load_model
    from .reward import _quiet_deprecations, _spec_from_dict

    if isinstance(where, RunConfig):
        sft = _sft_cfg(where)
        device = device or where.device
        batch_size = batch_size or where.sampling.batch_size
        if vanilla:
            model, tok = load_model(where.models[sft.model], device, where.seed)
            return Policy(model, tok, name=f"vanilla:{sft.model}", batch_size=batch_size, progress=progress)
        where = where.run_dir / variant / ADAPTER_DIR
    folder = find_adapter(where, variant)
    meta = read_json(folder / META_FILE)
    spec = dataclasses.replace(_spec_from_dict(meta["base"]), load_in_4bit=False)
    model, tok = load_model(spec, device or "auto", meta["seed"])
    batch_size = batch_size or meta.get("sft_config", {}).get("logprob_batch_size", 8)
    if vanilla:
        return Policy(model, tok, name=f"vanilla:{folder.parent.name}", batch_size=batch_size, progress=progress,
                      meta=meta)
    from peft import PeftModel
    with _quiet_deprecations():
        model = PeftModel.from_pretrained(model, folder, is_trainable=False).merge_and_unload()
    return Policy(model.eval(), tok, name=meta["train"].get("variant", folder.parent.name), batch_size=batch_size,
                  progress=progress, meta=meta)
