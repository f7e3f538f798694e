"""Batched sampling from a Hugging Face causal LM, built for few-shot prompting on a CPU.

Every prompt of a step shares one long few-shot prefix (1-2k tokens) and adds a short query.
The engine

* runs the prefix through the model once and keeps its keys/values with no batch dimension:
  one copy serves every row of every batch (attention splits into a shared-prefix part and a
  per-row part, as in "cascade" attention), and it is memoised across calls;
* keeps per-row keys/values in preallocated buffers written in place (no concatenation);
* builds its own attention masks from real token positions, so left padding and gemma's
  sliding window (which HF counts in cache slots) cannot change the result;
* computes the output layer only for the last position, and samples top-p from the top
  candidates instead of sorting the 262k-entry vocabulary of gemma (exact, see :func:`nucleus`);
* checks stop strings by decoding only a short tail of each row;
* on CPU, runs the linear layers from oneDNN-packed weights (1.6x faster at 16 rows than the
  MKL path of ``F.linear``; costs a second copy of the weights, ~1.1 GB for gemma-3-270m), with
  q/k/v and gate/up packed together as one product each.

Measured on 2 shared cores (benchmarks/bench_sampling.py): a decode step of 16 rows is
~80% matrix products, which stream all 1.07 GB of fp32 weights once per step. On a busy
machine give torch one thread (``threads=1``): two OpenMP threads that wait for each other
at every operation ran the same workload 9x slower than one.

The model's own modules do the work: the engine only swaps in its attention function
(registered with transformers' ``AttentionInterface``) for the duration of a call, so any
model built on that interface (gemma, llama, qwen, ...) works unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AttentionInterface, PreTrainedConfig

from .progress import bar as progress_bar

ATTENTION_NAME = "almost_shared_prefix"
FIRST_CUT = 8.0         # nats below the best logit: the first guess at the nucleus' candidates
BLOCK = 64              # logits per block when searching for candidates
PREFILL_CHUNK = 256     # tokens per row per prefill call: causal and windowed attention skip work
PREFILL_BUDGET = 2**25  # attention scores (floats) one prefill call may hold: 128 MB in fp32


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0     # 0 means greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()     # cut the text at the first occurrence of any (the stop string itself excluded)
    seed: int = 0
    ignore_eos: bool = False     # benchmarks: always generate max_new_tokens
    include_eos: bool = False    # generate_tokens: keep the EOS that ended a row (RL scores that action too)


# --------------------------------------------------------------------------- text helpers
def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# --------------------------------------------------------------------------- sampling
def nucleus(logits: torch.Tensor, top_p: float, first_cut: float = FIRST_CUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p (nucleus) filtering that sorts only a few hundred candidate logits per row.

    Returns ``(probs, ids)``, both ``[B, k]`` for some k: the probabilities (under the full-
    vocabulary softmax) of each row's candidate tokens, most likely first, set to 0 outside
    the nucleus (padding has probability 0 too).

    A token is in the nucleus when the tokens strictly more likely than it hold less than
    ``top_p`` of the mass (HF's ``TopPLogitsWarper``; the most likely token always stays).
    Candidates are the tokens at or above a threshold, i.e. a top-k with k chosen per row.
    If the candidates hold at least ``top_p``, every other token has at least that much mass
    before it and is cut anyway, so the result equals full-vocabulary top-p exactly. The
    first threshold (``first_cut`` nats below the best logit) usually holds the nucleus;
    rows where it does not widen the cut (x4 per round) down to a threshold that provably
    does: tokens below ``lse + log((1 - top_p) / V)`` have probability under
    ``(1 - top_p) / V`` each, so all of them together hold less than ``1 - top_p``.
    """
    b, vocab = logits.shape
    blocks = _blocks(logits)
    best = blocks.amax(dim=-1)                                  # [B, vocab / BLOCK] block maxima
    m = best.amax(dim=-1, keepdim=True)
    lse = m + (logits - m).exp_().sum(dim=-1, keepdim=True).log_()   # full-vocabulary normaliser
    safe = lse + math.log(max(1.0 - top_p, 1e-30) / vocab)     # provably enough (see above)
    thr = torch.maximum(m - first_cut, safe)
    while True:
        probs, ids = _candidates(blocks, best, thr, lse)
        short = probs.cumsum(dim=-1)[:, -1] < top_p             # rows whose candidates miss mass
        if not bool(short.any()) or bool((thr <= safe)[short].all()):   # (float rounding at `safe`)
            break
        first_cut *= 4                                          # widen only those rows
        thr = torch.where(short[:, None], torch.maximum(m - first_cut, safe), thr)
    cum = probs.cumsum(dim=-1)
    return probs.masked_fill_(cum - probs >= top_p, 0.0), ids   # cum - probs: mass strictly before


def _blocks(logits: torch.Tensor) -> torch.Tensor:
    """``[B, n, BLOCK]`` view of the logits, padded with -inf when the vocabulary is not a multiple."""
    b, vocab = logits.shape
    if vocab % BLOCK:
        logits = torch.nn.functional.pad(logits, (0, BLOCK - vocab % BLOCK), value=float("-inf"))
    return logits.view(b, -1, BLOCK)


def _candidates(blocks: torch.Tensor, best: torch.Tensor, thr: torch.Tensor, lse: torch.Tensor):
    """Tokens with ``logit >= thr`` per row, most likely first, padded: ``(probs, ids)``.

    Only blocks whose maximum reaches the threshold are searched (a few percent of the
    vocabulary), which avoids a ``nonzero`` over every logit."""
    b = blocks.shape[0]
    r, c = (best >= thr).nonzero(as_tuple=True)               # row-major: rows ascending
    sub = blocks[r, c]                                          # [n blocks, BLOCK]
    i, j = (sub >= thr[r]).nonzero(as_tuple=True)
    rows, cols, vals = r[i], c[i] * BLOCK + j, sub[i, j]
    counts = torch.bincount(rows, minlength=b)
    slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    dense = blocks.new_full((b, int(counts.max())), float("-inf"))
    ids = torch.zeros(dense.shape, dtype=torch.long, device=rows.device)
    dense[rows, slot] = vals
    ids[rows, slot] = cols
    dense, order = dense.sort(dim=-1, descending=True)
    return (dense - lse).exp_(), ids.gather(-1, order)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next token per row ``[B]`` from last-position logits ``[B, V]``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    probs, ids = nucleus(logits, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)   # multinomial renormalises
    return ids.gather(1, choice).squeeze(1)


# --------------------------------------------------------------------------- key/value store
class _Prefix:
    """Keys/values of the shared prefix, one copy with no batch dimension: ``[kv_heads, P, head_dim]``."""

    def __init__(self, ids: list[int], keys: dict, values: dict):
        self.ids, self.keys, self.values = ids, keys, values

    def __len__(self):
        return len(self.ids)


class _KV:
    """Per-row keys/values of one batch in preallocated slots, plus the shared prefix.

    Row b's slot j holds the token at position ``pos[b, j]``; ``valid`` marks real tokens
    (left padding is invalid). A forward call writes slots ``[t0, t1)`` and attends to the
    prefix plus earlier slots. Masks come from positions, never from slot indices, so
    padding does not shrink the sliding window.
    """

    def __init__(self, prefix: _Prefix | None, pos: torch.Tensor, valid: torch.Tensor, dtype=torch.float32):
        self.prefix, self.pos, self.valid, self.dtype = prefix, pos, valid, dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.t0 = self.t1 = 0
        self._spans: dict = {}

    def advance(self, t0: int, t1: int):
        self.t0, self.t1, self._spans = t0, t1, {}

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store this call's keys/values in their slots, in place."""
        if layer not in self.keys:   # shapes come from the model: allocate on first use
            b, h, _, d = key.shape
            slots = self.pos.shape[1]
            self.keys[layer] = key.new_zeros(b, h, slots, d)
            self.values[layer] = value.new_zeros(b, h, slots, d)
        self.keys[layer][:, :, self.t0:self.t1] = key
        self.values[layer][:, :, self.t0:self.t1] = value

    def span(self, window: int | None):
        """``(prefix_start, row_start, mask)`` for this call (memoised per window).

        A query at position p sees keys at k > p - window. Within a row, slot distance is
        position distance, so slots before ``t0 - window + 1`` are out of every query's window;
        prefix positions before ``min query position - window + 1`` likewise. The mask is
        additive, ``[B, 1, 1, L, prefix keys + row keys]``.
        """
        if window not in self._spans:
            self._spans[window] = self._span(window)
        return self._spans[window]

    def _span(self, window: int | None):
        t0, t1 = self.t0, self.t1
        row_start = max(0, t0 - window + 1) if window else 0
        q = self.pos[:, t0:t1, None]                      # [B, L, 1] query positions
        k = self.pos[:, None, row_start:t1]               # [B, 1, keys] key positions
        ok = self.valid[:, None, row_start:t1] & (k <= q)
        if window:
            ok &= q - k < window
        # Every query sees its own slot: padding rows stay finite (no all-masked softmax).
        steps = torch.arange(t1 - t0, device=ok.device)
        ok[:, steps, t0 - row_start + steps] = True
        prefix_start = 0
        if self.prefix is not None:
            n = len(self.prefix)
            prefix_start = min(n, max(0, int(self.pos[:, t0].min()) - window + 1)) if window else 0
            kp = torch.arange(prefix_start, n, device=ok.device)[None, None, :]
            okp = kp <= q
            if window:
                okp &= q - kp < window
            ok = torch.cat([okp, ok], dim=-1)
        mask = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill_(~ok, float("-inf"))
        return prefix_start, row_start, mask[:, None, None]

    def select(self, rows: torch.Tensor):
        """Keep only ``rows``, in that order (finished rows leave the batch; a repeated index copies a row)."""
        self.pos, self.valid = self.pos[rows], self.valid[rows]
        for d in (self.keys, self.values):
            for layer in d:
                d[layer] = d[layer][rows]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            softcap=None, sliding_window=None, almost_kv: _KV | None = None, **kwargs):
    """Attention over [shared prefix ; this row's slots] with one softmax.

    The prefix has no batch dimension: its scores come from one matmul of every row's
    queries against the single prefix copy, ``[kv_heads, B*G*L, D] @ [kv_heads, D, P]``.
    ``attention_mask`` is ignored: masks come from ``almost_kv`` (real positions).
    """
    kv, layer = almost_kv, module.layer_idx
    b, n_heads, length, d = query.shape
    kv_heads = key.shape[1]
    g = n_heads // kv_heads                     # query heads per kv head (adjacent, as repeat_kv)
    kv.write(layer, key, value)
    prefix_start, row_start, mask = kv.span(sliding_window)
    ks = kv.keys[layer][:, :, row_start:kv.t1]
    vs = kv.values[layer][:, :, row_start:kv.t1]
    # Scale q rather than the scores: fewer elements (and exact for gemma's 1/16).
    q = (query * (d ** -0.5 if scaling is None else scaling)).reshape(b, kv_heads, g * length, d)
    scores = q @ ks.transpose(-1, -2)           # [B, kvh, G*L, row keys]
    n_prefix = len(kv.prefix) - prefix_start if kv.prefix is not None else 0
    if n_prefix:
        kp = kv.prefix.keys[layer][:, prefix_start:]
        qp = q.transpose(0, 1).reshape(kv_heads, b * g * length, d)
        sp = (qp @ kp.transpose(-1, -2)).view(kv_heads, b, g * length, n_prefix).transpose(0, 1)
        scores = torch.cat([sp, scores], dim=-1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv_heads, g, length, -1).add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(b, kv_heads, g * length, -1)
    out = probs[..., n_prefix:] @ vs            # [B, kvh, G*L, D]
    if n_prefix:
        vp = kv.prefix.values[layer][:, prefix_start:]
        pp = probs[..., :n_prefix].transpose(0, 1).reshape(kv_heads, b * g * length, n_prefix)
        out = out + (pp @ vp).view(kv_heads, b, g * length, d).transpose(0, 1)
    return out.reshape(b, n_heads, length, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


@contextlib.contextmanager
def _attention(model, name: str):
    """Run the model's attention layers through ``name`` for a while (every config it holds)."""
    configs = {id(m.config): m.config for m in model.modules()
               if isinstance(getattr(m, "config", None), PreTrainedConfig)}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


# Sibling projections that llama-family blocks (llama, gemma, qwen, mistral) apply to one input.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_linears(model) -> dict:
    """``{module: forward}`` running the model's fp32 CPU ``nn.Linear`` layers from oneDNN-packed
    weights (empty if unsupported); siblings in :data:`FUSED_SIBLINGS` share one packed weight.

    At decode-sized inputs (16 rows) MKL's sgemm, which ``F.linear`` uses, is compute-bound
    far below the machine's peak; the same product from a prepacked oneDNN weight took 71 ms
    instead of 113 ms for gemma's 262k x 640 output layer (1 thread). Costs one more copy of
    the weights in memory.
    """
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if reorder is None or not torch.backends.mkldnn.is_available():
        return {}
    forwards = {}
    for parent in model.modules():
        for names in FUSED_SIBLINGS:
            group = [getattr(parent, n, None) for n in names]
            if all(map(_packable, group)) and len({m.in_features for m in group}) == 1:
                forwards.update(_FusedSiblings(group, reorder).forwards())
    for m in model.modules():
        if _packable(m) and m not in forwards:
            bias = None if m.bias is None else m.bias.detach()
            forwards[m] = functools.partial(_packed_forward, reorder(m.weight.detach(), 16), bias)
    return forwards


def _packable(m) -> bool:
    return type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32


def _packed_forward(weight, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FusedSiblings:
    """Linears applied to the same input (q/k/v, gate/up) as one wider product.

    The first member called computes every member's output; each other member takes its
    slice if it is called on that same tensor before being served twice. Any other call
    pattern just recomputes, so the result never depends on the call order. One product of
    width 1536 instead of three (gemma: 1024 + 256 + 256) saved about 1% of a decode step, with
    the same greedy tokens.
    """

    def __init__(self, modules, reorder):
        self.weight = reorder(torch.cat([m.weight.detach() for m in modules]), 16)
        biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
        self.bias = None if all(m.bias is None for m in modules) else torch.cat(biases)
        ends = torch.tensor([m.out_features for m in modules]).cumsum(0).tolist()
        self.spans = list(zip([0] + ends[:-1], ends))
        self.modules = modules
        self._input, self._output, self._served = None, None, set()

    def forwards(self) -> dict:
        return {m: functools.partial(self._forward, i) for i, m in enumerate(self.modules)}

    def _forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or i in self._served:
            self._input, self._served = x, set()
            self._output = _packed_forward(self.weight, self.bias, x)
        self._served.add(i)
        a, b = self.spans[i]
        return self._output[..., a:b]


@contextlib.contextmanager
def _use_packed(forwards: dict):
    """Route each packed ``nn.Linear`` through its packed forward for a while."""
    try:
        for m, f in forwards.items():
            m.forward = f
        yield
    finally:
        for m in forwards:
            m.__dict__.pop("forward", None)


def _weights_version(model) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (training, merging)."""
    try:
        return tuple((id(p), p._version) for p in model.parameters())
    except RuntimeError:   # inference tensors keep no version counter
        return tuple(id(p) for p in model.parameters())


@contextlib.contextmanager
def _threads(n: int | None):
    """``torch.set_num_threads(n)`` for a while (None: leave it)."""
    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- engine
class TransformersEngine:
    """Batched, prefix-cached sampling with a transformers causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = True, prefix_cache: bool = True,
                 pack_weights: bool = True, threads: int | None = None):
        """``prefix_cache=False`` recomputes the prefix in every row (a reference for tests);
        ``pack_weights`` keeps oneDNN-packed copies of the linear weights (CPU, fp32; one
        more copy of the weights in memory); ``threads`` sets torch's thread count during
        calls (None: leave it; on a busy 2-core machine 1 is several times faster than 2)."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.prefix_cache, self.pack_weights, self.threads = prefix_cache, pack_weights, threads
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else next(iter(self.eos), 0)
        self.n_heads = model.config.get_text_config().num_attention_heads
        self._prefix_memo: tuple | None = None   # (ids, weights version, _Prefix)
        self._packed_memo: tuple | None = None   # (weights version, {module: packed weight})

    # ---------------------------------------------------------------- public
    def generate(self, prompts: list[str], params: SamplingParams, prefix: str = "", desc: str | None = None) -> list[str]:
        """Completions (text only, stop strings cut, EOS ends a row) for prefix + prompt, in input order."""
        tokens = self.generate_tokens(prompts, params, prefix, desc)
        return [cut_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), params.stop)[0] for t in tokens]

    def generate_tokens(self, prompts: list[str], params: SamplingParams, prefix: str = "",
                        desc: str | None = None) -> list[list[int]]:
        """Generated token ids per prompt (EOS excluded unless ``params.include_eos``; may run past a
        stop string by a token)."""
        if not prompts:
            return []
        prefix_ids, queries = self._tokenize(prompts, prefix)
        return self.generate_ids(queries, params, prefix_ids, desc)

    def generate_ids(self, queries: list[list[int]], params: SamplingParams, prefix_ids: Sequence[int] = (),
                     desc: str | None = None) -> list[list[int]]:
        """:meth:`generate_tokens` for prompts given as token ids (a chat template's, say): every
        row continues ``prefix_ids + queries[i]``; the prefix is computed once and shared."""
        if not queries:
            return []
        if any(not q for q in queries):
            raise ValueError("every prompt needs at least one token of its own")
        prefix_ids = list(prefix_ids)
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i]))  # similar lengths batch together
        out: list[list[int] | None] = [None] * len(queries)
        bar = progress_bar(total=len(queries), desc=desc or "sampling", unit="prompt", disable=not self.progress)
        n_tokens, t_start = 0, time.perf_counter()
        with _threads(self.threads), torch.inference_mode(), _attention(self.model, ATTENTION_NAME), \
                _use_packed(self._packed()):
            shared = self._prefix(prefix_ids) if (self.prefix_cache and prefix_ids) else None
            rows_prefix = [] if shared is not None else prefix_ids
            for bi, s in enumerate(range(0, len(order), self.batch_size)):
                idx = order[s:s + self.batch_size]
                gen = torch.Generator(self.model.device).manual_seed((params.seed * 1_000_003 + bi) % 2**63)
                results = self._batch([rows_prefix + queries[i] for i in idx], shared, params, gen)
                for i, r in zip(idx, results):
                    out[i] = r
                n_tokens += sum(map(len, results))
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t_start):.1f}")
        bar.close()
        return out

    def next_token_logprobs(self, queries: list[list[int]], candidates: Sequence[int], prefix_ids: Sequence[int] = (),
                            desc: str | None = None) -> torch.Tensor:
        """Log-probabilities ``[n, len(candidates)]`` (under the full softmax) of the next token
        after ``prefix_ids + queries[i]``, for the given candidate token ids: what a model "answers"
        to a multiple-choice prompt. Rows are left padded behind the shared prefix; masks come from
        real positions, so padding changes nothing (tested against one row at a time)."""
        return self._score(queries, [[] for _ in queries], prefix_ids, desc or "scoring", candidates)

    def continuation_logprobs(self, queries: list[list[int]], continuations: list[list[int]],
                              prefix_ids: Sequence[int] = (), desc: str | None = None) -> list[list[float]]:
        """Per-token log-probabilities of ``continuations[i]`` after ``prefix_ids + queries[i]``
        (teacher forcing, temperature 1): the likelihood a model gives a written answer."""
        if len(queries) != len(continuations):
            raise ValueError(f"{len(queries)} prompts but {len(continuations)} continuations")
        return self._score(queries, continuations, prefix_ids, desc or "scoring", None)

    def _score(self, queries, continuations, prefix_ids, desc, candidates):
        if any(not q for q in queries):
            raise ValueError("every prompt needs at least one token of its own")
        prefix_ids = list(prefix_ids)
        rows = [list(q) + list(c) for q, c in zip(queries, continuations)]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list = [None] * len(rows)
        bar = progress_bar(total=len(rows), desc=desc, unit="seq", disable=not self.progress)
        with _threads(self.threads), torch.inference_mode(), _attention(self.model, ATTENTION_NAME), \
                _use_packed(self._packed()):
            shared = self._prefix(prefix_ids) if (self.prefix_cache and prefix_ids) else None
            rows_prefix = [] if shared is not None else prefix_ids
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                ids, kv = self._layout([rows_prefix + rows[i] for i in idx], shared, 0)
                keep = max(len(continuations[i]) for i in idx) + 1     # positions whose logits count
                width = ids.shape[1]
                if width > keep:
                    self._prefill(ids[:, :width - keep], kv)
                hidden = self._hidden(ids[:, width - keep:], kv, width - keep)   # [B, keep, H]
                for b, i in enumerate(idx):
                    n = len(continuations[i])
                    if candidates is not None:
                        out[i] = self._logprobs(hidden[b, -1:], None, candidates)[0]
                    else:
                        targets = torch.tensor(continuations[i], device=hidden.device)
                        out[i] = self._logprobs(hidden[b, keep - 1 - n:keep - 1], targets, None).tolist() if n else []
                bar.update(len(idx))
        bar.close()
        return torch.stack(out) if candidates is not None else out

    def _hidden(self, ids: torch.Tensor, kv: _KV, t0: int) -> torch.Tensor:
        """Run slots ``[t0, t0 + len)`` through the decoder; return its last hidden states."""
        kv.advance(t0, t0 + ids.shape[1])
        return self.model.base_model(input_ids=ids, position_ids=kv.pos[:, t0:kv.t1], use_cache=False,
                                     almost_kv=kv).last_hidden_state

    def _logprobs(self, hidden: torch.Tensor, targets: torch.Tensor | None, candidates) -> torch.Tensor:
        """Log-softmax of the model's output layer (final soft-cap included) at ``hidden`` ``[n, H]``,
        gathered at ``targets`` ``[n]`` or at the ``candidates`` ids ``[n, k]``."""
        from .sft import _softcap
        z = self.model.get_output_embeddings()(hidden).float()
        cap = _softcap(self.model)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        lp = torch.log_softmax(z, dim=-1)
        if targets is not None:
            return lp.gather(1, targets[:, None]).squeeze(1)
        return lp[:, torch.as_tensor(list(candidates), device=lp.device)]

    def clear_cache(self, weights: bool = True):
        """Forget the memoised prefix (and packed weights); they are rebuilt on the next call."""
        self._prefix_memo = None
        if weights:
            self._packed_memo = None

    # ---------------------------------------------------------------- internals
    def _tokenize(self, prompts: list[str], prefix: str):
        """Prefix with special tokens (gemma needs BOS), prompts without; joined as ids, never as
        text, so the cached prefix is exactly the start of every row (MODELS.md)."""
        tok = self.tokenizer
        if not prefix:
            queries = [tok(p).input_ids for p in prompts]
            if any(not q for q in queries):
                raise ValueError("an empty prompt with no prefix leaves nothing to condition on")
            return [], queries
        prefix_ids = tok(prefix).input_ids
        queries = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        if any(not q for q in queries):
            # A row needs one token of its own to predict from: lend it the prefix's last one.
            prefix_ids, queries = prefix_ids[:-1], [prefix_ids[-1:] + q for q in queries]
        return prefix_ids, queries

    def _packed(self) -> dict:
        """Packed weights for the current weights (re-packed after any change)."""
        if not self.pack_weights:
            return {}
        version = _weights_version(self.model)
        if self._packed_memo is None or self._packed_memo[0] != version:
            self._packed_memo = None
            self._packed_memo = (version, pack_linears(self.model))
        return self._packed_memo[1]

    def _prefix(self, ids: list[int]) -> _Prefix:
        """The shared prefix's keys/values, computed once and memoised (by ids and weights)."""
        version = _weights_version(self.model)
        if self._prefix_memo and self._prefix_memo[0] == ids and self._prefix_memo[1] == version:
            return self._prefix_memo[2]
        self._prefix_memo = None   # free the old one before building the next
        ids_t, kv = self._layout([ids], None, 0)
        self._prefill(ids_t, kv)
        prefix = _Prefix(ids, {l: k[0] for l, k in kv.keys.items()}, {l: v[0] for l, v in kv.values.items()})
        self._prefix_memo = (ids, version, prefix)
        return prefix

    def _forward(self, ids: torch.Tensor, kv: _KV, t0: int) -> torch.Tensor:
        """Run slots ``[t0, t0 + len)``; return the last position's logits ``[B, V]``."""
        t1 = t0 + ids.shape[1]
        kv.advance(t0, t1)
        out = self.model(input_ids=ids, position_ids=kv.pos[:, t0:t1], use_cache=False,
                         logits_to_keep=1, almost_kv=kv)
        return out.logits[:, -1]

    def _prefill(self, ids: torch.Tensor, kv: _KV) -> torch.Tensor:
        """Prefill in chunks: later chunks skip keys outside the causal window, and the
        attention scores of a chunk stay within ``PREFILL_BUDGET``."""
        b, n = ids.shape
        keys = n + (len(kv.prefix) if kv.prefix is not None else 0)
        chunk = max(16, min(PREFILL_CHUNK, PREFILL_BUDGET // (b * self.n_heads * keys)))
        for t0 in range(0, n, chunk):
            logits = self._forward(ids[:, t0:t0 + chunk], kv, t0)
        return logits

    def _layout(self, rows: list[list[int]], prefix: _Prefix | None, new_tokens: int):
        """Left-pad ``rows`` into ``[B, width]`` ids and a :class:`_KV` with room for ``new_tokens``."""
        b, width = len(rows), max(map(len, rows))
        slots = width + new_tokens
        device = self.model.device
        ids = torch.full((b, width), self.pad, dtype=torch.long)
        valid = torch.zeros(b, slots, dtype=torch.bool)
        pos = torch.arange(slots).repeat(b, 1) + (len(prefix) if prefix is not None else 0)
        for r, row in enumerate(rows):
            pad = width - len(row)
            ids[r, pad:] = torch.tensor(row)
            valid[r, pad:width] = True
            pos[r] -= pad                      # real tokens count positions from the prefix on
        return ids.to(device), _KV(prefix, pos.to(device), valid.to(device), self.model.dtype)

    def _batch(self, rows: list[list[int]], prefix: _Prefix | None, params: SamplingParams,
               gen: torch.Generator) -> list[list[int]]:
        """Generate for one batch of token rows (left padded behind the shared prefix).

        Identical rows (self-play samples N candidates per prompt) are prefilled once and their
        keys/values copied: a long dialogue history costs one prefill, not N."""
        first: dict[tuple, int] = {}
        copy_of = [first.setdefault(tuple(r), len(first)) for r in rows]
        ids, kv = self._layout([list(r) for r in first], prefix, params.max_new_tokens)
        width = ids.shape[1]
        logits = self._prefill(ids, kv)
        if len(first) < len(rows):
            copies = torch.tensor(copy_of, device=logits.device)
            kv.select(copies)
            logits = logits[copies]
        done = self._stopper(params)
        out: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))                  # batch row -> output row
        for t in range(params.max_new_tokens):
            nxt = sample(logits, params.temperature, params.top_p, gen)
            keep = [j for j, tok in enumerate(nxt.tolist()) if not done(out[active[j]], tok)]
            if not keep or t == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):                  # finished rows leave the batch
                rows_t = torch.tensor(keep, device=nxt.device)
                kv.select(rows_t)
                nxt = nxt[rows_t]
                active = [active[j] for j in keep]
            kv.valid[:, width + t] = True
            logits = self._forward(nxt[:, None], kv, width + t)
        return out

    def _stopper(self, params: SamplingParams):
        """``done(tokens, new)``: append ``new`` unless it is EOS; is the row finished?

        Stop strings are looked for in the decoded tail only: a stop string of n characters
        spans at most 4n tokens (byte-level tokens), plus one in case decoding the tail's
        first token drops a leading space."""
        eos = set() if params.ignore_eos else self.eos
        stops = [s for s in params.stop if s]
        tail = 4 * max(map(len, stops), default=0) + 2
        decode = self.tokenizer.decode

        def done(tokens: list[int], new: int) -> bool:
            if new in eos:
                if params.include_eos:
                    tokens.append(new)
                return True
            tokens.append(new)
            return bool(stops) and any(s in decode(tokens[-tail:], skip_special_tokens=True) for s in stops)
        return done
