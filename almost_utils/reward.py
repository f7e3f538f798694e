"""Reward models: the policy's backbone with a scalar head, trained on pairs with Bradley-Terry loss.

What the RM reads is the dialogue in the policy's format ending in the response
(:func:`almost_utils.dialogue.rm_text`), with the tokenizer's BOS, an EOS appended and the score
read at that EOS (the last non-pad token); sequences longer than ``max_length`` are truncated on
the *left* (the BOS is kept), so the response end always survives::

    <bos>\\n\\nHuman: {prompt}\\n\\nAssistant: {response}<eos>

Training rows are Step-1 pairs ``{"prompt", "chosen", "rejected", ...}`` or benchmark pairs
``{"history": [("Human", ...), ...], "chosen", "rejected"}``. LoRA (peft) adapts the backbone,
optionally only its top ``lora_layers`` layers; the head is trained fully and saved with the
adapter (``modules_to_save=["score"]``: without it a reloaded RM would score with a fresh random
head). On CUDA with ``load_in_4bit`` the backbone is NF4 (QLoRA). A saved RM is a folder::

    rm/
      reward_model.json            # base model spec, seed, max_length, pad token, training summary
      adapter_config.json          # LoRA config (+ modules_to_save)
      adapter_model.safetensors    # LoRA weights + the score head
      log_history.json             # the trainer's log rows (loss, accuracy, margin, eval_*)

Usage::

    scorer = load_reward_model("results/cpu")          # a run folder, a stage folder or an RM folder
    scores = scorer.score([[("Human", "Hi")]], ["Hello! How can I help?"])   # -> [float]
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from .config import ConfigError, ModelSpec, RewardModelConfig, RunConfig
from .dialogue import Turn, rm_text
from .progress import bar as progress_bar
from .progress import headless as progress_headless
from .progress import quiet_trainer
from .progress import trainer_callback

META_FILE = "reward_model.json"
PAD_CANDIDATES = ("<pad>", "<|endoftext|>", "<unk>", "<|padding|>")


# --------------------------------------------------------------------------- text -> ids
def pair_history(row: dict) -> list[Turn]:
    """The conversation before the response: ``row["history"]`` or ``[("Human", row["prompt"])]``."""
    if "history" in row:
        return [tuple(t) for t in row["history"]]
    return [("Human", row["prompt"])]


def ensure_reward_pad_token(tok) -> int:
    """Give ``tok`` a pad token distinct from EOS (and BOS); return its id.

    The classifier scores the last token that is not the pad token, so a pad equal to EOS
    would make it skip the EOS it should score (SmolLM2: pad == eos == ``<|im_end|>``).
    """
    special = {tok.eos_token_id, tok.bos_token_id}
    if tok.pad_token_id is not None and tok.pad_token_id not in special:
        return tok.pad_token_id
    vocab = tok.get_vocab()
    for cand in PAD_CANDIDATES + ((tok.unk_token,) if tok.unk_token else ()):
        if cand in vocab and vocab[cand] not in special:
            tok.pad_token = cand
            return tok.pad_token_id
    raise ConfigError(f"reward model: the tokenizer has no token to pad with other than EOS/BOS "
                      f"(tried {PAD_CANDIDATES}); add one")


def encode(tok, text: str, max_length: int) -> list[int]:
    """``text`` -> ids with the tokenizer's specials, EOS appended, left-truncated to ``max_length``."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    if len(ids) > max_length:
        head = ids[:1] if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else []
        ids = head + ids[len(ids) - (max_length - len(head)):]
    return ids


def pairs_dataset(rows: Sequence[dict], tok, max_length: int):
    """Pairs -> a ``datasets.Dataset`` of ``chosen_ids``/``rejected_ids`` (what RewardTrainer takes as is)."""
    from datasets import Dataset
    data = {"chosen_ids": [], "rejected_ids": [], "length": [], "truncated": []}
    for row in rows:
        hist = pair_history(row)
        c = encode(tok, rm_text(hist, row["chosen"]), max_length)
        r = encode(tok, rm_text(hist, row["rejected"]), max_length)
        data["chosen_ids"].append(c)
        data["rejected_ids"].append(r)
        data["length"].append(max(len(c), len(r)))       # batches are grouped by it (less padding)
        data["truncated"].append(max(len(c), len(r)) >= max_length)
    return Dataset.from_dict(data)


# --------------------------------------------------------------------------- models
class _ScalarHead:
    """``AutoModelForSequenceClassification`` with one label, for :func:`models.load_model`.

    ``from_config`` (tiny models) takes no ``num_labels`` keyword, so it is set on the config.
    """

    @staticmethod
    def from_config(config, **kwargs):
        from transformers import AutoModelForSequenceClassification
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config, **kwargs)

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)


def load_backbone(spec: ModelSpec, device: str = "auto", seed: int = 0, place: bool = True):
    """``(model, tokenizer)``: the backbone as a 1-label sequence classifier, head freshly initialised.

    ``place=False``: built in ``device``'s dtype but not moved there (the trainer places it).

    For gemma-3 (``gemma3_text``) transformers builds ``Gemma3TextForSequenceClassification``: the
    decoder plus ``score = Linear(hidden, 1, bias=False)`` read at the last non-pad token. The
    head's initial weights are a function of ``seed``. With ``load_in_4bit`` (CUDA) the backbone
    is NF4 and the head stays unquantized (transformers keeps the last module in full precision).
    """
    import torch

    from .models import load_model

    try:    # trl's own guard: a missing score.weight (and an unused lm_head) is expected, not reported
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:
        suppress_seqcls_warning = contextlib.nullcontext
    torch.manual_seed(seed)
    with suppress_seqcls_warning():
        model, tok = load_model(spec, device, seed, auto_class=_ScalarHead, place=place)
    pad_id = ensure_reward_pad_token(tok)
    model.config.pad_token_id = pad_id
    model.config.get_text_config().pad_token_id = pad_id
    return model, tok


def decoder_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def lora_config(section, num_layers: int, task: str = "SEQ_CLS", where: str = "reward_model",
                modules_to_save: list[str] | None = ("score",)):
    """LoRA on ``section.lora_target_modules`` of the top ``section.lora_layers`` decoder layers
    (None: all). Shared by every LoRA training: the RM (``SEQ_CLS``, its head trained fully) and
    SFT (``CAUSAL_LM``, no extra module)."""
    from peft import LoraConfig, TaskType
    layers = None
    if section.lora_layers is not None:
        if section.lora_layers > num_layers:
            raise ConfigError(f"{where}.lora_layers: {section.lora_layers} asked, the model has {num_layers} layers")
        if section.lora_layers < num_layers:
            layers = list(range(num_layers - section.lora_layers, num_layers))
    return LoraConfig(task_type=getattr(TaskType, task), r=section.lora_r, lora_alpha=section.lora_alpha,
                      lora_dropout=section.lora_dropout, target_modules=list(section.lora_target_modules),
                      layers_to_transform=layers, layers_pattern="layers" if layers else None,
                      modules_to_save=list(modules_to_save) if modules_to_save else None)


@contextlib.contextmanager
def _quiet_deprecations():
    """transformers 5.x renamed gradient checkpointing; peft and trl still use the old names."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*")
        yield


def _rm_cfg(cfg: RunConfig) -> RewardModelConfig:
    if cfg.reward_model is None:
        raise ConfigError("reward_model: this recipe has no reward_model section")
    return cfg.reward_model


def train_reward_model(cfg: RunConfig, train_rows: Sequence[dict], eval_rows: Sequence[dict] | None,
                       folder: str | Path, progress: bool = True, callbacks=None,
                       extra_meta: dict | None = None, return_scorer: bool = False):
    """Train an RM on ``train_rows`` with trl's RewardTrainer and save it to ``folder``.

    The folder appears only when complete (written as ``.<name>.tmp`` and renamed). Returns the
    summary stored in ``reward_model.json["train"]`` (pairs, truncation, seconds, final loss, a fresh
    ``train_id`` that names this training run, and ``extra_meta``); with ``return_scorer`` also a
    :class:`RewardScorer` around the in-memory model, as ``(summary, scorer)``.
    """
    import torch
    from peft import get_peft_model
    from trl import RewardConfig, RewardTrainer

    from . import distributed
    from .models import resolve_device

    rm = _rm_cfg(cfg)
    spec = cfg.models[rm.model]
    device = resolve_device(cfg.device)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    # Under `accelerate launch` every process trains (the trainer shards the batches and averages
    # the gradients) but only the main one touches the folder; the others' trainers point into it.
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()

    t0 = time.perf_counter()
    # several processes: the trainer (its accelerator) puts the model on each process's device
    model, tok = load_backbone(spec, device, cfg.seed, place=distributed.world_size() == 1)
    if spec.load_in_4bit and device == "cuda":
        from peft import prepare_model_for_kbit_training
        with _quiet_deprecations():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=rm.gradient_checkpointing)
    with _quiet_deprecations():
        model = get_peft_model(model, lora_config(rm, decoder_layers(model)))
    train_ds = pairs_dataset(train_rows, tok, rm.max_length)
    eval_ds = pairs_dataset(eval_rows, tok, rm.max_length) if eval_rows else None
    bf16 = next(model.parameters()).dtype == torch.bfloat16 or (spec.load_in_4bit and device == "cuda")
    with _quiet_deprecations():
        args = RewardConfig(
            output_dir=str(tmp / "trainer"), per_device_train_batch_size=rm.batch_size,
            per_device_eval_batch_size=rm.batch_size, gradient_accumulation_steps=rm.grad_accum,
            num_train_epochs=rm.epochs, learning_rate=rm.learning_rate, weight_decay=rm.weight_decay,
            warmup_steps=rm.warmup_ratio, lr_scheduler_type=rm.lr_scheduler, logging_steps=rm.logging_steps,
            logging_first_step=True, eval_strategy="steps" if (eval_ds is not None and rm.eval_steps) else "no",
            eval_steps=rm.eval_steps, save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
            use_cpu=device == "cpu", bf16=bool(bf16), fp16=False, gradient_checkpointing=rm.gradient_checkpointing,
            max_length=None, disable_dropout=False, dataloader_num_workers=0,
            disable_tqdm=not progress or progress_headless(),   # headless: our bar below, in the terminal
            train_sampling_strategy="group_by_length", length_column_name="length",
            remove_unused_columns=False,      # keep "length" for the sampler; the collator ignores it
            # DDP: every trainable weight (LoRA, the head) gets a gradient each step, so no extra graph walk
            ddp_find_unused_parameters=False)
    if progress and progress_headless():
        callbacks = [*(callbacks or []), trainer_callback(f"training {folder.name}")]
    with _quiet_deprecations():
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds.remove_columns("truncated"),
                                eval_dataset=eval_ds.remove_columns("truncated") if eval_ds is not None else None,
                                processing_class=tok, callbacks=callbacks)
        quiet_trainer(trainer)
        result = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    summary = {
        "train_pairs": len(train_ds), "eval_pairs": len(eval_ds) if eval_ds is not None else 0,
        "truncated_train_pairs": int(sum(train_ds["truncated"])), "optimizer_steps": trainer.state.global_step,
        "train_tokens": int(sum(map(len, train_ds["chosen_ids"])) + sum(map(len, train_ds["rejected_ids"]))),
        "seconds": round(seconds, 1), "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "device": device, "train_id": uuid.uuid4().hex[:16], **(extra_meta or {})}
    model.eval()
    if distributed.is_main():      # the weights are the same in every process after the last step
        save_reward_model(model, tok, tmp, spec=spec, rm=rm, seed=cfg.seed, train=summary,
                          log_history=trainer.state.log_history)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    distributed.barrier()          # the folder is complete before any process reads or loads it
    if not distributed.is_main():  # one summary (one train_id) for the run: the one saved
        summary = json.loads((folder / META_FILE).read_text())["train"]
    if return_scorer:
        return summary, RewardScorer(model, tok, rm.max_length, rm.score_batch_size, name=folder.name)
    return summary


def save_reward_model(model, tok, folder: str | Path, *, spec: ModelSpec, rm: RewardModelConfig, seed: int,
                      train: dict | None = None, log_history: list | None = None) -> Path:
    """Save a peft RM (adapter + score head) and what is needed to rebuild its backbone."""
    from .artifacts import write_json
    folder = Path(folder)
    model.save_pretrained(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"{folder}: peft saved no adapter_model.safetensors")
    meta = {"base": asdict(spec), "seed": seed, "max_length": rm.max_length, "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id, "reward_model_config": asdict(rm), "train": train or {}}
    write_json(folder / META_FILE, meta)
    write_json(folder / "log_history.json", log_history or [])
    return folder


# --------------------------------------------------------------------------- scoring
class RewardScorer:
    """Scores ``(conversation, response)`` pairs with a reward model, in eval mode.

    >>> scorer = load_reward_model("results/cpu")
    >>> scorer.score([[("Human", "Hi")]], ["Hello!"], batch_size=16)
    [0.73]
    """

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 16, name: str = "rm"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = name
        ensure_reward_pad_token(tokenizer)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @classmethod
    def untrained(cls, spec: ModelSpec, max_length: int, device: str = "auto", seed: int = 0, batch_size: int = 16):
        """The backbone with a fresh head (seeded): what the RM is before training, as a baseline."""
        model, tok = load_backbone(spec, device, seed)
        return cls(model, tok, max_length, batch_size, name="untrained")

    def score_texts(self, texts: Sequence[str], batch_size: int | None = None, desc: str | None = None,
                    progress: bool = True) -> list[float]:
        """Scores of ready-made RM texts; batches are formed by sorted length, results in input order."""
        import torch
        bs = batch_size or self.batch_size
        ids = [encode(self.tokenizer, t, self.max_length) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        dev = self.device
        self.model.eval()
        with torch.inference_mode(), progress_bar(total=len(ids), desc=desc or f"scoring ({self.name})",
                                                  unit="seq", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), bs):
                chunk = order[start:start + bs]
                width = max(len(ids[i]) for i in chunk)
                x = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    x[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                logits = self.model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                for row, i in enumerate(chunk):
                    out[i] = float(logits[row, 0].float())
                bar.update(len(chunk))
        return out

    def score(self, histories: Sequence[list[Turn]], responses: Sequence[str], batch_size: int | None = None,
              desc: str | None = None, progress: bool = True) -> list[float]:
        """One score per ``(history, response)``; ``history`` is a list of ``(role, text)`` turns."""
        if len(histories) != len(responses):
            raise ValueError(f"{len(histories)} histories but {len(responses)} responses")
        texts = [rm_text(list(h), r) for h, r in zip(histories, responses)]
        return self.score_texts(texts, batch_size, desc, progress)

    def score_pairs(self, rows: Sequence[dict], batch_size: int | None = None, desc: str | None = None,
                    progress: bool = True) -> tuple[list[float], list[float]]:
        """``(chosen_scores, rejected_scores)`` for pair rows (Step-1 or benchmark format), in one pass."""
        hist = [pair_history(r) for r in rows]
        scores = self.score(hist + hist, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                            batch_size, desc, progress)
        return scores[:len(rows)], scores[len(rows):]


def _spec_from_dict(base: dict) -> ModelSpec:
    """The saved backbone spec as a :class:`ModelSpec` (fields unknown to this version ignored)."""
    import dataclasses

    from .config import TinySpec
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    base = {k: v for k, v in base.items() if k in known}
    if base.get("tiny"):
        base["tiny"] = TinySpec(**base["tiny"])
    return ModelSpec(**base)


def find_reward_model(path: str | Path) -> Path:
    """The RM folder for ``path``: an RM folder, a stage folder (``reward_model/``) or a run folder."""
    path = Path(path)
    for cand in (path, path / "rm", path / "reward_model" / "rm"):
        if (cand / META_FILE).is_file():
            return cand
    raise FileNotFoundError(f"no trained reward model under {path} (looked for {META_FILE} in ., rm/, "
                            "reward_model/rm/); run notebook 02 first")


def load_reward_model(path: str | Path, device: str = "auto", batch_size: int = 16) -> RewardScorer:
    """A :class:`RewardScorer` for the RM saved under ``path`` (see :func:`find_reward_model`)."""
    from peft import PeftModel

    folder = find_reward_model(path)
    meta = json.loads((folder / META_FILE).read_text())
    model, tok = load_backbone(_spec_from_dict(meta["base"]), device, meta["seed"])
    if tok.pad_token_id != meta["pad_token_id"]:
        raise RuntimeError(f"{folder}: trained with pad id {meta['pad_token_id']}, the tokenizer now gives "
                           f"{tok.pad_token_id}")
    with _quiet_deprecations():
        model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    return RewardScorer(model, tok, meta["max_length"], batch_size, name=folder.name)
