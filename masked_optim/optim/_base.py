"""Machinery shared by the probably-aligned optimizers: batches, statistics, direction, mask, diagnostics."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..mask import RESCALE_MODES, RESCALE_SCOPES, Constraint, Term, _coeff, _keep, _keep_mixed, _finite, \
    _masked_add_terms, feasibility_mask, feasibility_masks, quantile, step_scale
from ..certify import directional_derivatives, one_sided_test
from ..batches import Batch, ParsedBatch, parse_batch
from ..hooks import HookEngine
from ..losses import PerSampleLoss
from ..stats import GradStats, StatsEngine, VmapEngine, acc_dtype, eval_behaviour, unwrap_model

__all__ = ["DEFAULT", "Certificate", "StepDiagnostics", "ProbablyAlignedOptimizer"]


class _Default:
    """Marks a mask keyword the caller did not give (see :data:`DEFAULT`); one instance, also
    through copies and pickles."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"  # pickled by reference to the module attribute

    def __copy__(self) -> _Default:
        return self

    def __deepcopy__(self, memo: dict) -> _Default:
        return self


#: Default of ``confidence`` and ``retain_confidence``: with neither given, the forget test runs at
#: :data:`FORGET_CONFIDENCE` and the retain test at :data:`RETAIN_CONFIDENCE`; a ``confidence`` the
#: caller gives applies to both tests (``None``: no mask), unless a side is given its own.
DEFAULT: Any = _Default()
FORGET_CONFIDENCE = 0.95
RETAIN_CONFIDENCE = 0.05  # q < 0: drop only coordinates whose step probably raises the retain loss
_MASK_KEYS = ("confidence", "forget_confidence", "retain_confidence", "quantile", "soft", "rescale", "rescale_scope",
              "max_scale")

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
class _RawDiagnostics:
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
                kv = float(_total(k))
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


_LAZY_MAX = 1 << 16  # elements: larger tensors take the fused update (masked_add_) when it applies
_GUARD_HALVINGS = 4  # retain_guard: 1, 1/2, …, 1/16 of the step, then none


class _Side:
    """One side's test for a list of parameters: moments of one batch, threshold ``q`` and sign;
    ``[i]`` is parameter ``i``'s :class:`Constraint`, ``terms[i]`` the form the hard mask reads."""

    __slots__ = ("means", "m2s", "n", "q", "sign", "terms")

    def __init__(self, means: list[Tensor], m2s: list[Tensor], n: int, q: float, sign: int) -> None:
        self.means, self.m2s, self.n, self.q, self.sign = means, m2s, n, q, sign
        coeff = _coeff(q, n)
        self.terms: list[Term] = [(mean, m2, sign, coeff) for mean, m2 in zip(means, m2s)]

    def __getitem__(self, i: int) -> Constraint:
        return Constraint(self.means[i], self.m2s[i], self.n, self.q, self.sign)

    def shifted(self, delta: float) -> _Side:
        return _Side(self.means, self.m2s, self.n, self.q + delta, self.sign)


Rescale = tuple[str, str, float]  # (how, scope, max_scale) of the step-length option


class _GroupMask:
    """Per-group mask inputs (``None``: that constraint is not tested). The update functionals hand
    it ``u`` and it applies ``θ ← θ − lr·s·m⊙u`` (``s``: the step-length factor, 1 without
    ``rescale``), recording the kept counts; when ``defer`` is set it only records ``u``, so that the
    whole step can be certified, or its length set over several tensors, before anything moves."""

    def __init__(
        self,
        forget: _Side | None,
        retain: _Side | None,
        soft: bool,
        defer: bool = False,
        m2_scratch: bool = False,
        rescale: Rescale | None = None,
        free: frozenset[int] = frozenset(),
    ) -> None:
        self.forget, self.retain, self.soft, self.defer = forget, retain, soft, defer
        # positions with no statistics (requires_grad=False, yet a .grad): updated unmasked, as by torch.optim
        self.free = free
        self.m2_scratch = m2_scratch  # the second moments are the step's own (Σg²): the mask may overwrite them
        self.rescale = rescale
        # a length set over a group or every group needs all of their masks first
        self.needs_all = rescale is not None and rescale[1] != "tensor"
        self.kept: list[Tensor] = []
        self.pending: list[tuple[int, Tensor, Tensor, float]] = []
        # masked_add_'s fused update needs a hard mask with thresholds q >= 0 (one q per side)
        self._fused = not soft and all(side.q >= 0 for side in (forget, retain) if side)

    def shifted(self, delta: float) -> _GroupMask:
        """The same tests with every threshold raised by ``delta``."""
        return _GroupMask(
            *(None if s is None else s.shifted(delta) for s in (self.forget, self.retain)), self.soft,
            rescale=self.rescale, free=self.free,
        )

    def apply_single(self, i: int, param: Tensor, u: Tensor, lr: float) -> None:
        if self.defer:
            self.pending.append((i, param, u.clone(), lr))
            return
        if i in self.free:  # torch.optim's own update (a mask of ones would round differently)
            param.add_(u, alpha=-lr)
            self.kept.append(torch.full((), u.numel(), dtype=torch.float64, device=u.device))
            return
        if self.rescale is not None:  # per-tensor length: the whole mask is needed before the update
            m = self.single(i, u, last=True)
            self.kept.append(m.sum(dtype=torch.float64))
            how, _, cap = self.rescale
            param.addcmul_(_finite(u), m.mul_(step_scale([m], [u], how, cap)), value=-lr)
            return
        if self._fused and u.numel() > _LAZY_MAX and i not in self.free:  # cache-sized chunks on CPU
            terms = [side.terms[i] for side in (self.forget, self.retain) if side]
            self.kept.append(_masked_add_terms(param, u, terms, -lr))
            return
        m = self.single(i, u, last=True)
        param.addcmul_(_finite(u), m, value=-lr)
        # a 0-dim count, summed only if the diagnostics are read: a mask held until the next step
        # would keep a copy of every small parameter alive
        self.kept.append(_count(m))

    def apply_many(self, idx: Sequence[int], params: list[Tensor], us: list[Tensor], lr: float) -> None:
        if self.defer:
            self.pending.extend((i, p, u.clone(), lr) for i, p, u in zip(idx, params, us))
            return
        if self.free and not self.free.isdisjoint(idx):  # rare: not worth a foreach path of its own
            for i, p, u in zip(idx, params, us):
                self.apply_single(i, p, u, lr)
            return
        masks = self.many(idx, us)
        if self.rescale is not None:
            self.kept.extend(m.sum(dtype=torch.float64) for m in masks)
            how, _, cap = self.rescale
            for m, u in zip(masks, us):
                m.mul_(step_scale([m], [u], how, cap))
        else:
            self.kept.extend(_counts(masks))
        torch._foreach_addcmul_(params, [_finite(u) for u in us], masks, value=-lr)

    def single(self, i: int, u: Tensor, last: bool = False) -> Tensor:
        """Parameter ``i``'s mask for ``u``; ``last``: no later call reads these statistics, so the
        step's own ``Σg²`` tensors may hold the temporaries."""
        if i in self.free:
            return torch.ones_like(u)
        if not self.soft:  # the terms as they are (no Constraint objects): the step's hot path
            sides = [side for side in (self.forget, self.retain) if side]
            if self._fused:
                return _keep(u, [side.terms[i] for side in sides], self.m2_scratch and last)
            return _keep_mixed(u, [s.terms[i] for s in sides if s.q >= 0], [s.terms[i] for s in sides if s.q < 0])
        return feasibility_mask(
            u,
            self.forget[i] if self.forget else None,
            self.retain[i] if self.retain else None,
            self.soft,
        )

    def many(self, idx: Sequence[int], us: Sequence[Tensor]) -> list[Tensor]:
        return feasibility_masks(
            us,
            [self.forget[i] for i in idx] if self.forget else None,
            [self.retain[i] for i in idx] if self.retain else None,
            self.soft,
        )


Pending = list[tuple[_GroupMask, tuple[int, Tensor, Tensor, float]]]


def _pending(masks: Sequence[_GroupMask | None]) -> Pending:
    return [(gm, item) for gm in masks if gm is not None for item in gm.pending]


def _scales(pending: Pending, ms: Sequence[Tensor]) -> list[Tensor | None]:
    """The step-length factor of each deferred update (``None``: not rescaled). Scope ``"tensor"``
    sets each tensor's length, ``"group"`` one length per param group, ``"global"`` one length for
    every group that asks for it (pooled by ``(how, max_scale)``)."""
    out: list[Tensor | None] = [None] * len(pending)
    pools: dict[tuple, list[int]] = {}
    for j, (gm, _) in enumerate(pending):
        if gm.rescale is None:
            continue
        how, scope, cap = gm.rescale
        key = (j,) if scope == "tensor" else (id(gm),) if scope == "group" else ("global", how, cap)
        pools.setdefault(key, []).append(j)
    for js in pools.values():
        how, _, cap = pending[js[0]][0].rescale  # type: ignore[misc]
        s = step_scale([ms[j] for j in js], [pending[j][1][2] for j in js], how, cap)
        for j in js:
            out[j] = s
    return out


def _apply_pending(pending: Pending, ms: Sequence[Tensor]) -> None:
    """``θ ← θ − lr·s·m⊙u`` for every deferred update, recording the kept counts (before ``s``)."""
    for (gm, (_, p, u, lr)), m, s in zip(pending, ms, _scales(pending, ms)):
        gm.kept.append(m.sum(dtype=torch.float64))
        p.addcmul_(_finite(u), m if s is None else m * s.to(m.device), value=-lr)


def _count(m: Tensor) -> Tensor:
    """Exact count of a 0/1 mask in any dtype (a bfloat16 sum rounds past 256: 6037 ones gave 6036).
    A float32 sum of 0/1 values is exact below 2**24 elements and cheaper than float64."""
    return m.sum(dtype=torch.float32 if m.numel() < 1 << 24 and m.dtype != torch.float64 else torch.float64)


def _counts(masks: list[Tensor]) -> list[Tensor]:
    """:func:`_count` of each mask, in one foreach reduction where torch has its float32 form."""
    if masks and all(m.numel() < 1 << 24 and m.dtype != torch.float64 for m in masks):
        try:
            return list(torch._foreach_norm(masks, 1, dtype=torch.float32))
        except (TypeError, RuntimeError):  # torch without the dtype argument
            pass
    return [_count(m) for m in masks]


def _total(counts: list[Tensor]) -> Tensor:
    """Exact float64 total of 0-dim counts (each exact in its own dtype) and of masks."""
    if not counts:
        return torch.zeros((), dtype=torch.float64)
    counts = [c if c.dim() == 0 else c.sum(dtype=torch.float64) for c in counts]
    if len({(c.dtype, c.device) for c in counts}) == 1:
        return torch.stack(counts).sum(dtype=torch.float64)
    return torch.stack([c.to(counts[0].device, torch.float64) for c in counts]).sum()


def _validate_confidence(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be None or a float in (0, 1), got {value!r}")


class ProbablyAlignedOptimizer(Optimizer):
    """Base class: subclasses implement ``_update_group(group, params, grads, mask)``, which advances
    the base optimizer's state exactly as torch.optim would and hands each final update ``u`` to
    ``mask.apply_single``/``mask.apply_many`` (or applies ``θ ← θ − lr·u`` itself when ``mask`` is
    ``None``)."""

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor] | str | None,
        confidence: float | None,
        forget_confidence: float | None,
        retain_confidence: float | None,
        quantile: str,
        soft: bool,
        chunk_size: int | None,
        engine: StatsEngine | str | None,
        forget_weight: float,
        retain_weight: float,
        certify: float | None = None,
        certify_policy: str = "tighten",
        certify_tries: int = 8,
        retain_guard: float | None = 0.05,
        rescale: str | None = "norm",
        rescale_scope: str = "tensor",
        max_scale: float = 100.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._loss = PerSampleLoss(loss_fn)  # validates it
        if forget_weight < 0 or retain_weight < 0:
            raise ValueError("forget_weight and retain_weight must be non-negative")
        if retain_confidence is DEFAULT:
            retain_confidence = RETAIN_CONFIDENCE if confidence is DEFAULT else None
        if confidence is DEFAULT:
            confidence = FORGET_CONFIDENCE
        defaults = dict(
            defaults,
            confidence=confidence,
            forget_confidence=forget_confidence,
            retain_confidence=retain_confidence,
            quantile=quantile,
            soft=soft,
            rescale=rescale,
            rescale_scope=rescale_scope,
            max_scale=max_scale,
        )
        self.model = model
        self.loss_fn = loss_fn
        self.engine: StatsEngine = _make_engine(engine, chunk_size)
        _validate_confidence(certify, "certify")
        if certify_policy not in ("tighten", "skip"):
            raise ValueError(f"certify_policy must be 'tighten' or 'skip', got {certify_policy!r}")
        if not isinstance(certify_tries, int) or certify_tries < 1:
            raise ValueError(f"certify_tries must be a positive int, got {certify_tries!r}")
        self.certify, self.certify_policy, self.certify_tries = certify, certify_policy, certify_tries
        if retain_guard is not None:
            if isinstance(retain_guard, bool) or not isinstance(retain_guard, (int, float)) or not (
                    0.0 <= retain_guard < math.inf):
                raise ValueError(f"retain_guard must be None or a finite number >= 0, got {retain_guard!r}")
        self.retain_guard = retain_guard
        self.forget_weight = float(forget_weight)
        self.retain_weight = float(retain_weight)
        self._model_param_ids = {id(p) for p in model.parameters()}
        # a list, not a tuple attribute: wrappers that copy the optimizer's __dict__ (Lightning's
        # LightningOptimizer) share it, so stage() through them reaches the next step
        self._staging: list[Batch | None] = [None, None]
        self._raw_diag: _RawDiagnostics | None = None
        self._warned_unmasked = False
        self._warned_same_batch = False
        super().__init__(params, defaults)

    # -- configuration ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "confidence" in param_group:  # a group's own confidence applies to both of its tests
            param_group = {"forget_confidence": None, "retain_confidence": None, **param_group}
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except Exception:
            # torch has appended the group already: a rejected group must not stay and break every step
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        for key in ("confidence", "forget_confidence", "retain_confidence"):
            _validate_confidence(group[key], key)
        if group["quantile"] not in ("normal", "t"):
            raise ValueError(f"quantile must be 'normal' or 't', got {group['quantile']!r}")
        if group["rescale"] not in RESCALE_MODES:
            raise ValueError(f"rescale must be None, 'count' or 'norm', got {group['rescale']!r}")
        if group["rescale_scope"] not in RESCALE_SCOPES:
            raise ValueError(f"rescale_scope must be 'tensor', 'group' or 'global', got {group['rescale_scope']!r}")
        cap = group["max_scale"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 1.0 <= cap < math.inf:
            raise ValueError(f"max_scale must be a finite number >= 1, got {cap!r}")
        if group.get("fused"):
            raise ValueError(f"{type(self).__name__} does not support fused=True")
        if group.get("differentiable"):
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        for i, p in enumerate(group["params"]):
            if id(p) not in self._model_param_ids:
                raise ValueError(
                    f"parameter {i} of group {len(self.param_groups) - 1} (shape {tuple(p.shape)}) is not a "
                    "parameter of `model`: per-sample statistics can only be computed for the model's own "
                    "parameters"
                )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups (it drops its hooks on purpose);
        # this optimizer's configuration lives in attributes (model, engine, certify, loss_fn, …), so
        # a copy or a pickle without them could not step. Every attribute but torch's hooks travels;
        # the ids of the model's parameters are recomputed for the copy's own model (__setstate__).
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if not key.startswith("_optimizer_") and key != "_model_param_ids":
                state.setdefault(key, value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "model" in state:  # a copy or an unpickled optimizer: its own model's parameters
            self._model_param_ids = {id(p) for p in self.model.parameters()}
        for group in self.param_groups:
            if "confidence" not in group:  # saved by torch.optim: this optimizer's own mask settings
                for key in _MASK_KEYS:
                    group.setdefault(key, self.defaults[key])
                continue
            group.setdefault("forget_confidence", None)
            group.setdefault("retain_confidence", None)
            group.setdefault("quantile", "normal")
            group.setdefault("soft", False)
            # saved before the step-length option existed: keep the unscaled step it was taking
            group.setdefault("rescale", None)
            group.setdefault("rescale_scope", "tensor")
            group.setdefault("max_scale", 100.0)

    @staticmethod
    def _effective(group: dict[str, Any], side: str) -> float | None:
        own = group[f"{side}_confidence"]
        return own if own is not None else group["confidence"]

    # -- public API --------------------------------------------------------------------------------
    def stage(self, forget: Batch | None = None, retain: Batch | None = None) -> None:
        """Stage the batches for the next ``step()`` (for trainers that only call ``step()`` or
        ``step(closure)``). Batches passed to ``step`` directly take precedence; staged ones are
        used once."""
        if forget is not None:
            parse_batch(forget, "forget")
        if retain is not None:
            parse_batch(retain, "retain")
        self._staging[:] = [forget, retain]

    @property
    def diagnostics(self) -> StepDiagnostics | None:
        """Diagnostics of the last step (``None`` before the first). Reading it synchronises."""
        return None if self._raw_diag is None else self._raw_diag.materialise()

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        forget: Batch | None = None,
        retain: Batch | None = None,
        check_forget: Batch | None = None,
        check_retain: Batch | None = None,
    ) -> Any:
        """Masked optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss; run first (its backward sets the
                direction).
            forget: ``(inputs, targets)`` of the forget set, with the true labels.
            retain: ``(inputs, targets)`` of the retain set.
            check_forget, check_retain: independent batches for the whole-update test (``certify``);
                by default the test reuses ``forget``/``retain``, which is optimistic.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        staged_f, staged_r = self._staging
        self._staging[:] = [None, None]
        forget = forget if forget is not None else staged_f
        retain = retain if retain is not None else staged_r

        # ---- validation: nothing below mutates anything until all checks have passed ----
        parsed_f, parsed_r, has_grad = self._checked_inputs(forget, retain, check_forget, check_retain)
        n_f = parsed_f.n if parsed_f is not None else 0
        n_r = parsed_r.n if parsed_r is not None else 0
        test_f = forget is not None and any(self._effective(g, "forget") is not None for g in self.param_groups)
        test_r = retain is not None and any(self._effective(g, "retain") is not None for g in self.param_groups)
        want_f = test_f or (not has_grad and forget is not None)
        want_r = test_r or (not has_grad and retain is not None)
        if (
            not self._warned_unmasked
            and has_grad
            and not (test_f or test_r)
            and any(self._effective(g, s) is not None for g in self.param_groups for s in ("forget", "retain"))
        ):
            warnings.warn(
                f"{type(self).__name__}.step() got no forget/retain batch: the update is not masked",
                stacklevel=2,
            )
            self._warned_unmasked = True

        # ---- statistics ----
        stat_params = self._stat_params()
        sq = False  # whether the statistics' m2 lists hold Σg² (see _pair_stats)
        if want_f and want_r and callable(getattr(self.engine, "pair", None)):
            stats_f, stats_r, sq = self._pair_stats(stat_params, forget, retain)  # one pass
        else:
            # engines get the batches as the caller gave them (a custom engine's contract)
            stats_f = self._stats(stat_params, forget) if want_f else None
            stats_r = self._stats(stat_params, retain) if want_r else None
        index = {id(p): i for i, p in enumerate(stat_params)}
        # checked on the statistics' n, which a distributed engine makes the global batch size
        for side, stats, tested in (("forget", stats_f, test_f), ("retain", stats_r, test_r)):
            if tested and stats is not None and stats.n < 2:
                for g in self.param_groups:
                    c = self._effective(g, side)
                    if c is not None and c != 0.5:
                        raise ValueError(
                            f"the {side} batch has {stats.n} sample: a variance needs at least 2 "
                            f"(or {side} confidence exactly 0.5, plain sign agreement)"
                        )
        n_f = stats_f.n if stats_f is not None else n_f
        n_r = stats_r.n if stats_r is not None else n_r

        direction = "grad" if has_grad else ("stats" if (stats_f or stats_r) else "none")
        stat_grads: dict[int, Tensor] = {}
        if direction == "stats":
            stat_grads = self._stats_direction(stat_params, stats_f, stats_r)

        # ---- non-finite guard: one host sync for everything the update will read ----
        # a non-finite per-sample gradient makes its batch mean non-finite too; M2 alone can only
        # overflow to +inf, which the mask reads as "not significant", never as NaN
        to_check: list[Tensor] = []
        if direction == "stats":  # built from every mean there is: non-finite means reach it
            to_check += list(stat_grads.values())
        else:
            for s in (stats_f, stats_r):
                if s is not None:
                    to_check += s.mean
        if has_grad:
            to_check += [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if to_check and not _all_finite(to_check):
            self._raw_diag = _RawDiagnostics(
                True, "non-finite gradients or statistics", direction, [None] * len(self.param_groups),
                [0] * len(self.param_groups), n_f, n_r,
                None if stats_f is None else stats_f.loss, None if stats_r is None else stats_r.loss,
            )
            return loss

        step_fraction = 1.0
        certify = self.certify is not None and (test_f or test_r)
        # only a masked step is guarded: with no test on either side the optimizer is torch.optim
        # (certify's whole-update test replaces the guard when both are set)
        guard = (self.retain_guard is not None and not certify and (test_f or test_r) and retain is not None
                 and stats_r is not None)
        work = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = p.grad if has_grad else stat_grads.get(id(p))
                if g is not None:
                    params.append(p)
                    grads.append(g)
            mask = self._group_mask(group, params, index, stats_f, stats_r, test_f, test_r, sq)
            if (certify or guard) and mask is None and params:
                # an unmasked group is still part of the step the test certifies (and may skip)
                mask = _GroupMask(None, None, False)
            work.append((group, params, grads, mask))
        snapshot = self._snapshot_state(work) if certify and self.certify_policy == "skip" else None
        for group, params, grads, mask in work:
            if mask is not None:
                mask.defer = certify or guard or mask.needs_all
            self._update_group(group, params, grads, mask, grads_owned=direction == "stats")
        report = None
        if certify and test_r and check_retain is None and not self._warned_same_batch:
            warnings.warn(
                "certify reuses the retain batch the mask was chosen on, which certifies optimistically; "
                "pass an independent check_retain batch for an honest whole-update test",
                stacklevel=2,
            )
            self._warned_same_batch = True
        if certify:
            report = self._certify(
                [w[3] for w in work],
                check_forget if check_forget is not None else (forget if test_f else None),
                check_retain if check_retain is not None else (retain if test_r else None),
            )
            if report.action == "skipped":
                self._restore_state(snapshot)
        else:
            pending = _pending([w[3] for w in work])
            if pending:  # lengths set over groups, or a guarded step: every mask is known now
                ms = [gm.single(i, u) for gm, (i, _, u, _) in pending]
                if guard:
                    step_fraction = self._guarded_apply(pending, ms, retain, stats_r.loss)
                else:
                    _apply_pending(pending, ms)
        kept = [None if m is None else m.kept for _, _, _, m in work]
        total = [sum(p.numel() for p in params) for _, params, _, _ in work]
        skipped = report is not None and report.action == "skipped"
        self._raw_diag = _RawDiagnostics(
            skipped, "whole-update test failed" if skipped else None, direction, kept, total, n_f, n_r,
            None if stats_f is None else stats_f.loss, None if stats_r is None else stats_r.loss, report,
            step_fraction,
        )
        return loss

    def _checked_inputs(
        self, forget: Batch | None, retain: Batch | None, check_forget: Batch | None,
        check_retain: Batch | None,
    ) -> tuple[ParsedBatch | None, ParsedBatch | None, bool]:
        """The step's input checks: the parsed forget and retain batches and whether any parameter has
        a gradient. A distributed engine (``agree_on_checks``) decides them on every rank at once: a
        rank that raised alone would leave the others waiting in the statistics' collectives; and
        the whole-update test gathers every rank's check samples, so its 2 samples are counted over
        all ranks."""
        error: Exception | None = None
        parsed_f = parsed_r = None
        has_grad = False
        checks = (("check_forget", check_forget), ("check_retain", check_retain))
        counts = [0, 0]
        try:
            parsed_f = parse_batch(forget, "forget") if forget is not None else None
            parsed_r = parse_batch(retain, "retain") if retain is not None else None
            counts = [parse_batch(b, name).n if b is not None else 0 for name, b in checks]
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        has_grad = True
                        if p.grad.is_sparse:
                            raise ValueError(f"{type(self).__name__} does not support sparse gradients")
        except Exception as err:
            error = err
        agree = getattr(self.engine, "agree_on_checks", None)
        if callable(agree):
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            counts = agree(error, counts, device)  # raises on every rank when any failed
        elif error is not None:
            raise error
        for (name, b), n in zip(checks, counts):
            if b is not None and n < 2 and self.certify is not None:
                raise ValueError(f"{name} needs at least 2 samples for the whole-update test")
        return parsed_f, parsed_r, has_grad

    # -- whole-update certification ----------------------------------------------------------------
    def _certify(
        self, masks: list[_GroupMask | None], check_forget: Batch | None, check_retain: Batch | None
    ) -> Certificate:
        """Pick the smallest threshold shift whose masked step passes the whole-update tests, apply
        it (or nothing, for the "skip" policy) and report."""
        pending = _pending(masks)
        # one test of the whole step, so one threshold: Student-t (the exact small-sample rule, for
        # c > 0.5 the stricter one) as soon as any group asks for it
        kind = "t" if any(g["quantile"] == "t" for g in self.param_groups) else "normal"
        params = [p for _, (_, p, _, _) in pending]

        def evaluate(delta: float) -> tuple[bool, float | None, float | None, list[Tensor]]:
            shifted = {id(gm): gm.shifted(delta) if delta else gm for gm in masks if gm is not None}
            ms = [shifted[id(gm)].single(i, u) for gm, (i, _, u, _) in pending]
            tangents = [m * _finite(u) if s is None else m * _finite(u) * s.to(m.device)
                        for m, (_, (_, _, u, _)), s in zip(ms, pending, _scales(pending, ms))]
            ok, t_r, t_f = True, None, None
            if check_retain is not None:  # ⟨m⊙u, g_r⟩ ≥ 0: the step does not raise the retain loss
                passed, t_r = one_sided_test(self._directional(params, tangents, check_retain), self.certify, kind)
                ok &= passed
            if check_forget is not None and ok:  # ⟨m⊙u, g_f⟩ ≤ 0: the step raises the forget loss
                passed, t_f = one_sided_test(-self._directional(params, tangents, check_forget), self.certify, kind)
                ok &= passed
            return ok, t_r, t_f, ms

        tries = 1
        ok, t_r, t_f, ms = evaluate(0.0)
        delta, action = 0.0, "accepted"
        if not ok and self.certify_policy == "skip":
            return Certificate("skipped", tries, 0.0, t_r, t_f, self.certify)
        if not ok:
            # grow the shift until a step passes, then bisect between the last failure and it
            lo, hi, best = 0.0, None, None
            step = 0.5
            while tries < self.certify_tries:
                mid = step if hi is None else 0.5 * (lo + hi)
                tries += 1
                res = evaluate(mid)
                if res[0]:
                    hi, best = mid, res
                else:
                    lo = mid
                    step *= 2.0
            if best is None:  # nothing passed in the budget: the empty step is trivially safe
                delta, action, ms, t_r, t_f = math.inf, "emptied", [torch.zeros_like(u) for _, (_, _, u, _) in pending], None, None
            else:
                delta, action = hi, "tightened"
                _, t_r, t_f, ms = best
        _apply_pending(pending, ms)
        return Certificate(action, tries, delta, t_r, t_f, self.certify)

    def _guarded_apply(self, pending: Pending, ms: Sequence[Tensor], retain: Batch, before: Tensor) -> float:
        """Apply the masked step, then back it off while the retain batch's mean loss after it exceeds
        ``before + retain_guard``: halved up to ``_GUARD_HALVINGS`` times, then undone. Returns the
        share of the step that stays. The optimizer state is the base optimizer's either way."""
        deltas = []
        for (gm, (_, p, u, lr)), m, s in zip(pending, ms, _scales(pending, ms)):
            gm.kept.append(m.sum(dtype=torch.float64))
            d = _finite(u) * (m if s is None else m * s.to(m.device))
            p.add_(d, alpha=-lr)
            deltas.append((p, d, lr))
        limit = float(before) + float(self.retain_guard)
        fraction = 1.0
        for k in range(_GUARD_HALVINGS + 1):
            if float(self._batch_loss(retain)) <= limit:
                return fraction
            new = 0.5 * fraction if k < _GUARD_HALVINGS else 0.0
            for p, d, lr in deltas:
                p.add_(d, alpha=lr * (fraction - new))
            fraction = new
        return fraction

    def _batch_loss(self, batch: Batch) -> Tensor:
        """Mean loss of ``batch`` at the current parameters, in eval behaviour as the statistics are."""
        model = unwrap_model(self.model)
        dev = next(model.parameters()).device
        parsed = parse_batch(batch).to(dev)
        with torch.no_grad(), eval_behaviour(model), torch.autocast(dev.type, enabled=False):
            return self._loss.mean(model, parsed, parsed.call(model))

    def _snapshot_state(self, work: list) -> dict[int, tuple[Tensor, dict[str, Any]]]:
        snap = {}
        for _, params, _, _ in work:
            for p in params:
                st = self.state.get(p, {})
                snap[id(p)] = (p, {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()})
        return snap

    def _restore_state(self, snap: dict[int, tuple[Tensor, dict[str, Any]]] | None) -> None:
        for p, st in (snap or {}).values():
            if st:
                self.state[p] = st
            else:
                self.state.pop(p, None)

    # -- internals ---------------------------------------------------------------------------------
    def _stat_params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _stats(self, params: list[Tensor], batch: Batch) -> GradStats:
        with self._engine_context(params):
            return self.engine(unwrap_model(self.model), params, batch, self._loss)

    def _pair_stats(self, params: list[Tensor], forget: Batch, retain: Batch) -> tuple[GradStats, GradStats, bool]:
        """Statistics of both batches in one pass, and whether their ``m2`` lists hold ``Σg²``: the hook
        engine offers it, saving two passes over the statistics, and every test here is a hard one
        (either sign of ``q``), which reads ``Σg²`` exactly with an adjusted threshold (_group_mask)."""
        model = unwrap_model(self.model)
        with self._engine_context(params):
            if isinstance(self.engine, HookEngine) and self._hard_tests_only():
                f, r = self.engine.pair(model, params, forget, retain, self._loss, sq=True)
                return f, r, True
            stats_f, stats_r = self.engine.pair(model, params, forget, retain, self._loss)  # type: ignore[attr-defined]
        return stats_f, stats_r, False

    def _hard_tests_only(self) -> bool:
        if self.certify is not None:  # its threshold shifts are defined on M2
            return False
        return not any(g["soft"] for g in self.param_groups)

    def _engine_context(self, params: list[Tensor]) -> contextlib.AbstractContextManager:
        # the engines need the bare module (unwrap_model): DDP's forward syncs buffers, hooks on an
        # already compiled module see nothing, and torch.func through it disables dynamo; the caller's
        # autocast would lower the statistics' precision (docs/design.md §4: float32 at least)
        dev = params[0].device.type if params else "cpu"
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad())
        if _autocast_enabled(dev):
            stack.enter_context(torch.autocast(dev, enabled=False))
        return stack

    def _directional(self, params: list[Tensor], tangents: list[Tensor], batch: Batch) -> Tensor:
        dev = params[0].device.type if params else "cpu"
        with torch.autocast(dev, enabled=False):
            d = directional_derivatives(unwrap_model(self.model), params, tangents, batch, self._loss)
        # a distributed engine gathers every rank's values: all ranks test the global batch
        gather = getattr(self.engine, "gather_samples", None)
        return gather(d) if gather is not None else d

    def _stats_direction(
        self, params: list[Tensor], stats_f: GradStats | None, stats_r: GradStats | None
    ) -> dict[int, Tensor]:
        """``retain_weight·μ_r − forget_weight·μ_f`` per parameter, as fresh tensors."""
        out = {}
        for i, p in enumerate(params):
            r = None if stats_r is None else _as(stats_r.mean[i], p.dtype)
            f = None if stats_f is None else _as(stats_f.mean[i], p.dtype)
            out[id(p)] = self._combine(r, f)
        return out

    def _combine(self, r: Tensor | None, f: Tensor | None) -> Tensor:
        if r is not None and f is not None:
            if self.retain_weight == 1:
                return torch.sub(r, f, alpha=self.forget_weight)
            return r * self.retain_weight - f * self.forget_weight
        if r is not None:
            return r * self.retain_weight
        return f * -self.forget_weight  # type: ignore[operator]

    def _group_mask(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        index: dict[int, int],
        stats_f: GradStats | None,
        stats_r: GradStats | None,
        test_f: bool,
        test_r: bool,
        sq: bool = False,
    ) -> _GroupMask | None:
        """The group's tests; ``sq``: the statistics hold ``Σg²`` in place of M2 (hard tests). With
        M2 = Σg² − nμ², the comparison μ² > q²·M2/(n(n−1)) — of the test itself for q > 0, of its
        "confidently misaligned" drop rule for q < 0 — is μ² > q'²·Σg²/(n(n−1)) for
        q'² = q² / (1 + q²/(n−1)): the same mask, from the same operations."""
        sides: list[_Side | None] = []
        # a parameter frozen after backward (requires_grad=False, .grad kept) has no statistics:
        # torch.optim still updates it from its .grad, and so does this optimizer, unmasked
        idx = [index.get(id(p)) for p in params]
        free = frozenset(j for j, i in enumerate(idx) if i is None)
        for side, stats, tested, sign in (("forget", stats_f, test_f, -1), ("retain", stats_r, test_r, 1)):
            c = self._effective(group, side)
            if not tested or c is None or stats is None:
                sides.append(None)
                continue
            q = quantile(c, stats.n, group["quantile"])
            if sq and q != 0:  # the same q' for either sign: both rules compare μ² with coeff·M2
                q /= math.sqrt(1.0 + q * q / (stats.n - 1))
            sides.append(_Side(*([None if i is None else t[i] for i in idx] for t in (stats.mean, stats.m2)),
                               stats.n, q, sign))
        if sides[0] is None and sides[1] is None:
            return None
        rescale = (group["rescale"], group["rescale_scope"], float(group["max_scale"])) if group["rescale"] else None
        return _GroupMask(sides[0], sides[1], group["soft"], m2_scratch=sq, rescale=rescale, free=free)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        mask: _GroupMask | None,
        grads_owned: bool = False,
    ) -> None:
        """Advance the base optimizer's state for ``params``; ``grads_owned``: the gradients are
        scratch tensors (the statistics direction) the update may modify in place."""
        raise NotImplementedError


def _make_engine(engine: StatsEngine | str | None, chunk_size: int | None) -> StatsEngine:
    if engine is None or engine == "auto":
        return HookEngine(fallback=VmapEngine(chunk_size), chunk_size=chunk_size)
    if engine == "hooks":
        return HookEngine(fallback=None, chunk_size=chunk_size)
    if engine == "vmap":
        return VmapEngine(chunk_size)
    if isinstance(engine, str) or not callable(engine):
        raise ValueError(f"engine must be 'auto', 'hooks', 'vmap' or a StatsEngine, got {engine!r}")
    return engine


def _all_finite(tensors: list[Tensor]) -> bool:
    # NaN and ±Inf survive a sum (inf − inf is NaN): one parallel reduction per tensor, 5x faster on
    # CPU than an L1 norm, and one host sync for all. Only finite values summing past the float range
    # (~3e38) can fail it without a non-finite entry, so a failure is confirmed exactly.
    sums = [t.sum(dtype=acc_dtype(t.dtype)) for t in tensors]
    if not sums:
        return True
    try:
        total = float(torch.stack(sums).sum()) if len(sums) > 1 else float(sums[0])
    except RuntimeError:  # tensors on several devices (a float sum keeps NaN and inf − inf = NaN)
        total = sum(float(s) for s in sums)
    return math.isfinite(total) or all(bool(torch.isfinite(t).all()) for t in tensors)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    foreach = group.get("foreach")
    if foreach is None:
        # torch.optim's rule: foreach by default when every tensor is on a native (CUDA) device
        return bool(params) and all(p.is_cuda for p in params) and not torch.jit.is_scripting()
    return bool(foreach)
