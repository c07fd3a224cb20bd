"""Which masked steps run as one compiled pass per tensor (:mod:`masked_optim.fused`), and that step
with the optimizers' retain guard (docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .. import fused as fused_kernels
from .. import workspace
from .masking import GroupTests, Move, subset

__all__ = ["fused_positions", "fused_step"]


def fused_positions(group: dict[str, Any], params: list[Tensor], tests: GroupTests | None, certify: bool) -> list[int]:
    """The group's positions whose masked step runs as one compiled pass (``group["fused"]``: ``True``,
    ``False`` or ``None``, where it pays off). Only a masked group whose step length is set per
    tensor (or not at all), without frozen-after-backward positions and outside the whole-update test
    (which tries several masks) takes it."""
    if (tests is None or certify or tests.free or (tests.forget is None and tests.retain is None)
            or (tests.rescale is not None and tests.rescale[1] != "tensor")):
        return []
    return [i for i, p in enumerate(params) if fused_kernels.use_fused(group.get("fused"), p)]


def fused_step(update: Callable[..., list[Any]], group: dict[str, Any], params: list[Tensor],
               grads: list[Tensor | None], tests: GroupTests, idx: list[int], defer: bool,
               moves: list[Move],
               means: tuple[list[Tensor] | None, list[Tensor] | None] | None = None) -> list[Tensor]:
    """The fused masked step of ``params[idx]`` by ``update`` (the optimizer's ``_fused_update``):
    applied now, or (``defer``: the retain guard) the state advanced and the moves ``(param, m⊙u,
    lr, s)`` appended to ``moves``, for the guard to apply and back off. ``means``: the forget and retain
    means of ``params[idx]``, whose difference the pass forms as the direction (``grads`` unused).
    Returns the kept counts."""
    ps = [params[i] for i in idx]
    gs = None if means is not None else [grads[i] for i in idx]
    forget, retain = subset(tests.forget, idx), subset(tests.retain, idx)
    how, _, cap = tests.rescale if tests.rescale is not None else (None, "tensor", 100.0)
    deltas = [workspace.empty_like(p) for p in ps] if defer else None
    extra = {} if means is None else {"direction": fused_kernels.Direction(*means)}
    sums = update(group, ps, gs, forget, retain, soft=tests.soft, rescale=how, max_scale=cap, deltas=deltas,
                  **extra)
    if deltas is not None:
        for p, d, ss in zip(ps, deltas, sums):
            # the tensor's own length, from the pass's sums, rounded into s·d before the move as
            # d.mul_(s) would (the guard's compiled move keeps that rounding without the pass):
            # scaling inside the move (addcmul) changed a recorded defaults-study run (MNIST-1D)
            s = None if how is None else fused_kernels.scale_from_sums(how, [ss], [p.numel()], cap).to(d.dtype)
            moves.append((p, d, group["lr"], s))
    return [ss.kept for ss in sums]
