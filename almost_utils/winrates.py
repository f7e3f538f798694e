"""Pairwise win rates, raw and length-controlled, with intervals that resample questions.

Two policies answer the same questions; a judge gives each question an outcome for the first
policy: 1 (win), 0.5 (tie) or 0 (loss). The raw win rate is the mean outcome (a tie is half a
win). Judges reward length (our RM does, and so do LLM judges), so a policy can win by writing
more. The *length-controlled* win rate, as in length-controlled AlpacaEval, fits

    P(win) = sigmoid(theta + beta * tanh(d / s)),   d = chars(a) - chars(b),  s = std of d

to the outcomes (ties as half a win, a logistic loss over fractional labels) and reports
sigmoid(theta): the predicted win rate when both answers have the same length. ``beta`` says
how much the judge cares about length. Rows of :func:`pairwise_table`::

    {"a": "sft", "b": "sft_norm", "n": 80, "wins": 41, "ties": 3, "losses": 36,
     "win_rate": 0.53, "ci_low": 0.42, "ci_high": 0.64,
     "lc_win_rate": 0.47, "lc_ci_low": 0.35, "lc_ci_high": 0.60, "length_beta": 1.2,
     "mean_dchars": 85.0}
"""
from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np

RIDGE = 1e-3     # keeps the fit finite when one policy wins every question


def outcome_rows(answers: dict[str, list[dict]], verdict: Callable[[dict, dict], float],
                 policies: Sequence[str] | None = None) -> list[dict]:
    """Every pair of policies (in the given order) on every question both answered:
    ``{"a", "b", "id", "category", "outcome", "dchars"}``."""
    policies = list(policies or answers)
    rows = []
    for a, b in combinations(policies, 2):
        by_b = {r["id"]: r for r in answers[b]}
        for ra in answers[a]:
            rb = by_b.get(ra["id"])
            if rb is not None:
                rows.append({"a": a, "b": b, "id": ra["id"], "category": ra.get("category"),
                             "outcome": float(verdict(ra, rb)), "dchars": float(ra["chars"] - rb["chars"])})
    return rows


def fit_length_logistic(y: np.ndarray, x: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """``(theta, beta)`` minimising the logistic loss of fractional labels ``y`` on ``x`` (Newton)."""
    X = np.column_stack([np.ones_like(x), x])
    w = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + RIDGE * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def _stats(y: np.ndarray, d: np.ndarray, scale: float) -> tuple[float, float, float]:
    """(raw win rate, length-controlled win rate, beta) of one sample."""
    theta, beta = fit_length_logistic(y, np.tanh(d / scale))
    return float(y.mean()), float(1.0 / (1.0 + np.exp(-theta))), beta


def win_rates(outcomes: Sequence[float], dchars: Sequence[float], n_samples: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> dict:
    """Raw and length-controlled win rate of one pair, with bootstrap intervals over questions."""
    y, d = np.asarray(outcomes, dtype=float), np.asarray(dchars, dtype=float)
    n = len(y)
    if n == 0:
        return {"n": 0}
    scale = float(d.std()) or 1.0        # fixed for the resamples: the same length unit throughout
    raw, lc, beta = _stats(y, d, scale)
    rng = np.random.default_rng(seed)
    boot = np.array([_stats(y[i], d[i], scale)[:2] for i in rng.integers(0, n, size=(n_samples, n))])
    q = lambda j, t: float(np.quantile(boot[:, j], t))  # noqa: E731
    return {"n": n, "wins": int((y == 1).sum()), "ties": int((y == 0.5).sum()), "losses": int((y == 0).sum()),
            "win_rate": raw, "ci_low": q(0, alpha / 2), "ci_high": q(0, 1 - alpha / 2),
            "lc_win_rate": lc, "lc_ci_low": q(1, alpha / 2), "lc_ci_high": q(1, 1 - alpha / 2),
            "length_beta": beta, "mean_dchars": float(d.mean())}


def table(rows: list[dict], n_samples: int = 1000, seed: int = 0) -> list[dict]:
    """One :func:`win_rates` row per (a, b) pair of outcome rows, in first-seen order."""
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["a"], r["b"]), []).append(r)
    return [{"a": a, "b": b, **win_rates([r["outcome"] for r in got], [r["dchars"] for r in got], n_samples, seed)}
            for (a, b), got in pairs.items()]


def pairwise_table(answers: dict[str, list[dict]], verdict: Callable[[dict, dict], float],
                   n_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Win rates of every pair of policies under ``verdict`` (see the module docstring)."""
    return table(outcome_rows(answers, verdict), n_samples, seed)


def swap(row: dict) -> dict:
    """The same comparison seen from ``b``'s side (win rates and length difference mirrored)."""
    out = dict(row, a=row["b"], b=row["a"], wins=row["losses"], losses=row["wins"],
               win_rate=1 - row["win_rate"], ci_low=1 - row["ci_high"], ci_high=1 - row["ci_low"],
               lc_win_rate=1 - row["lc_win_rate"], lc_ci_low=1 - row["lc_ci_high"], lc_ci_high=1 - row["lc_ci_low"],
               mean_dchars=-row["mean_dchars"])
    return out
