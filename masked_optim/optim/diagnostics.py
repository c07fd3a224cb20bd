"""What a step did: diagnostics (never part of ``state_dict``) and the whole-update certificate."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["Certificate", "RawDiagnostics", "StepDiagnostics", "count", "counts", "total"]


@dataclasses.dataclass(frozen=True)
class StepDiagnostics:
    """What the last ``step()`` did. Never part of ``state_dict``.

    ``kept_fraction`` is the fraction of updated coordinates the mask kept (the mean weight for a
    soft mask; 1.0 when nothing was masked); ``direction`` is ``"grad"`` (the caller's ``p.grad``),
    ``"stats"`` (``retain_weight·μ_r − forget_weight·μ_f``) or ``"none"``.
    """

    skipped: bool
    reason: str | None
    direction: str
    kept_fraction: float
    kept_fraction_per_group: list[float]
    n_forget: int
    n_retain: int
    forget_loss: float | None
    retain_loss: float | None
    certificate: Certificate | None = None
    #: the share of the masked step that was applied: 1, or less when ``retain_guard`` backed it off
    step_fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class Certificate:
    """Outcome of the whole-update test of one step (``certify=c``).

    ``action``: ``"accepted"`` (the step passed as masked), ``"tightened"`` (thresholds raised by
    ``delta`` until it passed), ``"emptied"`` (nothing passed within ``certify_tries``: no coordinate
    moved), ``"skipped"`` (policy "skip": the step and its state update were undone).  ``retain_stat``
    and ``forget_stat`` are the t-statistics of the directional derivatives (``None``: not tested).
    """

    action: str
    tries: int
    delta: float
    retain_stat: float | None
    forget_stat: float | None
    confidence: float


@dataclasses.dataclass
class RawDiagnostics:
    # tensors are kept on device and only read when the user asks, so step() does not sync for them
    skipped: bool
    reason: str | None
    direction: str
    kept: list[list[Tensor] | None]  # per group: kept counts (0-dim), summed when read
    total: list[int]
    n_forget: int
    n_retain: int
    forget_loss: Tensor | None
    retain_loss: Tensor | None
    certificate: Certificate | None = None
    step_fraction: float = 1.0

    def materialise(self) -> StepDiagnostics:
        per_group = []
        kept_all, total_all = 0.0, 0
        for k, t in zip(self.kept, self.total):
            if k is None or t == 0:
                per_group.append(1.0)
                kept_all += t
            else:
                kv = float(total(k))
                per_group.append(kv / t)
                kept_all += kv
            total_all += t
        return StepDiagnostics(
            skipped=self.skipped,
            reason=self.reason,
            direction=self.direction,
            kept_fraction=kept_all / total_all if total_all else 1.0,
            kept_fraction_per_group=per_group,
            n_forget=self.n_forget,
            n_retain=self.n_retain,
            forget_loss=None if self.forget_loss is None else float(self.forget_loss),
            retain_loss=None if self.retain_loss is None else float(self.retain_loss),
            certificate=self.certificate,
            step_fraction=self.step_fraction,
        )


def count(m: Tensor) -> Tensor:
    """Exact count of a 0/1 mask in any dtype (a bfloat16 sum rounds past 256: 6037 ones gave 6036).
    A float32 sum of 0/1 values is exact below 2**24 elements and cheaper than float64."""
    return m.sum(dtype=torch.float32 if m.numel() < 1 << 24 and m.dtype != torch.float64 else torch.float64)


def counts(masks: list[Tensor], binary: bool = False) -> list[Tensor]:
    """:func:`count` of each mask, in one foreach reduction where torch has its float32 form.
    ``binary``: every mask holds only 0 and 1, so any exact sum gives the same counts: on CPU, where
    ``_foreach_norm`` runs one norm per tensor anyway, the plain sums (measured 2.5x faster for a
    small model's six tensors)."""
    if binary and masks and all(m.device.type == "cpu" for m in masks):
        return [count(m) for m in masks]
    if masks and all(m.numel() < 1 << 24 and m.dtype != torch.float64 for m in masks):
        try:
            return list(torch._foreach_norm(masks, 1, dtype=torch.float32))
        except (TypeError, RuntimeError):  # torch without the dtype argument
            pass
    return [count(m) for m in masks]


def total(counts: list[Tensor]) -> Tensor:
    """Exact float64 total of 0-dim counts (each exact in its own dtype) and of masks."""
    if not counts:
        return torch.zeros((), dtype=torch.float64)
    counts = [c if c.dim() == 0 else c.sum(dtype=torch.float64) for c in counts]
    if len({(c.dtype, c.device) for c in counts}) == 1:
        return torch.stack(counts).sum(dtype=torch.float64)
    return torch.stack([c.to(counts[0].device, torch.float64) for c in counts]).sum()
