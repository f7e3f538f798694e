"""Pairwise accuracy of reward models and baselines, with seeded cluster-bootstrap intervals.

A scorer gives each pair a chosen score and a rejected score; the pair counts 1 when the chosen
one is higher, 0.5 on a tie, 0 otherwise. Baselines on the same pairs:

* ``random``     - a fair coin: accuracy 0.5, interval = where 95% of coin-flip runs on n pairs land;
* ``longer``     - prefers the longer response (characters);
* ``untrained``  - the RM's backbone with a fresh, untrained head.

Pairs are not independent: several BIG-bench HHH pairs share one conversation, and every
held-out synthetic pair of a query shares its prompt. Intervals therefore come from a *cluster*
bootstrap: whole clusters (conversations, queries) are resampled with replacement and the
statistic is the mean over all pairs of the drawn clusters. ``clusters=None`` makes every pair
its own cluster (the ordinary pairwise bootstrap).

Results are rows, one per (benchmark, subset, scorer)::

    {"benchmark": "hhh", "subset": "harmless", "scorer": "rm", "n": 58, "clusters": 25,
     "accuracy": 0.62, "ci_low": 0.50, "ci_high": 0.74}
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ALPHA = 0.05


def pair_correct(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """1 where chosen > rejected, 0.5 on ties, 0 otherwise."""
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"{c.shape} chosen scores vs {r.shape} rejected scores")
    return np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0))


def cluster_codes(clusters: Sequence | None, n: int) -> np.ndarray:
    """Cluster keys (any hashable values, aligned with the pairs) -> integer codes 0..k-1.

    ``None`` gives every pair its own cluster.
    """
    if clusters is None:
        return np.arange(n)
    keys = list(clusters)
    if len(keys) != n:
        raise ValueError(f"clusters: {len(keys)} keys for {n} pairs")
    index: dict = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=int)


def n_clusters(clusters: Sequence | None, n: int) -> int:
    return int(len(np.unique(cluster_codes(clusters, n))))


def bootstrap_ci(correct: Sequence[float], n_samples: int = 1000, seed: int = 0, alpha: float = ALPHA,
                 clusters: Sequence | None = None) -> tuple[float, float]:
    """Percentile cluster-bootstrap interval of the mean of ``correct``.

    Each resample draws as many clusters as there are, with replacement, and takes the mean over
    all pairs of the drawn clusters (a cluster drawn twice counts twice). Working with per-cluster
    sums and sizes keeps it one vectorised step: mean = sum of drawn sums / sum of drawn sizes.
    With ``clusters=None`` each pair is a cluster and this is the plain pairwise bootstrap.
    """
    x = np.asarray(correct, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    codes = cluster_codes(clusters, len(x))                  # dense 0..k-1, also for a subset's codes
    sums, sizes = np.bincount(codes, weights=x), np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(sums), size=(n_samples, len(sums)))
    means = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def chance_interval(n: int, n_samples: int = 1000, seed: int = 0, alpha: float = ALPHA) -> tuple[float, float]:
    """Where the accuracy of a fair coin on ``n`` pairs falls with probability 1 - alpha."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    acc = rng.binomial(n, 0.5, size=n_samples) / n
    return float(np.quantile(acc, alpha / 2)), float(np.quantile(acc, 1 - alpha / 2))


def summarize(correct: Sequence[float], n_samples: int = 1000, seed: int = 0,
              clusters: Sequence | None = None) -> dict:
    """Accuracy, number of pairs and of clusters, and the cluster-bootstrap interval."""
    x = np.asarray(correct, dtype=float)
    lo, hi = bootstrap_ci(x, n_samples, seed, clusters=clusters)
    return {"n": int(len(x)), "clusters": n_clusters(clusters, len(x)),
            "accuracy": float(x.mean()) if len(x) else float("nan"), "ci_low": lo, "ci_high": hi}


def paired_difference(correct_a: Sequence[float], correct_b: Sequence[float], n_samples: int = 1000,
                      seed: int = 0, clusters: Sequence | None = None) -> dict:
    """Accuracy of a minus accuracy of b on the same pairs, with a paired cluster-bootstrap interval.

    Bootstrapping the per-pair difference keeps the comparison paired: both scorers are judged
    on the same resampled clusters.
    """
    d = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    lo, hi = bootstrap_ci(d, n_samples, seed, clusters=clusters)
    return {"n": int(len(d)), "clusters": n_clusters(clusters, len(d)),
            "difference": float(d.mean()) if len(d) else float("nan"), "ci_low": lo, "ci_high": hi}


def longer_scores(rows: Sequence[dict]) -> tuple[list[float], list[float]]:
    """The always-the-longer-response baseline as scores: the character lengths."""
    return [float(len(r["chosen"])) for r in rows], [float(len(r["rejected"])) for r in rows]


def accuracy_rows(benchmark: str, rows: Sequence[dict], scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  group_key: str | None = None, n_samples: int = 1000, seed: int = 0,
                  baselines: bool = True, clusters: Sequence | None = None) -> list[dict]:
    """Accuracy of every scorer (plus ``longer`` and ``random``) overall and per ``group_key`` value.

    ``scores`` maps a scorer name to ``(chosen_scores, rejected_scores)`` aligned with ``rows``;
    ``clusters`` (aligned with ``rows``, ``None``: every pair alone) gives each pair's cluster key,
    and a subset's interval resamples only the clusters of that subset's pairs.
    The same seed is used for every scorer, so their bootstrap resamples are paired.
    The ``random`` row keeps a binomial interval: a fair coin flips independently for every pair,
    even for pairs of one conversation, so clustering does not widen its spread.
    """
    scores = dict(scores)
    if baselines:
        scores["longer"] = longer_scores(rows)
    codes = cluster_codes(clusters, len(rows))
    subsets = {"all": np.arange(len(rows))}
    if group_key:
        for g in sorted({r[group_key] for r in rows}):
            subsets[g] = np.array([i for i, r in enumerate(rows) if r[group_key] == g], dtype=int)
    out = []
    for subset, idx in subsets.items():
        for name, (c, r) in scores.items():
            correct = pair_correct(np.asarray(c)[idx], np.asarray(r)[idx])
            out.append({"benchmark": benchmark, "subset": subset, "scorer": name,
                        **summarize(correct, n_samples, seed, clusters=codes[idx])})
        if baselines:
            lo, hi = chance_interval(len(idx), n_samples, seed)
            out.append({"benchmark": benchmark, "subset": subset, "scorer": "random", "n": int(len(idx)),
                        "clusters": n_clusters(codes[idx], len(idx)), "accuracy": 0.5, "ci_low": lo, "ci_high": hi})
    return out


def pick_examples(rows: Sequence[dict], chosen: Sequence[float], rejected: Sequence[float], k: int = 3) -> dict:
    """The ``k`` pairs the scorer gets most confidently right and most confidently wrong."""
    margin = np.asarray(chosen, dtype=float) - np.asarray(rejected, dtype=float)
    order = np.argsort(-margin)
    pack = lambda i: {**rows[i], "chosen_score": float(chosen[i]), "rejected_score": float(rejected[i]),  # noqa: E731
                      "margin": float(margin[i])}
    right = [pack(i) for i in order if margin[i] > 0][:k]
    wrong = [pack(i) for i in order[::-1] if margin[i] < 0][:k]
    return {"right": right, "wrong": wrong}
