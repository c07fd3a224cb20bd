"""Independent references for the tests: a plain per-sample loop with autograd, in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def loop_per_sample_grads(model: nn.Module, params, inputs, targets, loss_fn=None) -> list[torch.Tensor]:
    """Per-sample gradients stacked as ``[n, *p.shape]`` (float64), computed one sample at a time
    with ``torch.autograd.grad`` in eval mode (restored afterwards)."""
    loss_fn = loss_fn or F.cross_entropy
    xs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        rows = []
        for k in range(targets.shape[0]):
            out = model(*(x[k : k + 1] for x in xs))
            loss = loss_fn(out, targets[k : k + 1])
            rows.append([g.detach().double() for g in torch.autograd.grad(loss, list(params))])
    finally:
        for m, t in modes:
            m.training = t
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


def loop_moments(model, params, inputs, targets, loss_fn=None):
    """(n, mean, M2) per parameter from the per-sample loop (float64)."""
    G = loop_per_sample_grads(model, params, inputs, targets, loss_fn)
    n = targets.shape[0]
    means = [g.mean(0) for g in G]
    m2s = [((g - m) ** 2).sum(0) for g, m in zip(G, means)]
    return n, means, m2s


def reference_z(u_sign: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, n: int) -> torch.Tensor:
    """docs/design.md §3 z-score, written directly from the definition with explicit degenerate cases."""
    s_mu = u_sign.double() * mean.double()
    se = (m2.double() / (n - 1)).sqrt() / n**0.5 if n > 1 else torch.zeros_like(s_mu)
    z = torch.empty_like(s_mu)
    for i in range(s_mu.numel()):
        a, b = s_mu.view(-1)[i].item(), se.view(-1)[i].item()
        if a == 0:
            z.view(-1)[i] = 0.0
        elif b == 0:
            z.view(-1)[i] = float("inf") if a > 0 else float("-inf")
        else:
            z.view(-1)[i] = a / b
    return z


def tiny_mlp(seed: int = 0) -> nn.Module:
    """The optimizer tests' model: Linear(6, 12) – Tanh – Linear(12, 4)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def random_batches(seed: int, n_f: int = 10, n_r: int = 16):
    """A forget and a retain batch for :func:`tiny_mlp` (4 classes), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(n_f, 6, generator=g), torch.randint(0, 4, (n_f,), generator=g)),
        (torch.randn(n_r, 6, generator=g), torch.randint(0, 4, (n_r,), generator=g)),
    )


class FixedEngine:
    """Statistics chosen so that the mask is a fixed pattern whatever the sign of u (c < 0.5, se = 0):
    on ``frozen`` coordinates μ_r = μ_f = +1, so one of the two z's is −∞; elsewhere μ = 0, z = 0 > q."""

    def __init__(self, frozen):
        self.frozen = frozen

    def __call__(self, model, params, batch, loss_fn=None):
        from masked_optim import GradStats

        means = [f.float() for f in self.frozen]
        return GradStats(len(batch[1]), means, [torch.zeros_like(m) for m in means], torch.tensor(0.0))


def catch_error(fn) -> tuple[str, str]:
    """``(type name, message)`` of what ``fn()`` raised, ``("", "")`` if nothing: a worker process
    records it for the parent's assertions."""
    try:
        fn()
    except Exception as err:
        return type(err).__name__, str(err)
    return "", ""
