"""What every part of the calibration study shares: the confidence levels and quantiles it sweeps,
the pooled rate counter and the package's mask of one constraint."""

from __future__ import annotations

import math
from typing import Any

import torch

from masked_optim import Constraint, feasibility_mask, quantile

CONFIDENCES = (0.5, 0.8, 0.9, 0.95, 0.99)
KINDS = ("normal", "t")


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def binom_slack(p: float, m: int, k: float = 3.0) -> float:
    """k binomial standard errors of a rate p estimated from m independent Bernoulli draws."""
    return k * math.sqrt(max(p * (1 - p), 1e-12) / max(m, 1))


class Counter:
    """Accumulates (hits, total) pooled over trials, and the per-trial rates."""

    def __init__(self) -> None:
        self.hits, self.total, self.per_trial = 0, 0, []

    def add(self, hits: int, total: int) -> None:
        self.hits += int(hits)
        self.total += int(total)
        if total:
            self.per_trial.append(hits / total)

    def summary(self) -> dict[str, Any]:
        rate = self.hits / self.total if self.total else None
        pt = self.per_trial
        se = None
        if len(pt) > 1:
            m = sum(pt) / len(pt)
            se = math.sqrt(sum((r - m) ** 2 for r in pt) / (len(pt) - 1) / len(pt))
        return dict(rate=rate, hits=self.hits, total=self.total, trials=len(pt), se_across_trials=se)


def mask_from(u: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, n: int, c: float, kind: str, sign: int):
    """The package's mask of one constraint (public API), as bool."""
    con = Constraint(mean, m2, n, quantile(c, n, kind), sign)
    if sign > 0:
        return feasibility_mask(u, retain=con).bool()
    return feasibility_mask(u, forget=con).bool()
