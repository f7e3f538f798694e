"""Step 5: PPO of ALMoST-SFT against the Step-2 reward model - a compact, readable implementation.

The paper's authors used TRLX and did not release this step; trl's current releases no longer
ship a PPO trainer. This module is our own, written to be read next to the PPO papers
(Schulman et al. 2017; for language models Ziegler et al. 2019, Stiennon et al. 2020).

**Objects.** The *policy* is the SFT model (its adapter merged into the base) with a fresh LoRA
adapter, the only weights PPO trains besides a scalar *value head* on the policy's last hidden
state (shared backbone). The *reference* policy is the same model with the PPO adapter disabled:
no second copy. The *rollout engine* samples from a plain copy of the model whose LoRA-targeted
weights are refreshed to ``W0 + BA`` before every rollout, so sampling keeps the engine's speed.

**One PPO step** (:meth:`PPOTrainer.step`):

1. *Rollout.* ``rollout_batch`` prompts ``\\n\\nHuman: {query}\\n\\nAssistant:`` of the ``ppo``
   split (fresh queries, seeded order), one response each at ``temperature`` (no top-p, so that
   log-probs of the full distribution are the sampling distribution). A response ends at EOS
   (kept: ending the turn is an action too) or at ``max_new_tokens``.
2. *Score.* The RM reads the decoded response (its own tokenizer), cut at a speaker turn. A
   response that never ended gets ``no_eos_penalty``. Scores are divided by their running
   standard deviation (``normalize_reward``).
3. *Rewards per token.* ``r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))`` (the k1 KL
   estimator), plus the score at the last token.
4. *Advantages.* GAE with ``gamma``, ``lam`` over the response tokens, whitened over the batch;
   returns = advantages + old values.
5. *Update.* ``ppo_epochs`` passes over shuffled minibatches: the clipped policy loss, the clipped
   value loss times ``vf_coef``, gradient clipping, AdamW on the LoRA weights and value head.
6. *Control.* An adaptive KL coefficient when ``kl_target`` is set (Ziegler et al.); NaN anywhere
   or a batch KL over ``kl_limit`` stops the run with a message.

Log-probs are always those of ``softmax(logits / temperature)``: the distribution the engine
sampled from. Dropout is off (the adapter's and the model's: eval mode), so two passes over the
same tokens give the same numbers.

**Outputs** (``results/<run>/ppo/``): ``log.jsonl`` (one row of statistics per step),
``checkpoint/`` (adapter, value head, optimizer, controller, RNG, step: every ``save_steps``,
renamed into place), ``adapter/`` (the final PPO adapter + ``policy.json``), ``manifest.json``.

**Several processes** (``accelerate launch``): each process rolls out and trains on its share
of the prompts; gradients are averaged by DDP and statistics reduced across processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import ConfigError, PPOConfig, RunConfig

STAGE = "ppo"
META_FILE = "policy.json"
VALUE_HEAD_FILE = "value_head.pt"


class PPOStopped(RuntimeError):
    """PPO stopped itself: a NaN or a KL past ``ppo.kl_limit``; the message says which and where."""


# =========================================================================== the arithmetic
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over all, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  sum_fn: Callable[[list[float]], list[float]] | None = None) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (the mean added back when ``shift_mean`` is
    False); padding stays 0. The variance is the unbiased one. ``sum_fn`` sums the three moments
    over processes (several processes whiten with the statistics of all their tokens)."""
    s, ss, n = [float(v) for v in ((x * mask).sum(), (x ** 2 * mask).sum(), mask.sum())]
    if sum_fn is not None:
        s, ss, n = sum_fn([s, ss, n])
    mean = s / n
    var = max(ss / n - mean ** 2, 0.0) * n / max(n - 1, 1)
    out = (x - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)`` per response token ``[B, T]``: ``-kl_coef * kl`` everywhere, plus
    ``score`` at each row's last real token; ``kl = logp - ref_logp`` (k1) at real tokens."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last.clamp(min=0)] += score * (last >= 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows: ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 after a row's last token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns are ``A + V``.
    """
    b, t_len = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(t_len)):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < t_len else 0)) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, values, old_values, advantages, returns, mask, clip_range: float,
               value_clip: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The clipped surrogate policy loss and the clipped value loss (means over real tokens)::

        ratio = exp(logp - old_logp)
        pg_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        v_clip  = old_V + clip(V - old_V, -eps_v, eps_v)
        vf_loss = 0.5 * mean(max((V - R)^2, (v_clip - R)^2))

    plus statistics: the fraction of tokens whose ratio was clipped and the approximate KL
    between the old and the new policy, ``0.5 * mean((logp - old_logp)^2)``.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    vf_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((pg2 > pg1).float(), mask)),
                 "approx_kl": float(0.5 * masked_mean(log_ratio ** 2, mask)),
                 "value_clipfrac": float(masked_mean(((values - returns) ** 2 < (v_clipped - returns) ** 2).float(),
                                                     mask))}
    return pg_loss, vf_loss, stats


class AdaptiveKL:
    """Ziegler et al.'s controller: ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``
    after each batch of ``n`` sequences; with ``target=None`` the coefficient stays fixed."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + err * n / self.horizon


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: Sequence[float]) -> None:
        xs = [float(x) for x in xs]
        n = len(xs)
        if n == 0:
            return
        m = sum(xs) / n
        v = sum((x - m) ** 2 for x in xs) / n
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total if self.count else v
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1)) if self.count > 1 else 1.0


# =========================================================================== the model
class PolicyValue(torch.nn.Module):
    """A causal LM with a LoRA adapter (peft) and a scalar value head on its last hidden state.

    :meth:`forward` returns, at response positions only, the log-probs of the given tokens at
    ``temperature``, the entropy of that distribution and the values; the output layer runs at
    those positions only (gemma's 262k-token vocabulary makes it most of the cost).
    """

    def __init__(self, peft_model, temperature: float):
        super().__init__()
        self.peft = peft_model
        lm = peft_model.get_base_model()
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=lm.device)
        torch.nn.init.zeros_(self.value_head.weight)          # V = 0 at the start: advantages = rewards-to-go
        torch.nn.init.zeros_(self.value_head.bias)
        self.temperature = temperature

    @property
    def lm(self):
        return self.peft.get_base_model()

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, prompt_lens: torch.Tensor, resp_mask: torch.Tensor,
                with_values: bool = True):
        """``(logp, entropy, values)`` each ``[B, T]`` for the response tokens; ``ids`` holds
        right-padded ``prompt + response`` rows, ``resp_mask`` ``[B, T]`` marks real response tokens."""
        from .sft import _softcap
        lm = self.lm
        hidden = lm.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        b, t_len = resp_mask.shape
        steps = torch.arange(t_len, device=ids.device)
        pos = (prompt_lens[:, None] - 1 + steps[None, :]).clamp(max=ids.shape[1] - 2)   # predicts response token t
        h = hidden[torch.arange(b, device=ids.device)[:, None], pos]                      # [B, T, H]
        targets = ids[torch.arange(b, device=ids.device)[:, None], pos + 1]
        z = lm.get_output_embeddings()(h).float()
        cap = _softcap(lm)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        logprobs = torch.log_softmax(z / self.temperature, dim=-1)
        logp = logprobs.gather(-1, targets[..., None]).squeeze(-1) * resp_mask
        entropy = -(logprobs.exp() * logprobs).sum(-1) * resp_mask
        values = self.value_head(h.float()).squeeze(-1) * resp_mask if with_values else None
        return logp, entropy, values


def lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """``{module name in the plain model: peft LoRA layer}`` of every adapted linear layer."""
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


class RolloutWeights:
    """Keeps a plain copy of the model in step with the trained adapter: before a rollout, every
    adapted weight of the copy becomes ``W0 + delta`` (peft's ``get_delta_weight``), computed from
    the original weights, so no rounding accumulates over steps."""

    def __init__(self, plain, peft_model):
        self.plain, self.peft = plain, peft_model
        self.targets = {name: dict(plain.named_modules())[name] for name in lora_modules(peft_model)}
        self.original = {name: m.weight.detach().clone() for name, m in self.targets.items()}

    @torch.no_grad()
    def sync(self) -> None:
        layers = lora_modules(self.peft)
        for name, target in self.targets.items():
            delta = layers[name].get_delta_weight("default").to(target.weight.dtype)
            target.weight.copy_(self.original[name] + delta)


# =========================================================================== batches
def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad: int, device) -> dict:
    """Right-padded ``prompt + response`` ids with masks (each response has at least one token)."""
    b = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    t_len = max(len(r) for r in responses)
    ids = torch.full((b, width), pad, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp_mask = torch.zeros((b, t_len), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        resp_mask[i, :len(r)] = 1
    return {"ids": ids.to(device), "attn": attn.to(device), "resp_mask": resp_mask.to(device),
            "prompt_lens": torch.tensor([len(p) for p in prompts], device=device)}


def step_queries(queries: list[dict], step: int, batch: int, seed: int) -> list[dict]:
    """The prompts of PPO step ``step``: consecutive slices of a seeded shuffle of the split, a
    fresh shuffle per pass; a function of (step, seed) only, so a resumed run sees the same order."""
    n = len(queries)
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(k, n)
        order = list(range(n))
        random.Random(f"{seed}|ppo|{epoch}").shuffle(order)
        out.append(queries[order[i]])
    return out


# =========================================================================== the trainer
class PPOTrainer:
    """PPO over one policy, one scorer and one engine; see the module docstring for a step.

    ``reward_fn(queries, texts) -> list[float]`` gives the score of each decoded response (the RM
    in the stage; a programmatic reward in tests). ``accelerator`` (accelerate) spreads the work
    over processes; without one everything runs in this process.
    """

    def __init__(self, p: PPOConfig, policy: PolicyValue, tokenizer, engine, rollout_weights: RolloutWeights | None,
                 reward_fn: Callable[[list[str], list[str]], list[float]], seed: int, accelerator=None):
        self.p, self.policy, self.tok, self.engine = p, policy, tokenizer, engine
        self.rollout_weights, self.reward_fn, self.seed = rollout_weights, reward_fn, seed
        self.acc = accelerator
        params = [q for q in policy.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=p.learning_rate, weight_decay=0.0)
        self.model = policy
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(policy, self.optimizer)
        self.kl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
        self.moments = RunningMoments()
        self.step_count = 0
        self.device = next(policy.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = set(getattr(engine, "eos", set())) | {tokenizer.eos_token_id}

    # ---------------------------------------------------------------- processes
    @property
    def world(self) -> int:
        return self.acc.num_processes if self.acc is not None else 1

    @property
    def rank(self) -> int:
        return self.acc.process_index if self.acc is not None else 0

    def _sum(self, values: list[float]) -> list[float]:
        """Sum per-process numbers over every process."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.acc is not None and self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.tolist()

    # ---------------------------------------------------------------- one step
    def rollout(self, queries: list[str]) -> dict:
        """Sample one response per query through the engine, with the current adapter's weights."""
        from .dialogue import STOP_STRINGS
        from .sampling import SamplingParams, cut_at_stop
        from .sft import prompt_piece
        if self.rollout_weights is not None:
            self.rollout_weights.sync()
        prompts = [prompt_piece(q) for q in queries]
        params = SamplingParams(max_new_tokens=self.p.max_new_tokens, temperature=self.p.temperature, top_p=1.0,
                                seed=(self.seed * 1_000_003 + self.step_count * 101 + self.rank) % 2**63,
                                include_eos=True)
        responses = self.engine.generate_tokens(prompts, params, desc=f"ppo step {self.step_count + 1} rollout")
        responses = [r if r else [self.tok.eos_token_id] for r in responses]   # never an empty action sequence
        ended = [bool(r) and r[-1] in self.eos for r in responses]
        texts = [cut_at_stop(self.tok.decode(r, skip_special_tokens=True), STOP_STRINGS)[0].strip() for r in responses]
        return {"prompts": [self.tok(p).input_ids for p in prompts], "responses": responses, "ended": ended,
                "texts": texts}

    @torch.no_grad()
    def _score_tokens(self, batch: dict, reference: bool) -> tuple[torch.Tensor, ...]:
        """Log-probs (and values, entropy) of a batch, in chunks; ``reference`` disables the adapter."""
        model = self.policy
        outs = []
        for s in range(0, batch["ids"].shape[0], self.p.logprob_batch):
            part = {k: v[s:s + self.p.logprob_batch] for k, v in batch.items()}
            if reference:
                with model.peft.disable_adapter():
                    outs.append(model(part["ids"], part["attn"], part["prompt_lens"], part["resp_mask"],
                                      with_values=False)[:2])
            else:
                outs.append(model(part["ids"], part["attn"], part["prompt_lens"], part["resp_mask"]))
        t_len = batch["resp_mask"].shape[1]
        cat = lambda i: torch.cat([torch.nn.functional.pad(o[i], (0, t_len - o[i].shape[1])) for o in outs])  # noqa: E731
        return tuple(cat(i) for i in range(len(outs[0])))

    def step(self, queries: list[dict]) -> dict:
        """One PPO step on this process's share of ``queries`` (all processes pass the same list)."""
        p = self.p
        mine = queries[self.rank::self.world]
        t0 = time.perf_counter()
        roll = self.rollout([q["query"] for q in mine])
        t1 = time.perf_counter()
        raw = [float(s) for s in self.reward_fn([q["query"] for q in mine], roll["texts"])]
        t2 = time.perf_counter()

        # scores: the RM's plus the no-EOS penalty, normalised by the running std over all processes
        scores = [s + (0.0 if e else p.no_eos_penalty) for s, e in zip(raw, roll["ended"])]
        gathered = self._gather_floats(scores)
        self.moments.update(gathered)
        scale = self.moments.std if p.normalize_reward and self.moments.std > 1e-6 else 1.0   # all equal so far: no scale
        score_t = torch.tensor([s / scale for s in scores], device=self.device)

        batch = pad_batch(roll["prompts"], roll["responses"], self.pad, self.device)
        mask = batch["resp_mask"]
        self.policy.eval()                                     # dropout off in every pass
        old_logp, _, old_values = self._score_tokens(batch, reference=False)
        ref_logp, _ = self._score_tokens(batch, reference=True)
        rewards, kl = token_rewards(score_t, old_logp, ref_logp, mask, self.kl.value)
        adv, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask, sum_fn=self._sum)

        stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [],
                                         "value_clipfrac": [], "entropy": []}
        n = len(mine)
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.step_count)
        for _ in range(p.ppo_epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, p.minibatch):
                idx = torch.tensor(order[s:s + p.minibatch], device=self.device)
                part = {k: v[idx] for k, v in batch.items()}
                logp, entropy, values = self.model(part["ids"], part["attn"], part["prompt_lens"], part["resp_mask"])
                pg_loss, vf_loss, st = ppo_losses(logp, old_logp[idx], values, old_values[idx], adv[idx],
                                                  returns[idx], part["resp_mask"], p.clip_range, p.value_clip)
                loss = pg_loss + p.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise PPOStopped(f"ppo: the loss became {float(loss)} at step {self.step_count + 1}; "
                                     "stopped (lower ppo.learning_rate, or check the rewards in log.jsonl)")
                self.optimizer.zero_grad()
                if self.acc is not None:
                    self.acc.backward(loss)
                    self.acc.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                self.optimizer.step()
                for k, v in st.items():
                    stats[k].append(v)
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["vf_loss"].append(float(vf_loss.detach()))
                stats["entropy"].append(float(masked_mean(entropy.detach(), part["resp_mask"])))
        t3 = time.perf_counter()

        # statistics over every process: sums and counts, then ratios
        seq_kl = kl.sum(1)
        sums = self._sum([float(sum(raw)), float(seq_kl.sum()), float(mask.sum()), float(sum(roll["ended"])),
                          float(sum(len(t) for t in roll["texts"])), float(score_t.sum()),
                          float((score_t - self.kl.value * seq_kl).sum()), float(n),
                          *[sum(v) / max(len(v), 1) for v in stats.values()]])
        total = sums[7]
        row = {"step": self.step_count + 1, "rm_score": sums[0] / total, "kl": sums[1] / total,
               "kl_coef": self.kl.value, "response_tokens": sums[2] / total, "ended": sums[3] / total,
               "response_chars": sums[4] / total, "score_normalised": sums[5] / total,
               "reward_total": sums[6] / total, "score_std": scale,
               **{k: v / self.world for k, v in zip(stats, sums[8:])},
               "rollout_s": round(t1 - t0, 3), "scoring_s": round(t2 - t1, 3), "update_s": round(t3 - t2, 3)}
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            raise PPOStopped(f"ppo: a statistic is not finite at step {row['step']}: {row}")
        if row["kl"] > p.kl_limit:
            raise PPOStopped(f"ppo: the mean KL to the reference reached {row['kl']:.2f} nats per response at step "
                             f"{row['step']}, past ppo.kl_limit = {p.kl_limit}: the policy is running away from "
                             "SFT; stopped (raise ppo.kl_coef or set ppo.kl_target, or lower ppo.learning_rate)")
        self.kl.update(row["kl"], int(total))
        self.step_count += 1
        row["examples"] = [{"query": q["query"], "response": t, "score": s}
                           for q, t, s in list(zip(mine, roll["texts"], raw))[:2]] if self.rank == 0 else []
        return row

    def _gather_floats(self, xs: list[float]) -> list[float]:
        if self.acc is None or self.world == 1:
            return list(xs)
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        return self.acc.gather(t).tolist()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        trainable = {k: v.detach().cpu() for k, v in self.policy.named_parameters() if v.requires_grad}
        return {"step": self.step_count, "trainable": trainable, "optimizer": self.optimizer.state_dict(),
                "kl_coef": self.kl.value, "moments": vars(self.moments).copy(),
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        own = dict(self.policy.named_parameters())
        with torch.no_grad():
            for k, v in state["trainable"].items():
                own[k].copy_(v.to(own[k].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.kl.value = state["step"], state["kl_coef"]
        vars(self.moments).update(state["moments"])
        torch.set_rng_state(state["torch_rng"])


def save_checkpoint(trainer: PPOTrainer, folder: Path, log: list[dict]) -> None:
    """``folder`` holds the newest complete checkpoint: written beside it, then renamed over it."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainer.state_dict(), tmp / "state.pt")
    (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer: PPOTrainer, folder: Path) -> list[dict]:
    """Restore the trainer from ``folder``; returns the step log up to that checkpoint."""
    state = torch.load(folder / "state.pt", weights_only=False)
    trainer.load_state_dict(state)
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


# =========================================================================== the stage
def _ppo_cfg(cfg: RunConfig) -> PPOConfig:
    if cfg.ppo is None:
        raise ConfigError("ppo: this recipe has no ppo section")
    return cfg.ppo


def check_inputs(cfg: RunConfig, need_rm_weights: bool = True) -> tuple[list[dict], Path]:
    """The rollout queries and the RM folder, checked before any model loads."""
    from .queries import load_split
    from .rmsp import reward_model_folder
    from .fingerprint import stage_status
    from .sft import ADAPTER_DIR
    from .sft import META_FILE as SFT_META
    p = _ppo_cfg(cfg)
    if stage_status(cfg, p.start_from) != "done" or not (cfg.run_dir / p.start_from / ADAPTER_DIR / SFT_META).is_file():
        raise ConfigError(f"ppo.start_from: the SFT policy {cfg.run_dir / p.start_from / ADAPTER_DIR} is missing or "
                          f"unfinished: train it first (notebook 04, or python -m almost_utils.cli {p.start_from})")
    rm_folder = reward_model_folder(cfg, need_rm_weights)
    queries = load_split(cfg, p.split)
    if len(queries) < 1:
        raise ConfigError(f"ppo.split: the {p.split} split in {cfg.run_dir / 'splits'} is empty")
    return queries, rm_folder


def build_policy(cfg: RunConfig, start: Path, device: str | None = None):
    """``(PolicyValue, plain rollout model, tokenizer)``: the SFT policy merged into its base twice:
    one copy gets the PPO LoRA adapter and value head, the other samples."""
    from peft import get_peft_model
    from .reward import _quiet_deprecations, decoder_layers, lora_config
    from .sft import load_policy
    p = _ppo_cfg(cfg)
    trained = load_policy(start, progress=False, device=device or cfg.device)
    plain = load_policy(start, progress=False, device=device or cfg.device)
    torch.manual_seed(cfg.seed)                                    # the adapter's initial weights
    lm = trained.model
    with _quiet_deprecations():
        peft_model = get_peft_model(lm, lora_config(p, decoder_layers(lm), task="CAUSAL_LM", where="ppo",
                                                    modules_to_save=None))
    policy = PolicyValue(peft_model, p.temperature)
    policy.eval()
    return policy, plain.model.eval(), trained.tokenizer


def rm_reward(scorer) -> Callable[[list[str], list[str]], list[float]]:
    """The Step-2 RM as a reward: each response scored after its query (empty text: the RM's
    score of an empty answer is not defined, so 0 and the no-EOS rule decide)."""
    def reward(queries: list[str], texts: list[str]) -> list[float]:
        idx = [i for i, t in enumerate(texts) if t]
        got = scorer.score([[("Human", queries[i])] for i in idx], [texts[i] for i in idx], progress=False) if idx else []
        out = [0.0] * len(texts)
        for i, s in zip(idx, got):
            out[i] = float(s)
        return out
    return reward


def run_ppo_stage(cfg: RunConfig, progress: bool = True, reward_fn=None, accelerator=None) -> list[dict]:
    """Run (or resume, or reuse) Step 5; returns the step log (rows of ``log.jsonl``).

    ``reward_fn`` replaces the RM (tests). Under ``accelerate launch`` pass the
    ``Accelerator``; only the main process writes.
    """
    from .artifacts import Manifest, read_jsonl, write_jsonl
    from .fingerprint import begin_stage, stage_fingerprint, stage_status
    from .progress import bar, say
    from .sampling import TransformersEngine
    p = _ppo_cfg(cfg)
    out = cfg.run_dir / STAGE
    main = accelerator is None or accelerator.is_main_process
    if stage_status(cfg, STAGE) == "done":
        rows = read_jsonl(out / "log.jsonl")
        say(f"ppo: reusing {len(rows)} PPO steps of {cfg.run_dir} (recipe unchanged)")
        return rows
    queries, rm_folder = check_inputs(cfg, need_rm_weights=reward_fn is None)
    if main:
        _, fp = begin_stage(cfg, STAGE)              # claims the folder before the first unit is written
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        fp = stage_fingerprint(cfg, STAGE)
    seed = p.seed if p.seed is not None else cfg.seed
    device = str(accelerator.device) if accelerator is not None else None
    t_load = time.perf_counter()
    policy, plain, tok = build_policy(cfg, cfg.run_dir / p.start_from, device)
    if reward_fn is None:
        from .reward import load_reward_model
        reward_fn = rm_reward(load_reward_model(rm_folder, device or cfg.device, cfg.reward_model.score_batch_size))
    engine = TransformersEngine(plain, tok, batch_size=cfg.sampling.batch_size, progress=False)
    trainer = PPOTrainer(p, policy, tok, engine, RolloutWeights(plain, policy.peft), reward_fn, seed, accelerator)
    load_s = time.perf_counter() - t_load
    ckpt = out / "checkpoint"
    log: list[dict] = []
    if (ckpt / "state.pt").is_file():
        log = load_checkpoint(trainer, ckpt)
        say(f"ppo: resuming at step {trainer.step_count + 1} of {p.steps} from {ckpt}")
    steps_bar = bar(total=p.steps, initial=trainer.step_count, desc="ppo steps", unit="step",
                    disable=not (progress and main))
    with (Manifest(cfg, STAGE, fp) if main else contextlib.nullcontext()) as man:
        while trainer.step_count < p.steps:
            row = trainer.step(step_queries(queries, trainer.step_count, p.rollout_batch, seed))
            log.append(row)
            steps_bar.update(1)
            steps_bar.set_postfix(rm=f"{row['rm_score']:+.3f}", kl=f"{row['kl']:.3f}")
            if main:
                write_jsonl(out / "log.jsonl", log)
                if trainer.step_count % p.save_steps == 0 or trainer.step_count == p.steps:
                    save_checkpoint(trainer, ckpt, log)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        steps_bar.close()
        if main:
            save_ppo_adapter(trainer, out / "adapter", cfg, log)
            man.set_time("loading", load_s)
            for k in ("rollout_s", "scoring_s", "update_s"):
                man.set_time(f"{k[:-2]}_all_steps", sum(r[k] for r in log))
            man.count("steps", len(log))
            man.count("world_size", trainer.world)
            man.count("first_step", {k: log[0][k] for k in ("rm_score", "kl", "response_tokens", "ended")})
            man.count("last_step", {k: log[-1][k] for k in ("rm_score", "kl", "response_tokens", "ended")})
            man.note("reward", "RM score (+ ppo.no_eos_penalty if no EOS) / running std, minus kl_coef x k1 KL per token")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return log


def save_ppo_adapter(trainer: PPOTrainer, folder: Path, cfg: RunConfig, log: list[dict]) -> Path:
    """The PPO LoRA adapter, the value head and ``policy.json``, renamed into place when complete."""
    from .artifacts import write_json
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.policy.peft.save_pretrained(tmp)
    torch.save(trainer.policy.value_head.state_dict(), tmp / VALUE_HEAD_FILE)
    write_json(tmp / META_FILE, {"start_from": cfg.ppo.start_from, "seed": cfg.seed, "ppo_config": asdict(cfg.ppo),
                                 "steps": len(log), "final_kl_coef": trainer.kl.value})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_ppo_policy(run_dir: str | Path, device: str = "auto", progress: bool = True):
    """ALMoST-PPO as a :class:`~almost_utils.sft.Policy`: the SFT policy it started from with the
    PPO adapter merged in (plain weights, so the engine samples at full speed)."""
    from peft import PeftModel
    from .artifacts import read_json
    from .reward import _quiet_deprecations
    from .sft import Policy, load_policy
    folder = Path(run_dir) / STAGE / "adapter"
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"no trained PPO policy in {folder}; run the ppo stage first")
    meta = read_json(folder / META_FILE)
    base = load_policy(Path(run_dir) / meta["start_from"], device=device, progress=progress)
    with _quiet_deprecations():
        model = PeftModel.from_pretrained(base.model, folder, is_trainable=False).merge_and_unload()
    return Policy(model.eval(), base.tokenizer, name="ppo", batch_size=base.batch_size, progress=progress, meta=meta)
