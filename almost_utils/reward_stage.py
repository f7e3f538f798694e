"""Step 2 as one resumable stage: train the RM (and its no-Heuristic-Filter ablation), evaluate both.

Reads Step 1's ``results/<run>/comparisons/pairs.jsonl`` (after the Heuristic Filter) and
``pairs_no_hf.jsonl`` (same pairing, filter off), rows
``{"query_id", "prompt", "chosen", "rejected", "chosen_config", "rejected_config"}``, and writes::

    results/<run>/reward_model/
      split.json              # held-out query ids (the split is by query: no prompt on both sides)
      rm/, rm_no_hf/          # trained RMs (see almost_utils.reward); reused when their fingerprint matches
      scores/<bench>__<scorer>.jsonl   # {"id", "chosen_score", "rejected_score"} per pair; reused
      heldout_pairs.jsonl     # the held-out pairs, "hf": kept by the Heuristic Filter
      accuracy.csv            # benchmark, subset, scorer, n, accuracy, ci_low, ci_high
      metrics.json            # accuracy rows, ablation, training summaries, data and cluster counts
                              # (intervals: cluster bootstrap, HHH by conversation, held-out by query)
      hhh_examples.json       # 3 HHH pairs the RM gets right, 3 it gets wrong (largest margins)
      training_log.json       # {variant: trainer log rows}
      figures/*.png
      manifest.json

Scorers: ``rm`` (trained on HF pairs), ``rm_no_hf`` (ablation), ``untrained`` (fresh head),
``longer`` and ``random`` (baselines). Benchmarks: ``heldout`` (held-out synthetic pairs kept
by the filter), ``heldout_no_hf`` (every held-out pair), ``hhh`` (BIG-bench, per category).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from .artifacts import Manifest, ResumableJsonl, atomic_write_text, read_json, read_jsonl, write_json, write_jsonl
from .config import ConfigError, RunConfig
from .fingerprint import begin_stage, stage_status
from .progress import say

STAGE = "reward_model"
PAIR_FIELDS = ("query_id", "prompt", "chosen", "rejected")
VARIANTS = {"rm": "pairs.jsonl", "rm_no_hf": "pairs_no_hf.jsonl"}
# fields of the reward_model section that change the trained weights (others only change evaluation)
TRAINING_FIELDS = ("model", "learning_rate", "weight_decay", "epochs", "batch_size", "grad_accum", "warmup_ratio",
                   "lr_scheduler", "max_length", "lora_r", "lora_alpha", "lora_dropout", "gradient_checkpointing",
                   "lora_layers", "lora_target_modules", "max_train_pairs")
# what a benchmark's pairs are resampled by in the bootstrap: pairs sharing a conversation (HHH) or a
# query (held-out synthetic pairs) are not independent, so they enter and leave a resample together
CLUSTER_KEYS = {"heldout": "query_id", "heldout_no_hf": "query_id", "hhh": "cluster"}


# --------------------------------------------------------------------------- data
def read_pairs(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        missing = [k for k in PAIR_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {missing}")
    return rows


def variants(cfg: RunConfig) -> list[str]:
    return ["rm", "rm_no_hf"] if cfg.reward_model.ablation_no_heuristic_filter else ["rm"]


def load_step1_pairs(cfg: RunConfig) -> dict[str, list[dict]]:
    """``{"rm": HF pairs, "rm_no_hf": unfiltered pairs}`` from the run's comparisons folder."""
    folder = cfg.run_dir / "comparisons"
    out = {}
    for v in variants(cfg):
        path = folder / VARIANTS[v]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run Step 1 (notebook 01) for this recipe first")
        out[v] = read_pairs(path)
    if not out["rm"]:
        raise ValueError(f"{folder / VARIANTS['rm']} holds no pairs")
    return out


def split_queries(query_ids, eval_fraction: float, seed: int) -> list[int]:
    """A seeded choice of held-out query ids: ceil(fraction * n), at least 1, at most n - 1."""
    ids = sorted(set(query_ids))
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} distinct queries: need at least 2 to hold some out")
    k = min(max(1, math.ceil(eval_fraction * len(ids))), len(ids) - 1)
    return sorted(random.Random(seed).sample(ids, k))


def clusters_of(benchmark: str, rows: list[dict]) -> list:
    """Each pair's cluster key (see ``CLUSTER_KEYS``), aligned with ``rows``."""
    key = CLUSTER_KEYS[benchmark]
    for r in rows:
        if key not in r:
            raise KeyError(f"{benchmark}: pair {r.get('id')} lacks '{key}', the key its bootstrap clusters by")
    return [r[key] for r in rows]


def _key(row) -> tuple:
    return row["query_id"], row["chosen"], row["rejected"]


def heldout_rows(data: dict[str, list[dict]], eval_q: set) -> list[dict]:
    """Held-out pairs of both files, deduplicated, each with an ``id`` and ``hf`` (kept by the filter)."""
    kept = {_key(r) for r in data["rm"]}
    seen, out = set(), []
    for v in ("rm", "rm_no_hf"):
        for r in data.get(v, []):
            if r["query_id"] in eval_q and _key(r) not in seen:
                seen.add(_key(r))
                out.append({**r, "hf": _key(r) in kept})
    for i, r in enumerate(out):
        r["id"] = f"q{r['query_id']}-{i}"
    return out


def training_rows(rows: list[dict], eval_q: set, cap: int | None, seed: int) -> list[dict]:
    train = [r for r in rows if r["query_id"] not in eval_q]
    if cap is not None and len(train) > cap:
        train = random.Random(seed).sample(train, cap)
    return train


def training_fingerprint(cfg: RunConfig, train_rows: list[dict]) -> str:
    """What determines a trained RM: backbone, seed, training fields and the exact training pairs."""
    rm = cfg.reward_model
    blob = {"base": asdict(cfg.models[rm.model]), "seed": cfg.seed, "device": cfg.device,
            "train": {k: getattr(rm, k) for k in TRAINING_FIELDS},
            "data": [[r["prompt"], r["chosen"], r["rejected"]] for r in train_rows]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _meta(folder: Path) -> dict | None:
    p = folder / "reward_model.json"
    return read_json(p) if p.is_file() else None


# --------------------------------------------------------------------------- scoring with reuse
def _scored(store: ResumableJsonl, key: str, model_id: str, rows: list[dict], make_scorer, progress: bool):
    """Scores of ``rows`` by one scorer, read back when stored for the same model and rows."""
    ids = [r["id"] for r in rows]
    if store.done(key):
        got = store.get(key)
        if [g["id"] for g in got] == ids and all(g.get("model_id") == model_id for g in got):
            return [g["chosen_score"] for g in got], [g["rejected_score"] for g in got]
    scorer = make_scorer()
    c, r = scorer.score_pairs(rows, desc=key, progress=progress)
    store.put(key, [{"id": i, "model_id": model_id, "chosen_score": a, "rejected_score": b}
                    for i, a, b in zip(ids, c, r)])
    return c, r


class _Lazy:
    """Load a scorer on first use only, so fully cached evaluations load no model."""

    def __init__(self, load):
        self._load, self.obj = load, None

    def __call__(self):
        if self.obj is None:
            self.obj = self._load()
        return self.obj


# --------------------------------------------------------------------------- the stage
def run_reward_model_stage(cfg: RunConfig, progress: bool = True) -> dict | None:
    """Train (or reuse) the RMs, score every benchmark, write metrics, figures and the manifest.

    Returns ``metrics.json``'s content. Reruns reuse finished RMs and stored scores.

    Under ``accelerate launch`` (N processes) every process trains, the main one alone writes
    files, and scoring, metrics and figures run on the main process only: scoring is inference
    over a few hundred pairs, where sharding plus a gather would buy little. The other processes
    return ``None`` once the RMs are saved.
    """
    import contextlib

    from . import distributed, rm_eval, rm_figures
    from .bigbench import load_hhh
    from .reward import RewardScorer, load_reward_model, train_reward_model

    rm = cfg.reward_model
    if rm is None:
        raise ConfigError("reward_model: this recipe has no reward_model section")
    stage = cfg.stage_dir(STAGE)
    hhh_root = cfg.path(rm.hhh_dir) if rm.hhh_dir else None
    if hhh_root is not None and not hhh_root.is_dir():
        raise ConfigError(f"reward_model.hhh_dir: folder not found: {hhh_root}")
    nboot, seed = rm.bootstrap_samples, cfg.seed
    if stage_status(cfg, "comparisons") != "done":
        raise ConfigError(f"reward_model: Step 1 has not finished in {cfg.run_dir / 'comparisons'}: run it first "
                          "(notebook 01, or python -m almost_utils.cli comparisons)")
    with distributed.main_first():      # the main process claims the folder; the others find it claimed
        status, stage_fp = begin_stage(cfg, STAGE)  # a recipe change stops here, before a model loads
    if status == "done":
        say(f"reward_model: reusing the reward models' metrics of {cfg.run_dir} (recipe unchanged)")
        return read_json(stage / "metrics.json")

    manifest = Manifest(cfg, STAGE, stage_fp)   # written on leaving the block: by the main process only
    with (manifest if distributed.is_main() else contextlib.nullcontext(manifest)) as man:
        data = load_step1_pairs(cfg)
        all_q = {r["query_id"] for rows in data.values() for r in rows}
        eval_q = set(split_queries(all_q, rm.eval_fraction, seed))
        if distributed.is_main():
            write_json(stage / "split.json", {"eval_query_ids": sorted(eval_q), "queries": len(all_q),
                                              "eval_fraction": rm.eval_fraction, "seed": seed})
        held = heldout_rows(data, eval_q)
        held_hf = [r for r in held if r["hf"]]
        if distributed.is_main():
            write_jsonl(stage / "heldout_pairs.jsonl", held)
        for v, rows in data.items():
            man.count(f"pairs_{v}", len(rows))
        man.count("queries", len(all_q))
        man.count("heldout_queries", len(eval_q))
        man.count("heldout_pairs", len(held))
        man.count("heldout_pairs_hf", len(held_hf))

        # ---- training (or reuse)
        training, trained_fp = {}, {}
        for v, rows in data.items():
            train = training_rows(rows, eval_q, rm.max_train_pairs, seed)
            if not train:
                raise ValueError(f"{v}: no training pairs left after holding out {len(eval_q)} queries")
            fp = training_fingerprint(cfg, train)
            meta = _meta(stage / v)
            same = next((u for u, f in trained_fp.items() if f == fp), None)
            distributed.barrier()       # every process decided from the same files before the main one changes them
            if meta is not None and meta["train"].get("fingerprint") == fp:
                say(f"{v}: reusing the trained reward model in {stage / v}")
            elif same is not None:      # the filter dropped no training pair: the same model, not trained twice
                say(f"{v}: same training pairs as {same}: copying {stage / same}")
                if distributed.is_main():
                    shutil.rmtree(stage / v, ignore_errors=True)
                    shutil.copytree(stage / same, stage / f".{v}.tmp", dirs_exist_ok=True)
                    os.replace(stage / f".{v}.tmp", stage / v)
                distributed.barrier()   # the others read the copy below
                meta = _meta(stage / v)
            else:
                if meta is not None:
                    print(f"{v}: recipe or training pairs changed since {stage / v} was trained: retraining",
                          flush=True)
                with man.timer(f"train_{v}"):
                    train_reward_model(cfg, train, held_hf or None, stage / v, progress=progress,
                                       extra_meta={"fingerprint": fp, "variant": v})
                meta = _meta(stage / v)
            training[v] = meta["train"]
            trained_fp[v] = fp
            man.count(f"train_pairs_{v}", len(train))
            gc.collect()
        man.note("world_size", distributed.world_size())
        man.note("process_backend", distributed.backend())
        if not distributed.is_main():   # trained and saved: scoring is the main process's (see above)
            return None
        write_json(stage / "training_log.json",
                   {v: read_json(stage / v / "log_history.json") for v in data})

        # ---- scoring (reused when stored for the same model and pairs)
        hhh = load_hhh(hhh_root) if hhh_root is not None else load_hhh()
        man.count("hhh_pairs", len(hhh))
        benches = {"heldout": held, "hhh": hhh}
        store = ResumableJsonl(stage / "scores", stage_fp)
        scores = {b: {} for b in benches}
        device = cfg.device
        scorers = {v: (training[v]["train_id"], _Lazy(lambda v=v: load_reward_model(
            stage / v, device, rm.score_batch_size))) for v in data}
        spec = cfg.models[rm.model]
        untrained_id = hashlib.sha256(json.dumps([asdict(spec), seed, rm.max_length], default=str)
                                      .encode()).hexdigest()[:16]
        scorers["untrained"] = (untrained_id, _Lazy(lambda: RewardScorer.untrained(
            spec, rm.max_length, device, seed, rm.score_batch_size)))
        done = {}                                    # (benchmark, model_id) -> scores: one model scored once
        for name, (model_id, lazy) in scorers.items():
            with man.timer(f"score_{name}"):
                for b, rows in benches.items():
                    if (b, model_id) not in done:
                        done[(b, model_id)] = _scored(store, f"{b}__{name}", model_id, rows, lazy, progress)
                    scores[b][name] = done[(b, model_id)]
            lazy.obj = None
            gc.collect()

        # ---- metrics (every interval: cluster bootstrap, HHH by conversation, held-out pairs by query)
        sub = lambda pair, idx: ([pair[0][i] for i in idx], [pair[1][i] for i in idx])  # noqa: E731
        hf_idx = [i for i, r in enumerate(held) if r["hf"]]
        acc = rm_eval.accuracy_rows("heldout", held_hf, {k: sub(s, hf_idx) for k, s in scores["heldout"].items()},
                                    n_samples=nboot, seed=seed, clusters=clusters_of("heldout", held_hf))
        if len(held_hf) < len(held):
            acc += rm_eval.accuracy_rows("heldout_no_hf", held, scores["heldout"], n_samples=nboot, seed=seed,
                                         clusters=clusters_of("heldout_no_hf", held))
        acc += rm_eval.accuracy_rows("hhh", hhh, scores["hhh"], group_key="category", n_samples=nboot, seed=seed,
                                     clusters=clusters_of("hhh", hhh))
        n_clusters = {b: len(set(clusters_of(b, rows)))
                      for b, rows in (("heldout", held_hf), ("heldout_no_hf", held), ("hhh", hhh))}
        metrics = {"accuracy": acc, "training": training,
                   "ablation": _ablation(acc, scores, hhh, training, nboot, seed),
                   "paired": _paired(scores, rows={"heldout": held, "hhh": hhh}, nboot=nboot, seed=seed),
                   "data": {**man.data["counts"], "eval_query_ids": sorted(eval_q), "clusters": n_clusters},
                   "intervals": {"method": "95% percentile cluster bootstrap (paired for differences)",
                                 "resamples": nboot, "cluster_by": CLUSTER_KEYS,
                                 "random": "binomial: a coin flips independently for every pair"},
                   "rm_dialogue_format": "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}<eos>, scored at <eos>"}
        write_json(stage / "metrics.json", metrics)
        _write_csv(stage / "accuracy.csv", acc)
        examples = rm_eval.pick_examples(hhh, *scores["hhh"]["rm"], k=3)
        write_json(stage / "hhh_examples.json", examples)
        write_jsonl(stage / "hhh_scores.jsonl", _score_table(hhh, scores["hhh"]))
        write_jsonl(stage / "heldout_scores.jsonl", _score_table(held, scores["heldout"]))

        # ---- figures
        with man.timer("figures"):
            import matplotlib.pyplot as plt
            for name, fig in rm_figures.make_figures(load_results(stage)).items():
                plt.close(fig)
        man.note("training_seconds", {v: t.get("seconds") for v, t in training.items()})
        man.note("reused_models", [v for v in data if f"train_{v}" not in man.data["timings_s"]])
    return metrics


def _ablation(acc, scores, hhh, training, nboot, seed) -> dict:
    """Per variant: training pairs and accuracy on each benchmark; HHH difference with a paired interval."""
    from . import rm_eval
    table = []
    for v in training:
        row = {"variant": v, "train_pairs": training[v]["train_pairs"]}
        for a in acc:
            if a["scorer"] == v and a["subset"] == "all":
                row[a["benchmark"]] = {k: a[k] for k in ("n", "clusters", "accuracy", "ci_low", "ci_high") if k in a}
        table.append(row)
    out = {"table": table}
    if "rm_no_hf" in training:
        ca = rm_eval.pair_correct(*scores["hhh"]["rm"])
        cb = rm_eval.pair_correct(*scores["hhh"]["rm_no_hf"])
        out["hhh_rm_minus_rm_no_hf"] = rm_eval.paired_difference(ca, cb, nboot, seed, clusters=clusters_of("hhh", hhh))
    return out


def _paired(scores, rows, nboot, seed) -> dict:
    """Each trained RM minus each baseline (longer, untrained), paired cluster bootstrap, per benchmark."""
    from . import rm_eval
    out = {}
    for b, by_scorer in scores.items():
        base = dict(by_scorer)
        base["longer"] = rm_eval.longer_scores(rows[b])
        idx = [i for i, r in enumerate(rows[b]) if r.get("hf", True)]      # held-out: the HF pairs
        correct = {k: rm_eval.pair_correct(*v)[idx] for k, v in base.items()}
        keys = clusters_of(b, rows[b])
        clusters = [keys[i] for i in idx]
        out[b] = {f"{v}_minus_{c}": rm_eval.paired_difference(correct[v], correct[c], nboot, seed, clusters=clusters)
                  for v in ("rm", "rm_no_hf") if v in correct for c in ("longer", "untrained")}
    return out


def _score_table(rows, scores) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        row = {k: r[k] for k in ("id", "category", "cluster", "query_id", "hf") if k in r}
        row["chosen_chars"], row["rejected_chars"] = len(r["chosen"]), len(r["rejected"])
        for name, (c, rj) in scores.items():
            row[f"{name}_chosen"], row[f"{name}_rejected"] = c[i], rj[i]
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = ["benchmark", "subset", "scorer", "n", "accuracy", "ci_low", "ci_high"]
    lines = [",".join(cols)] + [",".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_results(cfg_or_dir) -> dict:
    """Everything the notebook shows, read back from ``results/<run>/reward_model/``."""
    stage = (cfg_or_dir.run_dir if isinstance(cfg_or_dir, RunConfig) else Path(cfg_or_dir))
    stage = stage / STAGE if (stage / STAGE).is_dir() else stage
    return {"metrics": read_json(stage / "metrics.json"), "training_log": read_json(stage / "training_log.json"),
            "hhh_examples": read_json(stage / "hhh_examples.json"),
            "hhh_scores": read_jsonl(stage / "hhh_scores.jsonl"),
            "heldout_scores": read_jsonl(stage / "heldout_scores.jsonl"), "stage_dir": stage}


def clear_stage(cfg: RunConfig) -> None:
    """Delete this stage's outputs (trained RMs included)."""
    shutil.rmtree(cfg.run_dir / STAGE, ignore_errors=True)
