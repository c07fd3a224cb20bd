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
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .batches import Batch, parse_batch
from .losses import PerSampleLoss
from .mask import quantile
from .stats import LossFn, eval_behaviour, param_names

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
    loss = loss_fn if isinstance(loss_fn, PerSampleLoss) else PerSampleLoss(loss_fn)
    parsed = parse_batch(batch)
    names = param_names(model, params)
    if params:
        parsed = parsed.to(params[0].device)
    theta = {n: p.detach() for n, p in zip(names, params)}
    tang = {n: t.to(p.dtype) for n, p, t in zip(names, params, tangents)}

    def losses(th: dict[str, Tensor]) -> Tensor:
        return loss.batched(model, parsed, functional_call(model, th, parsed.args, parsed.kwargs))

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
