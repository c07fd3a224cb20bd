"""Whole-update test (docs/design.md §3): is the masked step, as a whole, aligned with the batch gradient?

The per-coordinate test bounds the error of each kept coordinate, not of the step.  For the step
``θ ← θ − lr·m⊙u`` the question is the sign of ``⟨m⊙u, ∇L⟩``.  One forward-mode pass
(``torch.func.jvp`` along ``m⊙u``) over a batch gives every per-sample directional derivative
``d_k = ⟨m⊙u, g_k⟩`` at once, and the one-sided test ``mean(d) − q(c)·std(d)/√n ≥ 0`` accepts the
step with confidence ``c``.

Selection bias: a mask chosen on a batch and certified on the *same* batch is certified
optimistically (the kept coordinates are those whose batch mean happened to agree with ``u``).
Pass an independent check batch for an honest certificate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .hooks import _per_sample_losses
from .mask import quantile
from .stats import Batch, LossFn, _param_names, eval_behaviour, validate_batch

__all__ = ["directional_derivatives", "one_sided_test"]


def directional_derivatives(
    model: nn.Module,
    params: Sequence[Tensor],
    tangents: Sequence[Tensor],
    batch: Batch,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Per-sample ``d_k = ⟨tangent, ∇θ ℓ(f_θ(x_k), y_k)⟩`` (float32 at least), shape ``[n]``.

    ``params`` are parameters of ``model``; the others are held fixed.  Computed in eval behaviour,
    like the statistics."""
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    xs, y, _ = validate_batch(batch)
    names = _param_names(model, params)
    device = params[0].device if params else y.device
    xs = tuple(x.to(device) for x in xs)
    y = y.to(device)
    theta = {n: p.detach() for n, p in zip(names, params)}
    tang = {n: t.to(p.dtype) for n, p, t in zip(names, params, tangents)}

    def losses(th: dict[str, Tensor]) -> Tensor:
        return _per_sample_losses(loss_fn, functional_call(model, th, xs), y)

    with eval_behaviour(model), torch.no_grad(), warnings.catch_warnings():
        # torch's forward-AD decompositions still script a helper on first use
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        _, d = jvp(losses, (theta,), (tang,))
    return d.detach().to(torch.promote_types(d.dtype, torch.float32))


def one_sided_test(d: Tensor, confidence: float, kind: str = "normal") -> tuple[bool, float]:
    """Accept when ``mean(d) − q(c)·std(d)/√n ≥ 0`` (``q``: normal, or Student-t with ``n − 1``
    degrees of freedom for ``kind="t"``); returns ``(accepted, t)`` with the statistic
    ``t = mean/(std/√n)`` (``±inf`` when the standard error is 0 and the mean is not, 0 when all
    ``d`` are 0 — an empty step is trivially accepted)."""
    n = d.numel()
    if n < 2:
        raise ValueError(f"a whole-update test needs at least 2 samples, got {n}")
    d = d.double()
    mean = d.mean().item()
    se = d.std().item() / math.sqrt(n)
    q = quantile(confidence, n, kind)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return mean - q * se >= 0.0, t
