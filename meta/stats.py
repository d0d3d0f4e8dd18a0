"""Small, pure statistics for comparing optimizers across tasks (no scipy).

* :func:`mean_ci` - mean with a two-sided interval, Student-t (default) or a seeded percentile
  bootstrap;
* :func:`paired_diff_ci` - the same for the per-task differences ``a - b`` (paired comparison: the
  task-to-task variation that both optimizers share cancels);
* :func:`excludes_zero` - whether an interval lies entirely on one side of zero;
* :func:`t_quantile`, :func:`percentile` - the building blocks.

Intervals are returned as JSON-able dicts ``{"mean", "lo", "hi", "n", "level", "method"}``. With a
single observation an interval is undefined and ``lo``/``hi`` are ``None``. Inputs must be finite:
callers map divergences to a finite value (``task.normalizer``) before they get here.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Sequence

import torch

__all__ = [
    "t_quantile", "mean_ci", "bootstrap_ci", "paired_diff_ci", "excludes_zero", "percentile", "describe",
]


def _as_list(x: Iterable[float]) -> list[float]:
    if isinstance(x, torch.Tensor):
        x = x.detach().reshape(-1).tolist()
    values = [float(v) for v in x]
    if not values:
        raise ValueError("need at least one observation")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"observations must be finite, got {bad[:3]}")
    return values


# ---- Student t quantile ----------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df > 1e7:
        return NormalDist().inv_cdf(p)
    lo, hi = 0.0, max(2.0, NormalDist().inv_cdf(p))
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---- intervals -------------------------------------------------------------------------------
def _result(mean: float, lo: float | None, hi: float | None, n: int, level: float, method: str) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "level": level, "method": method}


def mean_ci(x: Iterable[float], level: float = 0.95, method: str = "t", *, n_boot: int = 10_000,
            seed: int = 0) -> dict:
    """Mean of ``x`` with a two-sided ``level`` interval (``method`` = ``"t"`` or ``"bootstrap"``)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if method == "bootstrap":
        return bootstrap_ci(x, level, n_boot=n_boot, seed=seed)
    if method != "t":
        raise ValueError(f"unknown interval method {method!r}; use 't' or 'bootstrap'")
    values = _as_list(x)
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return _result(mean, None, None, n, level, "t")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(0.5 + level / 2.0, n - 1) * math.sqrt(var / n)
    return _result(mean, mean - half, mean + half, n, level, "t")


def bootstrap_ci(x: Iterable[float], level: float = 0.95, *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean; deterministic given ``seed``."""
    values = _as_list(x)
    n = len(values)
    data = torch.tensor(values, dtype=torch.float64)
    mean = math.fsum(values) / n
    if n < 2:
        return _result(mean, None, None, n, level, "bootstrap")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (int(n_boot), n), generator=g)
    means = data[idx].mean(dim=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    # a constant sample gives lo == hi == mean up to rounding; keep the interval around the mean
    return _result(mean, min(lo, mean), max(hi, mean), n, level, "bootstrap")


def paired_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, method: str = "t",
                   **kw) -> dict:
    """Interval for the mean of the per-pair differences ``a[i] - b[i]``."""
    av, bv = _as_list(a), _as_list(b)
    if len(av) != len(bv):
        raise ValueError(f"paired samples must have equal length, got {len(av)} and {len(bv)}")
    return mean_ci([x - y for x, y in zip(av, bv)], level, method, **kw)


def excludes_zero(ci: dict) -> bool:
    """True when the interval ``[lo, hi]`` lies strictly above or strictly below zero."""
    lo, hi = ci.get("lo"), ci.get("hi")
    if lo is None or hi is None:
        return False
    return lo > 0.0 or hi < 0.0


def percentile(x: Iterable[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]), as ``numpy.percentile``'s default."""
    values = sorted(_as_list(x))
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    pos = (len(values) - 1) * q / 100.0
    i = int(math.floor(pos))
    j = min(i + 1, len(values) - 1)
    return values[i] + (values[j] - values[i]) * (pos - i)


def describe(x: Iterable[float], level: float = 0.95, method: str = "t", **kw) -> dict:
    """:func:`mean_ci` plus median and 10th / 90th percentiles."""
    values = _as_list(x)
    out = mean_ci(values, level, method, **kw)
    out.update(median=percentile(values, 50), p10=percentile(values, 10), p90=percentile(values, 90))
    return out
