"""Throughput of the sampling engine against Hugging Face ``generate``, side by side.

gemma-3-270m, 32 queries (two batches of 16) behind a ~1500-token few-shot prefix, 96 sampled
tokens each (EOS and stop strings ignored so every method generates exactly that many), T=1.0,
top_p 0.9:

  (a) ``model.generate`` one prompt at a time, full prompt, no cache reuse
  (b) ``model.generate`` batched, the prefix KV cache computed once, copied per batch and
      expanded to the batch size (padding falls between prefix and query, see MODELS.md)
  (c) ``TransformersEngine`` at the same batch size (three passes spread over the run; ratios
      use the median pass), and (c16) on the first 16 queries only
      (one batch: the prefix is paid by 16 queries instead of 32; Step 1 pays it once per 220)

plus a greedy check: the engine's greedy tokens against (a)'s greedy tokens, query by query.
Results go to ``results/benchmarks/sampling.json``.

    python benchmarks/bench_sampling.py                  # everything (~20 min on 2 cores)
    python benchmarks/bench_sampling.py --a-queries 4    # (a) timed on 4 queries only
    python benchmarks/bench_sampling.py --skip-a         # only (b) and (c)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from almost_utils.config import REPO_ROOT, ModelSpec  # noqa: E402
from almost_utils.dialogue import few_shot_prefix, load_dialogues, open_turn  # noqa: E402
from almost_utils.models import load_model  # noqa: E402
from almost_utils.sampling import SamplingParams, TransformersEngine  # noqa: E402

DEMOS = REPO_ROOT / "data" / "demonstrations"


def build_prompts(tok, n_queries: int, prefix_tokens: int):
    """A few-shot prefix of about ``prefix_tokens`` tokens (hhh then faithful dialogues, added
    until the count is reached) and ``n_queries`` seed queries as open dialogue turns."""
    preamble = (DEMOS / "preamble.txt").read_text()
    dialogues = load_dialogues(DEMOS / "hhh.txt") + load_dialogues(DEMOS / "faithful.txt")
    for shots in range(len(dialogues) + 1):
        prefix = few_shot_prefix(preamble, dialogues, shots)
        if len(tok(prefix).input_ids) >= prefix_tokens:
            break
    lines = [l.strip() for l in (REPO_ROOT / "data" / "seed_queries.txt").read_text().splitlines() if l.strip()]
    return prefix, shots, [open_turn([("Human", q)]) for q in lines[:n_queries]]


def joined_ids(tok, prefix: str, prompt: str) -> list[int]:
    """Prefix with BOS, prompt without, joined as ids (as the engine does)."""
    return tok(prefix).input_ids + tok(prompt, add_special_tokens=False).input_ids


def hf_kwargs(new_tokens: int, greedy: bool, tok):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, top_k=None)
    return kw | (dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=0.9))


class Clock:
    """Wall-clock and process CPU seconds. On a shared machine, CPU time counts only the time
    this process ran (with 1 thread it equals wall time on an idle machine)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self):
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_a(model, tok, prefix, prompts, new_tokens, greedy=False, seed=0):
    """(a) one prompt at a time, whole prompt recomputed every time."""
    torch.manual_seed(seed)
    outs, clock = [], Clock()
    for p in prompts:
        ids = torch.tensor([joined_ids(tok, prefix, p)])
        o = model.generate(ids, attention_mask=torch.ones_like(ids), **hf_kwargs(new_tokens, greedy, tok))
        outs.append(o[0, ids.shape[1]:].tolist())
    return outs, clock.stop()


def run_b(model, tok, prefix, prompts, new_tokens, batch_size, seed=0):
    """(b) batched generate reusing a prefix KV cache (copied per batch, expanded to the batch)."""
    torch.manual_seed(seed)
    clock = Clock()
    prefix_ids = tok(prefix).input_ids
    with torch.no_grad():
        cache = model(torch.tensor([prefix_ids]), use_cache=True).cache
    outs = []
    for s in range(0, len(prompts), batch_size):
        qs = [tok(p, add_special_tokens=False).input_ids for p in prompts[s:s + batch_size]]
        width = max(map(len, qs))
        ids = torch.full((len(qs), len(prefix_ids) + width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, q in enumerate(qs):   # left-pad the queries: padding sits between prefix and query
            ids[r, :len(prefix_ids)] = torch.tensor(prefix_ids)
            ids[r, ids.shape[1] - len(q):] = torch.tensor(q)
            mask[r, :len(prefix_ids)] = 1
            mask[r, ids.shape[1] - len(q):] = 1
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(qs))
        o = model.generate(ids, attention_mask=mask, cache=c, **hf_kwargs(new_tokens, False, tok))
        outs += o[:, ids.shape[1]:].tolist()
    return outs, clock.stop()


def run_c(engine, prefix, prompts, new_tokens, greedy=False, seed=0):
    """(c) the engine; the prefix memo is cleared so its prefill is timed like (b)'s. The
    one-time packing of the weights (under a second) happens in the warm-up, like loading."""
    engine.clear_cache(weights=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, top_p=0.9,
                            seed=seed, ignore_eos=True)
    clock = Clock()
    outs = engine.generate_tokens(prompts, params, prefix=prefix)
    return outs, clock.stop()


def machine_info():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def loadavg():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=1500)
    ap.add_argument("--a-queries", type=int, default=None, help="time (a) on the first N queries")
    ap.add_argument("--greedy-queries", type=int, default=16, help="greedy check on the first N queries")
    ap.add_argument("--skip-a", action="store_true", help="skip (a) and the greedy check")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmarks" / "sampling.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(ModelSpec(source="packaged:gemma-3-270m"), "cpu")
    prefix, shots, prompts = build_prompts(tok, args.queries, args.prefix_tokens)
    n_a = min(args.a_queries or len(prompts), len(prompts))
    n_prefix = len(tok(prefix).input_ids)
    engine = TransformersEngine(model, tok, batch_size=args.batch_size, progress=False)
    print(f"gemma-3-270m | prefix {n_prefix} tokens ({shots} dialogues) | {len(prompts)} queries | "
          f"{args.new_tokens} new tokens | T=1.0 top_p=0.9 | batch {args.batch_size} | "
          f"torch threads {torch.get_num_threads()} | load {loadavg()}", flush=True)

    # Warm up every path once (allocator, thread pool, first-call overheads).
    run_c(engine, prefix, prompts[:2], 2)
    run_a(model, tok, prefix, prompts[:1], 2)

    res, tok_s, cpu_tok_s = {}, {}, {}
    # (c) runs three times, before, between and after the slow baselines: on a noisy machine the
    # ratios use the median pass, and the spread of the passes shows the noise.
    run_all_c = lambda: run_c(engine, prefix, prompts, args.new_tokens)  # noqa: E731
    n_one = min(args.batch_size, len(prompts))
    steps = [("c1", run_all_c, len(prompts))]
    if n_one < len(prompts):
        steps.append(("c16", lambda: run_c(engine, prefix, prompts[:n_one], args.new_tokens), n_one))
    if not args.skip_b:
        steps.append(("b", lambda: run_b(model, tok, prefix, prompts, args.new_tokens, args.batch_size), len(prompts)))
    steps.append(("c2", run_all_c, len(prompts)))
    if not args.skip_a:
        steps.append(("a", lambda: run_a(model, tok, prefix, prompts[:n_a], args.new_tokens), n_a))
    steps.append(("c3", run_all_c, len(prompts)))
    names = {"a": "(a) HF generate, one prompt at a time, no cache reuse",
             "b": f"(b) HF generate, batch {args.batch_size}, prefix KV cache passed in",
             "c16": f"(c16) TransformersEngine, first {n_one} queries (one batch)"}
    names |= {f"c{i}": f"(c) TransformersEngine, batch {args.batch_size}, pass {i}" for i in (1, 2, 3)}
    print(f"{'method':<58} {'queries':>7} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'cpu s':>7} {'tok/cpu-s':>9} {'load':>5}")
    for key, fn, n in steps:
        load0 = loadavg()
        outs, (secs, cpu) = fn()
        n_tok = sum(map(len, outs))
        assert n_tok == n * args.new_tokens, (key, n_tok)
        tok_s[key], cpu_tok_s[key] = n_tok / secs, n_tok / cpu
        res[key] = {"method": names[key], "queries": n, "tokens": n_tok, "seconds": round(secs, 2),
                    "tokens_per_s": round(tok_s[key], 2), "cpu_seconds": round(cpu, 2),
                    "tokens_per_cpu_s": round(cpu_tok_s[key], 2), "loadavg_before": load0, "loadavg_after": loadavg()}
        print(f"{names[key]:<58} {n:>7} {n_tok:>6} {secs:>7.1f} {tok_s[key]:>7.2f} {cpu:>7.1f} {cpu_tok_s[key]:>9.2f} "
              f"{load0:>5.2f}", flush=True)
    passes = ("c1", "c2", "c3")
    tok_s["c"] = statistics.median(tok_s[k] for k in passes)
    cpu_tok_s["c"] = statistics.median(cpu_tok_s[k] for k in passes)
    res["c"] = {"method": f"(c) TransformersEngine, batch {args.batch_size}, median of 3 passes",
                "tokens_per_s": round(tok_s["c"], 2), "tokens_per_cpu_s": round(cpu_tok_s["c"], 2)}
    print(f"{res['c']['method']:<58} {'':>7} {'':>6} {'':>7} {tok_s['c']:>7.2f} {'':>7} {cpu_tok_s['c']:>9.2f}")

    ratios = {}
    for k in ("b", "a"):
        if k in tok_s:
            ratios[f"c/{k}"] = round(tok_s["c"] / tok_s[k], 2)
            ratios[f"c/{k} (cpu time)"] = round(cpu_tok_s["c"] / cpu_tok_s[k], 2)
            for other in passes + ("c16",):
                if other in tok_s:
                    ratios[f"{other}/{k}"] = round(tok_s[other] / tok_s[k], 2)
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    greedy = None
    if not args.skip_a:
        n_g = min(args.greedy_queries, len(prompts))
        ga, _ = run_a(model, tok, prefix, prompts[:n_g], args.new_tokens, greedy=True)
        gc, _ = run_c(engine, prefix, prompts[:n_g], args.new_tokens, greedy=True)
        same = [x == y for x, y in zip(ga, gc)]
        first_diff = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(ga, gc)]
        greedy = {"queries": n_g, "identical": sum(same), "first_difference_at": first_diff}
        print(f"greedy check: engine == (a) HF generate one at a time on {sum(same)} of {n_g} queries"
              + ("" if n_g == len(prompts) else f" (the first {n_g} of {len(prompts)})"))
    if n_a < len(prompts) and "a" in tok_s:
        print(f"note: (a) measured on the first {n_a} of {len(prompts)} queries")

    out = {"command": "python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:]),
           "model": "packaged:gemma-3-270m", "prefix_tokens": n_prefix, "prefix_dialogues": shots,
           "queries": len(prompts), "new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 0.9,
           "batch_size": args.batch_size, "results": res, "ratios": ratios, "greedy_check": greedy,
           "machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
