#!/usr/bin/env python
"""GPU smoke test: the `tiny` recipe on CUDA, with 4-bit loading, sampling, QLoRA RM and SFT steps, self-play.

Run it through ``scripts/gpu_smoke.sh`` (which adds a 5-minute timeout); CPU CI never runs it.
Works offline: no model hub, no pip. It needs only these installed packages:

    torch (a CUDA build), transformers, tokenizers, accelerate, peft, bitsandbytes, pyyaml, tqdm
    (+ trl and datasets for the optional almost_utils.reward check)

Checks, each timed with its peak GPU memory; any failure makes the exit status 1:

1. environment   - CUDA visible, bitsandbytes imports
2. tokenizer     - the packaged gemma-3 tokenizer when it is already converted
                   (data/models/gemma-3-270m), else a small BPE tokenizer trained here on the
                   repository's demonstrations (so nothing needs downloading)
3. recipe        - data/configs/tiny.yaml with device: cuda; prints its memory estimate
4. bf16 sampling - the transformers engine (load_engine) on CUDA: few-shot prefix, stop strings,
                   same seed -> same texts, greedy is deterministic
5. 4-bit load    - the tiny model saved to a folder and reloaded in NF4 (double quant, bf16
                   compute) through almost_utils.models.load_model
6. 4-bit sampling
7. QLoRA RM      - sequence-classification head on the 4-bit backbone, LoRA adapters, gradient
                   checkpointing, a few Bradley-Terry steps on toy pairs
8. reward module - almost_utils.reward.train_reward_model (trl RewardTrainer) for a few steps on
                   toy pairs in 4-bit, then the saved RM reloaded and scored (skipped if absent)
9. self-play turn - Step 3's unit: N candidates per dialogue through the 4-bit engine, scored by
                   that RM, the argmax kept, the user agent's reply
10. QLoRA SFT    - Step 4's trainer (assistant-only loss, masked output layer) for a few steps on
                   the 4-bit model; the adapter reloads and scores an answer
11. PPO steps    - Step 5's trainer for two steps from that adapter (merged into bf16 weights: PPO
                   trains its LoRA on the merged policy, not in 4-bit), rewarded by that RM
12. evaluation   - Step 6: that SFT policy as HHH judge (both orders) and by likelihood on
                   hand-made pairs, and its answers scored by that RM

Usage: python scripts/gpu_smoke.py [--device cuda|cpu] [--tokenizer auto|builtin|PATH] [--keep DIR]
(``--device cpu`` runs what CPUs can, skipping 4-bit steps: a check of this script itself.)
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Skip(Exception):
    """A check that cannot run here (reported, not a failure)."""


class Smoke:
    def __init__(self, device: str):
        self.device = device
        self.results: list[dict] = []

    def _cuda(self):
        import torch
        return self.device == "cuda" and torch.cuda.is_available()

    def run(self, name: str, fn, *args, **kwargs):
        import torch
        if self._cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        status, out, detail = "ok", None, ""
        print(f"\n=== {name}", flush=True)
        try:
            out = fn(*args, **kwargs)
        except Skip as e:
            status, detail = "skipped", str(e)
        except Exception as e:   # noqa: BLE001 - report every failure, keep checking
            status, detail = "FAILED", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if self._cuda():
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if self._cuda() else 0.0
        self.results.append({"check": name, "status": status, "seconds": round(secs, 2),
                             "peak_mib": round(peak, 1), "detail": detail})
        print(f"--- {name}: {status} in {secs:.1f}s, peak GPU memory {peak:.0f} MiB"
              + (f" ({detail})" if detail else ""), flush=True)
        return out

    def summary(self) -> int:
        print("\n" + "=" * 78)
        print(f"{'check':<18} {'status':<8} {'seconds':>8} {'peak MiB':>9}  detail")
        for r in self.results:
            print(f"{r['check']:<18} {r['status']:<8} {r['seconds']:>8.1f} {r['peak_mib']:>9.0f}  {r['detail'][:120]}")
        failed = [r["check"] for r in self.results if r["status"] == "FAILED"]
        total = sum(r["seconds"] for r in self.results)
        print(f"total {total:.1f}s; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
        return 1 if failed else 0


# --------------------------------------------------------------------------- checks
def check_environment(device: str) -> dict:
    import torch
    import transformers
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available()}
    for mod in ("peft", "accelerate", "bitsandbytes", "trl", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:   # noqa: BLE001 - optional packages
            info[mod] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    print(json.dumps(info, indent=1))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (is this a CUDA build of torch?)")
        if info["bitsandbytes"].startswith("missing"):
            raise RuntimeError("bitsandbytes is not installed: pip install 'almost-utils[gpu]'")
    return info


def build_tokenizer(out_dir: Path, choice: str) -> Path:
    """A tokenizer folder: the converted gemma one, a given path, or one trained here."""
    from almost_utils.models import cache_dir
    if choice not in ("auto", "builtin"):
        return Path(choice)
    gemma = cache_dir() / "gemma-3-270m"
    if choice == "auto" and (gemma / "tokenizer.json").is_file():
        print(f"using the converted gemma-3 tokenizer at {gemma}")
        return gemma
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    texts = []
    for p in sorted((ROOT / "data").rglob("*.txt")):
        texts.extend(p.read_text().splitlines())
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    bos = tk.token_to_id("<bos>")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    with_bos, without = tok("Human: hi").input_ids, tok("Human: hi", add_special_tokens=False).input_ids
    if with_bos[0] != tok.bos_token_id or without[0] == tok.bos_token_id:
        raise RuntimeError(f"built tokenizer: BOS handling is off ({with_bos} / {without})")
    if tok.decode(without) != "Human: hi":
        raise RuntimeError(f"built tokenizer does not round-trip: {tok.decode(without)!r}")
    print(f"trained a {len(tok)}-token BPE tokenizer into {out_dir}")
    return out_dir


def load_recipe(tok_dir: Path, work: Path, device: str):
    from almost_utils.config import load_config
    from almost_utils.memory import format_memory_table
    overrides = {"device": device, "output_dir": str(work / "run"), "run_name": "gpu_smoke",
                 "models.large.source": f"tiny:{tok_dir}", "models.small.source": f"tiny:{tok_dir}",
                 "reward_model.ablation_no_heuristic_filter": False,
                 "reward_model.bootstrap_samples": 50}
    cfg = load_config(ROOT / "data" / "configs" / "tiny.yaml", overrides)
    print(format_memory_table(cfg))
    return cfg


def _prompts():
    from almost_utils.dialogue import open_turn
    seeds = [ln.strip() for ln in (ROOT / "data" / "seed_queries.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return seeds, [open_turn([("Human", q)]) for q in seeds[:12]]


def check_sampling(cfg, model_key: str = "large") -> dict:
    import torch
    from almost_utils.dialogue import STOP_STRINGS, few_shot_prefix, load_dialogues
    from almost_utils.engines import load_engine
    from almost_utils.sampling import SamplingParams
    c = cfg.comparisons
    prefix = few_shot_prefix(cfg.path(c.preamble).read_text(), load_dialogues(cfg.path(c.demonstrations["hhh"])), 2)
    _, prompts = _prompts()
    t0 = time.perf_counter()
    engine = load_engine(cfg, model_key, progress=False)
    model = engine.model
    dev = next(model.parameters()).device
    print(f"engine loaded in {time.perf_counter() - t0:.1f}s on {dev}, dtype {next(model.parameters()).dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    if cfg.device == "cuda" and dev.type != "cuda":
        raise RuntimeError(f"model is on {dev}, expected cuda")
    params = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.9, stop=STOP_STRINGS, seed=7)
    t0 = time.perf_counter()
    a = engine.generate(prompts, params, prefix=prefix)
    secs = time.perf_counter() - t0
    b = engine.generate(prompts, params, prefix=prefix)
    g1 = engine.generate(prompts[:4], SamplingParams(max_new_tokens=16, temperature=0.0), prefix=prefix)
    g2 = engine.generate(prompts[:4], SamplingParams(max_new_tokens=16, temperature=0.0), prefix=prefix)
    nostop = engine.generate(prompts[:4], SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    if len(a) != len(prompts) or not all(isinstance(t, str) for t in a + nostop):
        raise RuntimeError("generate must return one string per prompt")
    if any(s in t for t in a for s in STOP_STRINGS):
        raise RuntimeError("a stop string survived in the output")
    if a != b:
        raise RuntimeError("same seed, different texts")
    if g1 != g2:
        raise RuntimeError("greedy decoding is not deterministic")
    n_tok = sum(len(engine.tokenizer(t, add_special_tokens=False).input_ids) for t in a)
    print(f"{len(prompts)} prompts, {n_tok} tokens in {secs:.2f}s ({n_tok / secs:.0f} tok/s); sample: {a[0][:80]!r}")
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"texts": a}


def save_tiny(cfg, out: Path) -> Path:
    """The tiny random model written as a plain folder (4-bit loading goes through from_pretrained)."""
    from almost_utils.models import load_model
    model, tok = load_model(cfg.models["large"], "cpu", seed=cfg.seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}")
    return out


def folder_recipe(cfg, model_dir: Path, load_in_4bit: bool = True):
    """The recipe with its `large` model read from ``model_dir`` (in 4-bit by default)."""
    from almost_utils.config import load_config
    return load_config(ROOT / "data" / "configs" / "tiny.yaml", {
        "device": cfg.device, "output_dir": cfg.output_dir, "run_name": cfg.run_name,
        "models.large": {"source": str(model_dir), "load_in_4bit": load_in_4bit},
        "models.small.source": cfg.models["small"].source,
        "reward_model.ablation_no_heuristic_filter": False, "reward_model.bootstrap_samples": 50,
        "reward_model.gradient_checkpointing": True})


def check_4bit_load(cfg4) -> None:
    import torch
    if cfg4.device != "cuda" or not torch.cuda.is_available():
        raise Skip("4-bit loading needs CUDA")
    import bitsandbytes as bnb
    from almost_utils.models import load_model
    model, _ = load_model(cfg4.models["large"], "cuda", seed=cfg4.seed)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    print(f"{n4} Linear4bit layers; footprint {model.get_memory_footprint() / 2**20:.1f} MiB; "
          f"quant type {qc.get('bnb_4bit_quant_type')}, double quant {qc.get('bnb_4bit_use_double_quant')}, "
          f"compute {qc.get('bnb_4bit_compute_dtype')}")
    if n4 == 0:
        raise RuntimeError("no Linear4bit layer: the model was not quantized")
    if qc.get("bnb_4bit_quant_type") != "nf4" or not qc.get("bnb_4bit_use_double_quant"):
        raise RuntimeError(f"expected NF4 with double quantisation, got {qc}")
    del model
    torch.cuda.empty_cache()


def toy_pairs(n: int = 32) -> list[dict]:
    """Pairs with a learnable signal: a careful answer beats a curt one."""
    seeds, _ = _prompts()
    out = []
    for i, q in enumerate(seeds[:n]):
        out.append({"query_id": i, "prompt": q,
                    "chosen": "Sure. Here is a careful, step by step answer with the details you asked for.",
                    "rejected": "No idea.",
                    "chosen_config": "large-faithful-3shot", "rejected_config": "small-hhh-1shot"})
    return out


def check_qlora_steps(cfg4, steps: int = 12) -> dict:
    """Bradley-Terry steps with LoRA on the 4-bit backbone (what Step 2 does on CUDA).

    With a CPU recipe (``--device cpu``) the same steps run on the unquantized tiny model."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification
    from almost_utils.dialogue import rm_text
    from almost_utils.models import load_model
    rm = cfg4.reward_model
    dev = cfg4.device
    model, tok = load_model(cfg4.models[rm.model], dev, seed=cfg4.seed,
                            auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rm.lora_r, lora_alpha=rm.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="SEQ_CLS"))
    model.print_trainable_parameters()
    model.train()
    tok.truncation_side = "left"
    pairs = toy_pairs(8)

    def enc(key):
        texts = [rm_text([("Human", p["prompt"])], p[key]) + tok.eos_token for p in pairs]
        return tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=rm.max_length).to(dev)

    chosen, rejected = enc("chosen"), enc("rejected")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(dev, dtype=torch.bfloat16):
            rc = model(**chosen).logits.squeeze(-1)
            rr = model(**rejected).logits.squeeze(-1)
        loss = -F.logsigmoid(rc.float() - rr.float()).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        if not grads or any(g is None for g in grads):
            raise RuntimeError("LoRA parameters received no gradient")
        opt.step()
        losses.append(round(loss.item(), 4))
    print(f"Bradley-Terry loss over {steps} steps: {losses}")
    if not all(map(lambda x: x == x and x < float("inf"), losses)):
        raise RuntimeError("non-finite loss")
    if losses[-1] >= losses[0]:
        print("note: the loss did not fall on this toy batch (random tiny model); not a failure")
    del model, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"losses": losses}


def check_reward_module(cfg4, work: Path) -> dict:
    """A short run of the project's own Step-2 trainer (trl RewardTrainer + peft) on toy pairs,
    then the saved RM reloaded and scored."""
    import torch
    try:
        import almost_utils.reward as reward
    except ImportError as e:
        raise Skip(f"almost_utils.reward not importable ({e})")
    fn = getattr(reward, "train_reward_model", None)
    if not callable(fn):
        raise Skip("almost_utils.reward has no train_reward_model")
    pairs = toy_pairs(40)
    train, held = pairs[:32], pairs[32:]
    folder = work / "rm"
    params = inspect.signature(fn).parameters
    kwargs = {"progress": False} if "progress" in params else {}
    print(f"almost_utils.reward.train_reward_model on {len(train)} toy pairs (+{len(held)} held out), "
          f"4-bit={cfg4.models[cfg4.reward_model.model].load_in_4bit}, "
          f"gradient checkpointing={cfg4.reward_model.gradient_checkpointing}")
    summary = fn(cfg4, train, held, folder, **kwargs)
    print(f"summary: {json.dumps(summary, default=str)[:400]}")
    out = {"summary": summary}
    if callable(getattr(reward, "load_reward_model", None)):
        scorer = reward.load_reward_model(folder, device=cfg4.device)
        scores = scorer.score_pairs(held)
        print(f"reloaded RM scored {len(held)} held-out pairs: {str(scores)[:200]}")
        out["scores"] = scores
    return out


def check_self_play_turn(cfg4, work: Path) -> dict:
    """Step 3's unit of work: one assistant turn of self-play (N candidates per dialogue through the
    engine, scored by the RM that the reward-module check saved) and the user agent's reply."""
    from almost_utils.engines import load_engine
    from almost_utils.reward import load_reward_model
    from almost_utils.rmsp import load_user_prompt, new_dialogue, play_turn, token_counter
    from almost_utils.comparisons import configurations, prompt_prefix
    if not (work / "rm" / "adapter_config.json").is_file():
        raise Skip("no RM saved by the reward-module check")
    r = cfg4.rmsp
    engine = load_engine(cfg4, configurations(cfg4)[0].model, progress=False)
    scorer = load_reward_model(work / "rm", device=cfg4.device)
    seeds, _ = _prompts()
    dialogues = [new_dialogue(i, {"id": i, "query": q}) for i, q in enumerate(seeds[:4])]
    prefixes = {"assistant": prompt_prefix(cfg4, configurations(cfg4)[0]),
                "user": load_user_prompt(cfg4.path(r.user_prompt))}
    t0 = time.perf_counter()
    records, stats = play_turn(dialogues, 0, r, engine, scorer, prefixes, cfg4.seed, token_counter(engine), "smoke")
    print(f"{len(records)} dialogues x {r.candidates} candidates in {time.perf_counter() - t0:.1f}s: {stats}")
    if any(len(rec["candidates"]) != r.candidates for rec in records):
        raise RuntimeError("a dialogue did not get N candidates")
    for rec in records:
        scores = [c["score"] for c in rec["candidates"]]
        if rec["picks"]["rm"] is not None and scores[rec["picks"]["rm"]] != max(s for s in scores if s is not None):
            raise RuntimeError(f"the RM's pick is not the argmax: {scores} -> {rec['picks']['rm']}")
    return {"stats": stats}


def check_sft_steps(cfg4, work: Path) -> dict:
    """Step 4: a few (Q)LoRA SFT steps of the project's trainer (assistant-only loss, the masked
    output layer) on hand-made dialogues; the saved adapter reloads and scores an answer."""
    import math
    from almost_utils import sft as S
    seeds, _ = _prompts()
    rows = [{"id": i, "turns": [["Human", q], ["Assistant", "Here is a short, careful answer. " * 3]]}
            for i, q in enumerate(seeds[:8])]
    summary = S.train_sft(cfg4, rows, work / "sft", "sft", progress=False)
    print(f"SFT: {summary['optimizer_steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
          f"{summary['tokens_per_s']} tokens/s, loss mode {summary['loss_mode']}")
    policy = S.load_policy(work / "sft", device=cfg4.device, progress=False)
    lp = policy.logprobs([seeds[0]], ["Here is a short, careful answer."])[0]
    if not (math.isfinite(summary["final_loss"]) and math.isfinite(lp["sum"])):
        raise RuntimeError(f"non-finite loss or log-prob: {summary['final_loss']}, {lp['sum']}")
    return {"summary": summary, "logprob": lp["sum"]}


def check_ppo_steps(cfg4, work: Path) -> dict:
    """Step 5: two PPO steps of the project's trainer from the SFT adapter of the previous check,
    rewarded by the RM of the reward-module check (rollouts through the engine on the synced copy)."""
    import math
    from almost_utils.ppo import PPOTrainer, RolloutWeights, build_policy, rm_reward, step_queries
    from almost_utils.reward import load_reward_model
    from almost_utils.sampling import TransformersEngine
    if not (work / "sft" / "adapter").is_dir() or not (work / "rm" / "adapter_config.json").is_file():
        raise Skip("needs the SFT adapter and the RM of the previous checks")
    policy, plain, tok = build_policy(cfg4, work / "sft", cfg4.device)
    engine = TransformersEngine(plain, tok, batch_size=8, progress=False)
    reward = rm_reward(load_reward_model(work / "rm", device=cfg4.device))
    trainer = PPOTrainer(cfg4.ppo, policy, tok, engine, RolloutWeights(plain, policy.peft), reward, seed=0)
    seeds, _ = _prompts()
    queries = [{"id": i, "query": q} for i, q in enumerate(seeds[:8])]
    rows = [trainer.step(step_queries(queries, s, cfg4.ppo.rollout_batch, 0)) for s in range(2)]
    for r in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "examples"})
    if not all(math.isfinite(r["pg_loss"]) and math.isfinite(r["kl"]) for r in rows):
        raise RuntimeError("PPO produced a non-finite loss or KL")
    return {"rows": rows}


def check_evaluation(cfg4, work: Path) -> dict:
    """Step 6: the SFT policy of the SFT check as judge on hand-made HHH pairs (both orders, the
    next-token probabilities of " A" / " B"), their likelihoods, and answers scored by the RM."""
    import math
    from almost_utils.answers import score_rows
    from almost_utils.evaluation import Contestant, hhh_judge_rows, hhh_likelihood_rows
    from almost_utils.reward import load_reward_model
    from almost_utils.sampling import SamplingParams, TransformersEngine
    from almost_utils.sft import load_policy
    if not (work / "sft" / "adapter").is_dir() or not (work / "rm" / "adapter_config.json").is_file():
        raise Skip("needs the SFT adapter and the RM of the previous checks")
    policy = load_policy(work / "sft", device=cfg4.device, progress=False)
    c = Contestant("sft", TransformersEngine(policy.model, policy.tokenizer, batch_size=4, progress=False),
                   policy.tokenizer)
    seeds, _ = _prompts()
    pairs = [{"id": i, "category": "helpful", "cluster": i, "history": [("Human", q)],
              "chosen": "Here is a short, careful answer.", "rejected": "No."} for i, q in enumerate(seeds[:4])]
    judge, lik = hhh_judge_rows(c, pairs), hhh_likelihood_rows(c, pairs)
    answers = [{"prompt": q, "answer": a} for q, a in zip(seeds[:4], c.answer(
        [[("Human", q)] for q in seeds[:4]], SamplingParams(max_new_tokens=16, temperature=0.7, seed=0), "smoke"))]
    for r in answers:
        r["answer"] = r["answer"]["answer"]
    score_rows(answers, load_reward_model(work / "rm", device=cfg4.device), "prompt")
    numbers = [r["chosen"] for r in judge + lik] + [r["rejected"] for r in judge + lik]
    if not all(math.isfinite(x) for x in numbers) or not all(0 <= r["chosen"] <= 2 for r in judge):
        raise RuntimeError(f"bad judge or likelihood numbers: {judge[:1]} {lik[:1]}")
    print(f"judge accuracy {sum(r['correct'] for r in judge) / len(judge):.2f}, likelihood "
          f"{sum(r['correct'] for r in lik) / len(lik):.2f}, RM scores {[r['score'] for r in answers]}")
    return {"judge": judge, "likelihood": lik}


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokenizer", default="auto", help="auto | builtin | PATH to a tokenizer folder")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="almost_gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.device)
    t_start = time.perf_counter()
    try:
        env = smoke.run("environment", check_environment, args.device)
        if env is None:
            return smoke.summary()
        tok_dir = smoke.run("tokenizer", build_tokenizer, work / "tokenizer", args.tokenizer)
        cfg = smoke.run("recipe", load_recipe, tok_dir, work, args.device) if tok_dir else None
        if cfg is None:
            return smoke.summary()
        smoke.run("bf16 sampling", check_sampling, cfg)
        model_dir = smoke.run("save tiny model", save_tiny, cfg, work / "tiny_model")
        cfg4 = folder_recipe(cfg, model_dir) if (model_dir and args.device == "cuda") else None
        if cfg4 is None:
            for name in ("4-bit load", "4-bit sampling"):
                smoke.run(name, lambda: (_ for _ in ()).throw(Skip("needs --device cuda")))
            if model_dir:   # the same steps unquantized, on the CPU
                cfg_cpu = folder_recipe(cfg, model_dir, load_in_4bit=False)
                smoke.run("LoRA RM steps", check_qlora_steps, cfg_cpu)
                smoke.run("reward module", check_reward_module, cfg_cpu, work)
                smoke.run("self-play turn", check_self_play_turn, cfg_cpu, work)
                smoke.run("LoRA SFT steps", check_sft_steps, cfg_cpu, work)
                smoke.run("PPO steps", check_ppo_steps, cfg_cpu, work)
                smoke.run("evaluation", check_evaluation, cfg_cpu, work)
        else:
            smoke.run("4-bit load", check_4bit_load, cfg4)
            smoke.run("4-bit sampling", check_sampling, cfg4)
            smoke.run("QLoRA RM steps", check_qlora_steps, cfg4)
            smoke.run("reward module", check_reward_module, cfg4, work)
            smoke.run("self-play turn", check_self_play_turn, cfg4, work)
            smoke.run("QLoRA SFT steps", check_sft_steps, cfg4, work)
            smoke.run("PPO steps", check_ppo_steps, cfg4, work)
            smoke.run("evaluation", check_evaluation, cfg4, work)
        print(f"\nwall time {time.perf_counter() - t_start:.1f}s")
        return smoke.summary()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
