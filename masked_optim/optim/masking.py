"""The mask and where it is applied: ``θ ← θ − lr·s·m⊙u`` (docs/design.md §3).

A step's masked updates are first all formed (the base optimizer's final update ``u`` of every
parameter, its state advanced as torch.optim would); then each gets its mask ``m`` from the
group's tests, the step length ``s`` is set (per tensor, group or every group), and only then does a
parameter move — plainly (:func:`apply_updates`), backed off by the retain guard
(:func:`guarded_apply`), or after the whole-update test (:mod:`.certification`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..fused import add_scaled_
from ..mask import (Constraint, Term, coeff, feasibility_mask, feasibility_masks, finite, keep, keep_mixed,
                    step_scale, step_scale_parts)
from .diagnostics import counts

__all__ = ["GUARD_HALVINGS", "GroupTests", "Move", "Side", "StepLengths", "Update", "apply_updates", "guarded_apply",
           "finite_update", "kept_counts", "masks_of", "moves_of", "step_lengths", "subset"]

Rescale = tuple[str, str, float]  # (how, scope, max_scale) of the step-length option
Move = tuple[Tensor, Tensor, float, "Tensor | None"]  # (θ, d, lr, s): the guard moves θ by −lr·s·d
GUARD_HALVINGS = 4  # retain_guard: 1, 1/2, …, 1/16 of the step, then none


class Side:
    """One side's test for a list of parameters: moments of one batch, threshold ``q`` and sign;
    ``[i]`` is parameter ``i``'s :class:`Constraint`, ``terms[i]`` the form the hard mask reads."""

    __slots__ = ("means", "m2s", "n", "q", "sign", "terms")

    def __init__(self, means: list[Tensor], m2s: list[Tensor], n: int, q: float, sign: int) -> None:
        self.means, self.m2s, self.n, self.q, self.sign = means, m2s, n, q, sign
        c = coeff(q, n)
        self.terms: list[Term] = [(mean, m2, sign, c) for mean, m2 in zip(means, m2s)]

    def __getitem__(self, i: int) -> Constraint:
        return Constraint(self.means[i], self.m2s[i], self.n, self.q, self.sign)

    def shifted(self, delta: float) -> Side:
        return Side(self.means, self.m2s, self.n, self.q + delta, self.sign)


class GroupTests:
    """One param group's tests (``None``: that side is not tested; neither: a mask of ones).

    ``free``: positions with no statistics (``requires_grad=False`` yet a ``.grad``), updated
    unmasked as torch.optim would; ``m2_scratch``: the second moments are the step's own ``Σg²``, so
    the last mask computed from them may use them as scratch."""

    def __init__(self, forget: Side | None, retain: Side | None, soft: bool, *, rescale: Rescale | None = None,
                 free: frozenset[int] = frozenset(), m2_scratch: bool = False, foreach: bool = False) -> None:
        self.forget, self.retain, self.soft = forget, retain, soft
        self.rescale, self.free, self.m2_scratch, self.foreach = rescale, free, m2_scratch, foreach
        # the hard mask's few-pass form needs thresholds q >= 0 (keep); either sign: keep_mixed
        self._strict = not soft and all(side.q >= 0 for side in (forget, retain) if side)

    def shifted(self, delta: float) -> GroupTests:
        """The same tests with every threshold raised by ``delta``."""
        return GroupTests(*(None if s is None else s.shifted(delta) for s in (self.forget, self.retain)), self.soft,
                          rescale=self.rescale, free=self.free, foreach=self.foreach)

    def mask(self, i: int, u: Tensor, last: bool = False) -> Tensor:
        """Parameter ``i``'s mask for ``u``; ``last``: no later call reads these statistics."""
        if i in self.free:
            return torch.ones_like(u)
        sides = [side for side in (self.forget, self.retain) if side]
        if not self.soft:  # the terms as they are (no Constraint objects): the step's hot path
            if self._strict:
                return keep(u, [side.terms[i] for side in sides], self.m2_scratch and last)
            return keep_mixed(u, [s.terms[i] for s in sides if s.q >= 0], [s.terms[i] for s in sides if s.q < 0])
        return feasibility_mask(u, self.forget[i] if self.forget else None, self.retain[i] if self.retain else None,
                                self.soft)

    def masks(self, idx: Sequence[int], us: Sequence[Tensor]) -> list[Tensor]:
        """The masks of several parameters with ``torch._foreach_*`` kernels (no free positions)."""
        return feasibility_masks(us, [self.forget[i] for i in idx] if self.forget else None,
                                 [self.retain[i] for i in idx] if self.retain else None, self.soft)


def subset(side: Side | None, idx: Sequence[int]) -> Side | None:
    """One side's test for the parameters at positions ``idx``."""
    if side is None:
        return None
    return Side([side.means[i] for i in idx], [side.m2s[i] for i in idx], side.n, side.q, side.sign)


@dataclasses.dataclass
class Update:
    """One parameter's masked update: ``param ← param − lr·s·m⊙u`` once its mask is known."""

    tests: GroupTests
    index: int  # the parameter's position in its group's tests
    param: Tensor
    u: Tensor  # may be the optimizer's own state (a momentum buffer): read only
    lr: float


def masks_of(updates: Sequence[Update], last: bool = False, tests: Callable[[GroupTests], GroupTests] | None = None,
             foreach: bool = False) -> list[Tensor]:
    """Every update's mask, by its group's tests (``tests``: maps them first, e.g. shifted);
    ``foreach``: groups that ask for it use the ``torch._foreach_*`` form."""
    out: list[Tensor | None] = [None] * len(updates)
    by_group: dict[int, list[int]] = {}
    for j, up in enumerate(updates):
        by_group.setdefault(id(up.tests), []).append(j)
    for js in by_group.values():
        t = updates[js[0]].tests
        t = tests(t) if tests is not None else t
        if foreach and t.foreach and not any(updates[j].index in t.free for j in js):
            for j, m in zip(js, t.masks([updates[j].index for j in js], [updates[j].u for j in js])):
                out[j] = m
        else:
            for j in js:
                out[j] = t.mask(updates[j].index, updates[j].u, last)
    return out  # type: ignore[return-value]


class StepLengths(NamedTuple):
    """What :func:`step_lengths` found, per update.

    ``scales``: the step-length factor (``None``: not rescaled). ``known_finite``: True where a CPU
    update's own ``‖u‖²`` came out finite, which makes every entry of ``u`` finite (the norm is formed
    anyway and reading it on the CPU costs no synchronisation): the moves may skip
    :func:`~masked_optim.mask.finite` there. ``products``: the ``m⊙u`` whose norm a tensor's own length
    took, when they were asked for (else ``None``), for :func:`moves_of` to scale in place."""

    scales: list[Tensor | None]
    known_finite: list[bool]
    products: list[Tensor | None]


def step_lengths(updates: Sequence[Update], ms: Sequence[Tensor], keep_products: bool = False) -> StepLengths:
    """The step length of each update: scope ``"tensor"`` sets each tensor's length, ``"group"`` one
    length per param group, ``"global"`` one length for every group that asks for it (pooled by
    ``(how, max_scale)``). ``keep_products``: keep the ``m⊙u`` of a tensor's own length instead of
    freeing it (the guard's moves reuse it)."""
    out: list[Tensor | None] = [None] * len(updates)
    known_finite = [False] * len(updates)
    products: list[Tensor | None] = [None] * len(updates)
    pools: dict[tuple, list[int]] = {}
    for j, up in enumerate(updates):
        if up.tests.rescale is None:
            continue
        how, scope, cap = up.tests.rescale
        key = (j,) if scope == "tensor" else (id(up.tests),) if scope == "group" else ("global", how, cap)
        pools.setdefault(key, []).append(j)
    alone: dict[tuple, list[int]] = {}  # one tensor per pool: the factors of equal options at once
    for js in pools.values():
        how, _, cap = updates[js[0]].tests.rescale  # type: ignore[misc]
        if len(js) == 1:
            alone.setdefault((how, cap), []).append(js[0])
            continue
        s = step_scale([ms[j] for j in js], [updates[j].u for j in js], how, cap)
        for j in js:
            out[j] = s
    for (how, cap), js in alone.items():
        parts = step_scale_parts([ms[j] for j in js], [updates[j].u for j in js], how, cap, keep_products)
        for j, s, mu in zip(js, parts.scales, parts.products):
            out[j], products[j] = s, mu
        for pos, full in parts.u_sq:
            if full.device.type == "cpu":
                for k, f in zip(pos, full.tolist()):
                    known_finite[js[k]] = math.isfinite(f)
    return StepLengths(out, known_finite, products)


def kept_counts(updates: Sequence[Update], ms: Sequence[Tensor]) -> dict[int, list[Tensor]]:
    """Kept counts per group (keyed by ``id`` of its tests), before any step length."""
    out: dict[int, list[Tensor]] = {}
    binary = not any(up.tests.soft for up in updates)  # hard masks (and free positions' ones): 0/1
    for up, c in zip(updates, counts(list(ms), binary) if ms else []):
        out.setdefault(id(up.tests), []).append(c)
    return out


def finite_update(up: Update, known: bool) -> Tensor:
    """``finite(u)``; ``u`` itself where :attr:`StepLengths.known_finite` says it is finite."""
    return up.u if known else finite(up.u)


def apply_updates(updates: Sequence[Update], ms: Sequence[Tensor], lengths: StepLengths) -> None:
    """``θ ← θ − lr·s·m⊙u`` for every update. A free position takes torch.optim's own update (a mask
    of ones would round differently); a dropped coordinate never moves, even where ``u`` is not
    finite (:func:`~masked_optim.mask.finite`, skipped where ``lengths.known_finite`` says ``u`` is:
    there it returns ``u`` itself)."""
    for up, m, s, known in zip(updates, ms, lengths.scales, lengths.known_finite):
        if up.index in up.tests.free:
            up.param.add_(up.u, alpha=-up.lr)
        else:
            up.param.addcmul_(finite_update(up, known), m if s is None else m * s.to(m.device), value=-up.lr)


def moves_of(updates: Sequence[Update], ms: Sequence[Tensor], lengths: StepLengths) -> list[Move]:
    """``(param, s·m⊙u, lr, None)`` of every update: what :func:`guarded_apply` moves (finite entries
    as in :func:`apply_updates`). A kept ``lengths.products[j]`` is scaled in place where that is the
    same number — a hard (0/1) mask and a finite ``u``: ``m·u`` is exact, so ``(m⊙u)·s`` rounds once,
    as ``u·(m·s)`` does (one pass instead of two)."""
    out: list[Move] = []
    for up, m, s, known, mu in zip(updates, ms, lengths.scales, lengths.known_finite, lengths.products):
        if mu is not None and known and not up.tests.soft:
            d = mu if s is None else mu.mul_(s.to(mu.device))
        else:
            d = finite_update(up, known) * (m if s is None else m * s.to(m.device))
        out.append((up.param, d, up.lr, None))
    return out


def _move(moves: Sequence[Move], factor: float) -> None:
    """``θ ← θ + factor·lr·(s·d)`` for every move; ``s·d`` is rounded as ``d.mul_(s)`` would round it."""
    scaled = []
    for p, d, lr, s in moves:
        if s is None:
            p.add_(d, alpha=lr * factor)
        else:
            scaled.append((p, d, s, lr * factor))
    if scaled:
        add_scaled_(*map(list, zip(*scaled)))


def guarded_apply(moves: Sequence[Move], loss_after: Callable[[], float], limit: float) -> float:
    """Apply ``θ ← θ − lr·s·d`` for every move ``(θ, d, lr, s)`` (``s``: ``None`` for 1), then back it
    off while ``loss_after()`` (the retain batch's mean loss at the moved parameters) exceeds
    ``limit``: halved up to :data:`GUARD_HALVINGS` times, then undone. Returns the share of the step
    that stays; the optimizer state is the base optimizer's either way."""
    _move(moves, -1.0)
    fraction = 1.0
    for k in range(GUARD_HALVINGS + 1):
        if loss_after() <= limit:
            return fraction
        new = 0.5 * fraction if k < GUARD_HALVINGS else 0.0
        _move(moves, fraction - new)
        fraction = new
    return fraction
