"""Rank correlations in NumPy (no SciPy dependency): Kendall's tau-b and Spearman's rho."""

from __future__ import annotations

import math

import numpy as np


def kendall_tau(x: np.ndarray, y: np.ndarray, chunk: int = 1024) -> float:
    """Kendall's tau-b: ``(C - D) / sqrt((n0 - n1) (n0 - n2))``.

    Over the ``n0 = n(n-1)/2`` index pairs i < j, C counts pairs ordered the same way by x
    and y, D pairs ordered oppositely, n1 pairs tied in x and n2 pairs tied in y. NaN when x
    or y is constant (or n < 2).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("kendall_tau needs two 1-d arrays of one length")
    n = len(x)
    if n < 2:
        return math.nan
    s = 0.0  # C - D
    tied_x = tied_y = 0.0
    for start in range(0, n, chunk):
        # each unordered pair is counted twice over the full square; halve at the end
        dx = np.sign(x[start : start + chunk, None] - x[None, :])
        dy = np.sign(y[start : start + chunk, None] - y[None, :])
        s += float((dx * dy).sum())
        tied_x += float((dx == 0).sum())
        tied_y += float((dy == 0).sum())
    n0 = n * (n - 1) / 2
    n1 = (tied_x - n) / 2  # minus the diagonal
    n2 = (tied_y - n) / 2
    denominator = math.sqrt((n0 - n1) * (n0 - n2))
    return (s / 2) / denominator if denominator > 0 else math.nan


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN if either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("spearman_rho needs two 1-d arrays of one length")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan
