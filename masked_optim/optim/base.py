"""The probably-aligned optimizer's step, phase by phase (docs/design.md §3, §5):

collect the batches → per-sample statistics → the direction (the caller's ``p.grad``, or
``retain_weight·μ_r − forget_weight·μ_f``) → the base optimizer's updates ``u`` (its state advanced
as torch.optim's) → the masks → apply ``θ ← θ − lr·s·m⊙u`` (plainly, behind the retain guard, or
after the whole-update test) → diagnostics.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..batches import Batch, ParsedBatch, parse_batch
from ..certify import directional_derivatives
from ..losses import PerSampleLoss
from ..mask import quantile
from ..stats import GatheringEngine, GradStats, PairEngine, StatsEngine, acc_dtype, eval_behaviour, unwrap_model
from ..workspace import Workspace, lend, lending
from .certification import certify_step, restore_state, snapshot_state
from .diagnostics import RawDiagnostics, StepDiagnostics
from .fusing import fused_positions, fused_step
from .masking import (GroupTests, Move, Side, Update, apply_updates, guarded_apply, kept_counts, masks_of, moves_of,
                      step_lengths)
from .options import MASK_KEYS, MaskOptions, make_engine, validate_group

__all__ = ["ProbablyAlignedOptimizer", "use_foreach"]


#: attributes a copy or a pickle does not take: derived per model, buffers, caches
_NOT_COPIED = ("_model_param_ids", "workspace", "_protocols")


class ProbablyAlignedOptimizer(Optimizer):
    """Base class: subclasses implement ``_update_group(group, params, grads, apply)``, the base
    optimizer's functional — it advances the state exactly as torch.optim would and either applies
    ``θ ← θ − lr·u`` itself (``apply``: the group is not masked) or returns each final update ``u``."""

    def __init__(self, params: Any, defaults: dict[str, Any], options: MaskOptions) -> None:
        options.validate()
        self.options = options
        self.model = options.model
        self.loss_fn = options.loss_fn
        self._loss = PerSampleLoss(options.loss_fn)
        self.engine: StatsEngine = make_engine(options.engine, options.chunk_size)
        self.certify, self.certify_policy, self.certify_tries = (options.certify, options.certify_policy,
                                                                 options.certify_tries)
        self.retain_guard = options.retain_guard
        self.forget_weight = float(options.forget_weight)
        self.retain_weight = float(options.retain_weight)
        self._model_param_ids = {id(p) for p in self.model.parameters()}
        # a list, not a tuple attribute: wrappers that copy the optimizer's __dict__ share it, so
        # stage() through them reaches the next step
        self._staging: list[Batch | None] = [None, None]
        self._raw_diag: RawDiagnostics | None = None
        self._warned_unmasked = False
        self._warned_same_batch = False
        self.reuse_buffers = options.reuse_buffers
        self.workspace = Workspace()
        super().__init__(params, dict(defaults, **options.group_defaults()))

    # -- configuration ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "confidence" in param_group:  # a group's own confidence applies to both of its tests
            param_group = {"forget_confidence": None, "retain_confidence": None, **param_group}
        super().add_param_group(param_group)
        try:
            validate_group(self.param_groups[-1], type(self).__name__, self._model_param_ids,
                           len(self.param_groups) - 1)
        except Exception:
            # torch has appended the group already: a rejected group must not stay and break every step
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups (it drops its hooks on purpose);
        # this optimizer's configuration lives in attributes (model, engine, certify, loss_fn, …), so
        # a copy or a pickle without them could not step. Every attribute but torch's hooks travels;
        # the ids of the model's parameters are recomputed for the copy's own model (__setstate__).
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if not key.startswith("_optimizer_") and key not in _NOT_COPIED:
                state.setdefault(key, value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.workspace = Workspace()  # buffers are not state: a copy starts with none
        self.__dict__.setdefault("reuse_buffers", None)
        if "model" in state:  # a copy or an unpickled optimizer: its own model's parameters
            self._model_param_ids = {id(p) for p in self.model.parameters()}
        for group in self.param_groups:
            if "confidence" not in group:  # saved by torch.optim: this optimizer's own mask settings
                for key in MASK_KEYS:
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
            forget: the forget batch, with the true labels: ``(inputs, targets)`` or a mapping with
                ``labels`` (see :mod:`masked_optim.batches`).
            retain: the retain batch, in either layout.
            check_forget, check_retain: independent batches for the whole-update test (``certify``);
                by default the test reuses ``forget``/``retain``, which is optimistic.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with lending(self._lent_workspace()):
            self._masked_step(forget, retain, check_forget, check_retain)
        return loss

    def _lent_workspace(self) -> Workspace | None:
        """The workspace this step lends its large temporaries from (``reuse_buffers``: ``None``
        when the parameters are on CPU, where fresh large tensors cost page faults)."""
        reuse = self.reuse_buffers
        if reuse is None:
            dev = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            reuse = dev.type == "cpu"
        return self.workspace if reuse else None

    def _masked_step(self, forget: Batch | None, retain: Batch | None, check_forget: Batch | None,
                     check_retain: Batch | None) -> None:
        # ---- collect: nothing below mutates anything until all checks have passed ----
        staged_f, staged_r = self._staging
        self._staging[:] = [None, None]
        forget = forget if forget is not None else staged_f
        retain = retain if retain is not None else staged_r
        parsed_f, parsed_r, has_grad = self._checked_inputs(forget, retain, check_forget, check_retain)
        test_f = forget is not None and any(self._effective(g, "forget") is not None for g in self.param_groups)
        test_r = retain is not None and any(self._effective(g, "retain") is not None for g in self.param_groups)
        self._warn_if_unmasked(has_grad, test_f or test_r)

        # ---- statistics ----
        stat_params = self._stat_params()
        want_f = test_f or (not has_grad and forget is not None)
        want_r = test_r or (not has_grad and retain is not None)
        stats_f, stats_r = self._statistics(stat_params, forget if want_f else None, retain if want_r else None)
        self._check_sample_counts(stats_f, stats_r, test_f, test_r)
        n_f = stats_f.n if stats_f is not None else parsed_f.n if parsed_f is not None else 0
        n_r = stats_r.n if stats_r is not None else parsed_r.n if parsed_r is not None else 0
        losses = (None if stats_f is None else stats_f.loss, None if stats_r is None else stats_r.loss)

        # ---- direction, the groups' tests and which tensors take the fused pass ----
        direction = "grad" if has_grad else ("stats" if (stats_f or stats_r) else "none")
        certify = self.certify is not None and (test_f or test_r)
        # only a masked step is guarded: with no test on either side the optimizer is torch.optim
        # (certify's whole-update test replaces the guard when both are set)
        guard = self.retain_guard is not None and not certify and (test_f or test_r) and stats_r is not None
        index = {id(p): i for i, p in enumerate(stat_params)}
        work = []
        for group in self.param_groups:
            # the tensors with a direction: their gradient, or their statistics
            params = [p for p in group["params"]
                      if (p.grad is not None if has_grad else direction == "stats" and id(p) in index)]
            tests = self._group_tests(group, params, index, stats_f, stats_r, test_f, test_r)
            if (certify or guard) and tests is None and params:
                tests = GroupTests(None, None, False)  # unmasked, but part of the step that is tested
            fused = fused_positions(group, params, tests, certify) if self._fuses else []
            work.append((group, params, tests, fused))
        # the fused pass forms the statistics direction itself where that is exact (u = μ_r − μ_f):
        # no pass writing u, none reading it back for the finite check
        inside = self._direction_inside(work, index, stats_f, stats_r) if direction == "stats" else set()

        # one host sync for everything the update will read: a non-finite per-sample gradient makes
        # its batch mean non-finite too; M2 alone can only overflow to +inf ("not significant")
        # (a mean whose layer rule certified it finite from the layer's inputs is not read)
        checked = [] if direction == "stats" else [  # (mean, its certificate or None)
            (m, s.finite[i] if s.finite is not None else None) for s in (stats_f, stats_r) if s is not None
            for i, m in enumerate(s.mean)]
        read = [m for m, c in checked if c is None]
        certified = [m for m, c in checked if c is not None]
        certificates = [c for _, c in checked if c is not None]
        if has_grad:
            read += [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        stat_grads: dict[int, Tensor] = {}
        if direction == "stats":
            stat_grads = self._stats_direction(stat_params, stats_f, stats_r, lambda p: id(p) not in inside)
        bounds = self._direction_bounds(inside, index, stats_f, stats_r)
        finite = all_finite([*stat_grads.values(), *read], certificates, certified, bounds)
        if not finite and inside:  # a bound failed, or something is not finite: the eager direction decides
            stat_grads.update(self._stats_direction(stat_params, stats_f, stats_r, lambda p: id(p) in inside))
            inside = set()
            finite = all_finite([*stat_grads.values(), *read], certificates, certified)
        if not finite:
            groups = len(self.param_groups)
            self._raw_diag = RawDiagnostics(True, "non-finite gradients or statistics", direction,
                                            [None] * groups, [0] * groups, n_f, n_r, *losses)
            return

        # ---- the base optimizer's updates, then masks and the move ----
        snapshot = None
        if certify and self.certify_policy == "skip":
            snapshot = snapshot_state(self.state, [p for _, params, _, _ in work for p in params])
        updates: list[Update] = []
        fused_moves: list[Move] = []  # deferred fused steps: (param, m⊙u, lr, s)
        fused_kept: dict[int, list[Tensor]] = {}
        for group, params, tests, fused in work:
            grads = [p.grad if has_grad else stat_grads.get(id(p)) for p in params]  # None: formed inside
            if fused:
                means = self._direction_means([params[i] for i in fused], index, stats_f, stats_r) \
                    if id(params[fused[0]]) in inside else None
                fused_kept[id(tests)] = fused_step(self._fused_update, group, params, grads, tests, fused, guard,
                                                   fused_moves, means)
                taken = set(fused)
                rest = [i for i in range(len(params)) if i not in taken]
                params, grads = [params[i] for i in rest], [grads[i] for i in rest]
            else:
                rest = list(range(len(params)))
            us = self._update_group(group, params, grads, apply=tests is None, grads_owned=direction == "stats")
            if tests is not None:
                updates += [Update(tests, i, p, u, group["lr"]) for i, p, u in zip(rest, params, us)]
        report, step_fraction, ms = None, 1.0, []
        if certify:
            report, ms = self._certify(updates, forget if test_f else None, retain if test_r else None,
                                       check_forget, check_retain, test_r)
            if report.action == "skipped":
                restore_state(self.state, snapshot)
        elif updates or fused_moves:
            deferred = guard or any(u.tests.rescale is not None and u.tests.rescale[1] != "tensor" for u in updates)
            ms = masks_of(updates, last=True, foreach=not deferred)
            lengths = step_lengths(updates, ms, keep_products=guard)  # the guard's moves reuse m⊙u
            if guard:
                limit = float(stats_r.loss) + float(self.retain_guard)  # type: ignore[union-attr,arg-type]
                model = unwrap_model(self.model)
                batch = parsed_r.to(next(model.parameters()).device)  # type: ignore[union-attr]  # once, not per try
                moves = moves_of(updates, ms, lengths) + fused_moves
                step_fraction = guarded_apply(moves, lambda: float(self._batch_loss(model, batch)), limit)
            else:
                apply_updates(updates, ms, lengths)

        # ---- diagnostics ----
        kept = kept_counts(updates, ms)
        for key, counts in fused_kept.items():
            kept.setdefault(key, []).extend(counts)
        skipped = report is not None and report.action == "skipped"
        self._raw_diag = RawDiagnostics(
            skipped, "whole-update test failed" if skipped else None, direction,
            [None if t is None else kept.get(id(t), []) for _, _, t, _ in work],
            [sum(p.numel() for p in params) for _, params, _, _ in work], n_f, n_r, *losses, report, step_fraction,
        )

    # -- phases ------------------------------------------------------------------------------------
    def _checked_inputs(
        self, forget: Batch | None, retain: Batch | None, check_forget: Batch | None, check_retain: Batch | None,
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
        if self._engine_is(GatheringEngine):
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            counts = self.engine.agree_on_checks(error, counts, device)  # raises on every rank when any failed
        elif error is not None:
            raise error
        for (name, b), n in zip(checks, counts):
            if b is not None and n < 2 and self.certify is not None:
                raise ValueError(f"{name} needs at least 2 samples for the whole-update test")
        return parsed_f, parsed_r, has_grad

    def _warn_if_unmasked(self, has_grad: bool, tested: bool) -> None:
        if self._warned_unmasked or not has_grad or tested:
            return
        if any(self._effective(g, s) is not None for g in self.param_groups for s in ("forget", "retain")):
            warnings.warn(f"{type(self).__name__}.step() got no forget/retain batch: the update is not masked",
                          stacklevel=6)  # as the certify warning: the caller of step()
            self._warned_unmasked = True

    def _statistics(self, params: list[Tensor], forget: Batch | None, retain: Batch | None
                    ) -> tuple[GradStats | None, GradStats | None]:
        """Statistics of the batches asked for. An engine that serves both batches in one pass
        (``pair``) and offers ``Σg²`` (``pair_sq``; :attr:`GradStats.sumsq` says which it returned)
        saves two passes over the statistics when every test is a hard one, which reads ``Σg²``
        exactly with an adjusted threshold (:meth:`_group_tests`). Engines get the batches as the
        caller gave them."""
        model = unwrap_model(self.model)
        with self._engine_context(params):
            if forget is not None and retain is not None and self._engine_is(PairEngine):
                if getattr(self.engine, "pair_sq", False) and self._hard_tests_only():
                    return self.engine.pair(model, params, forget, retain, self._loss, sq=True)  # type: ignore[call-arg]
                return self.engine.pair(model, params, forget, retain, self._loss)
            return (None if forget is None else self.engine(model, params, forget, self._loss),
                    None if retain is None else self.engine(model, params, retain, self._loss))

    def _check_sample_counts(self, stats_f: GradStats | None, stats_r: GradStats | None, test_f: bool,
                             test_r: bool) -> None:
        # on the statistics' n, which a distributed engine makes the global batch size
        for side, stats, tested in (("forget", stats_f, test_f), ("retain", stats_r, test_r)):
            if tested and stats is not None and stats.n < 2:
                for g in self.param_groups:
                    c = self._effective(g, side)
                    if c is not None and c != 0.5:
                        raise ValueError(
                            f"the {side} batch has {stats.n} sample: a variance needs at least 2 "
                            f"(or {side} confidence exactly 0.5, plain sign agreement)"
                        )

    def _stats_direction(self, params: list[Tensor], stats_f: GradStats | None, stats_r: GradStats | None,
                         only: Callable[[Tensor], bool] | None = None) -> dict[int, Tensor]:
        """``retain_weight·μ_r − forget_weight·μ_f`` per parameter (``params``: in the statistics'
        order; ``only``: of those it accepts), as new tensors (large ones lent by the step's
        workspace, see :mod:`masked_optim.workspace`)."""
        out = {}
        for i, p in enumerate(params):
            if only is not None and not only(p):
                continue
            r = None if stats_r is None else _as(stats_r.mean[i], p.dtype)
            f = None if stats_f is None else _as(stats_f.mean[i], p.dtype)
            if r is not None and f is not None and self.retain_weight != 1:
                out[id(p)] = r * self.retain_weight - f * self.forget_weight
                continue
            buf = lend(p.shape, dtype=p.dtype, device=p.device)
            if r is not None and f is not None:
                out[id(p)] = torch.sub(r, f, alpha=self.forget_weight, out=buf)
            elif r is not None:
                out[id(p)] = torch.mul(r, self.retain_weight, out=buf)
            else:
                out[id(p)] = torch.mul(f, -self.forget_weight, out=buf)  # type: ignore[arg-type]
        return out

    def _direction_inside(self, work: list[tuple], index: dict[int, int], stats_f: GradStats | None,
                          stats_r: GradStats | None) -> set[int]:
        """Ids of the fused tensors whose pass forms the statistics direction itself, where that is
        the eager direction bit for bit: both weights 1 (the pass's ``1·μ_r − 1·μ_f`` is ``μ_r − μ_f``)
        and statistics in the parameter's dtype (the eager direction is rounded to it first). Per
        group: all of its fused tensors or none."""
        if self.forget_weight != 1 or self.retain_weight != 1:
            return set()
        out: set[int] = set()
        sides = [s for s in (stats_f, stats_r) if s is not None]
        for _, params, _, fused in work:
            ps = [params[i] for i in fused]
            if ps and all(s.mean[index[id(p)]].dtype == p.dtype for p in ps for s in sides):
                out.update(id(p) for p in ps)
        return out

    @staticmethod
    def _direction_means(params: list[Tensor], index: dict[int, int], stats_f: GradStats | None,
                         stats_r: GradStats | None) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """The forget and retain means of ``params`` (``None``: no statistics on that side)."""
        return tuple(None if s is None else [s.mean[index[id(p)]] for p in params]  # type: ignore[return-value]
                     for s in (stats_f, stats_r))

    @staticmethod
    def _direction_bounds(inside: set[int], index: dict[int, int], stats_f: GradStats | None,
                          stats_r: GradStats | None) -> list[Tensor]:
        """0-dim bools that hold only if every ``u = μ_r − μ_f`` a fused pass forms is finite: each mean
        finite and at most a quarter of its dtype's range in magnitude (so their difference is at most
        half). A layer rule's certificate says so without reading the mean (:attr:`Rule.finite`);
        any other mean is read once (its minimum and maximum, which keep NaN)."""
        out = []
        for i in sorted(index[pid] for pid in inside):
            for s in (stats_f, stats_r):
                if s is None:
                    continue
                cert = s.finite[i] if s.finite is not None else None
                if cert is not None:
                    out.append(cert)
                elif s.mean[i].numel():
                    lo, hi = torch.aminmax(s.mean[i])
                    limit = torch.finfo(s.mean[i].dtype).max / 4
                    out.append((hi <= limit) & (lo >= -limit))
        return out

    def _group_tests(self, group: dict[str, Any], params: list[Tensor], index: dict[int, int],
                     stats_f: GradStats | None, stats_r: GradStats | None, test_f: bool, test_r: bool,
                     ) -> GroupTests | None:
        """The group's tests, from M2 or (hard tests, :attr:`GradStats.sumsq`) ``Σg²``. With
        M2 = Σg² − nμ², the comparison μ² > q²·M2/(n(n−1)) — of the test itself for q > 0, of its
        "confidently misaligned" drop rule for q < 0 — is μ² > q'²·Σg²/(n(n−1)) for
        q'² = q² / (1 + q²/(n−1)): the same mask, from the same operations."""
        sides: list[Side | None] = []
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
            if stats.sumsq and q != 0:  # the same q' for either sign: both rules compare μ² with coeff·M2
                q /= math.sqrt(1.0 + q * q / (stats.n - 1))
            sides.append(Side(*([None if i is None else t[i] for i in idx] for t in (stats.mean, stats.m2)),
                              stats.n, q, sign))
        if sides[0] is None and sides[1] is None:
            return None
        rescale = (group["rescale"], group["rescale_scope"], float(group["max_scale"])) if group["rescale"] else None
        sq = any(s is not None and s.sumsq for s in (stats_f, stats_r))  # the step's own Σg²: scratch for the mask
        return GroupTests(sides[0], sides[1], group["soft"], rescale=rescale, free=free, m2_scratch=sq,
                          foreach=use_foreach(group, params))

    def _certify(self, updates: list[Update], forget: Batch | None, retain: Batch | None, check_forget: Batch | None,
                 check_retain: Batch | None, test_r: bool) -> tuple[Any, list[Tensor]]:
        if test_r and check_retain is None and not self._warned_same_batch:
            warnings.warn(
                "certify reuses the retain batch the mask was chosen on, which certifies optimistically; "
                "pass an independent check_retain batch for an honest whole-update test",
                stacklevel=6,  # _certify, _masked_step, step, no_grad's wrapper, torch.optim's hook wrapper
            )
            self._warned_same_batch = True
        # one test of the whole step, so one threshold: Student-t (the exact small-sample rule, for
        # c > 0.5 the stricter one) as soon as any group asks for it
        kind = "t" if any(g["quantile"] == "t" for g in self.param_groups) else "normal"
        return certify_step(
            updates, self.certify, kind, self.certify_tries, self.certify_policy, self._directional,  # type: ignore[arg-type]
            check_forget if check_forget is not None else forget,
            check_retain if check_retain is not None else retain,
        )

    # -- the fused step (masked_optim.fused, .fusing) --------------------------------------------------
    #: whether the subclass has a fused step (:meth:`_fused_update`)
    _fuses = False

    def _fused_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor] | None,
                      forget: Side | None, retain: Side | None, **kwargs: Any) -> list[Any]:
        """The subclass's :mod:`masked_optim.fused` step for ``params`` (its state advanced); ``grads``
        ``None``: the pass forms the direction from ``kwargs["direction"]``'s means."""
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------------
    def _engine_is(self, protocol: type) -> bool:
        # isinstance against a runtime-checkable Protocol inspects every member (tens of µs, several
        # times a step): decided once per engine object
        key = (id(self.engine), protocol)
        cache = self.__dict__.setdefault("_protocols", {})
        hit = cache.get(key)
        if hit is None or hit[0] is not self.engine:
            # the engine is kept with the answer: its id stays unique while the entry lives
            hit = cache[key] = (self.engine, isinstance(self.engine, protocol))
        return hit[1]

    def _stat_params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _hard_tests_only(self) -> bool:
        if self.certify is not None:  # its threshold shifts are defined on M2
            return False
        return not any(g["soft"] for g in self.param_groups)

    def _engine_context(self, params: list[Tensor]) -> contextlib.AbstractContextManager:
        # the engines need the bare module (unwrap_model): DDP's forward syncs buffers, hooks on an
        # already compiled module see nothing, and torch.func through it disables dynamo; the caller's
        # autocast would lower the statistics' precision (docs/design.md §4: float32 at least)
        dev = params[0].device.type if params else "cpu"
        if not _autocast_enabled(dev):
            return torch.enable_grad()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(dev, enabled=False))
        return stack

    def _directional(self, params: list[Tensor], tangents: list[Tensor], batch: Batch) -> Tensor:
        dev = params[0].device.type if params else "cpu"
        with torch.autocast(dev, enabled=False):
            d = directional_derivatives(unwrap_model(self.model), params, tangents, batch, self._loss)
        # a distributed engine gathers every rank's values: all ranks test the global batch
        return self.engine.gather_samples(d) if self._engine_is(GatheringEngine) else d

    def _batch_loss(self, model: nn.Module, batch: ParsedBatch) -> Tensor:
        """Mean loss of ``batch`` (parsed, on the model's device) at the current parameters of the
        bare ``model``, in eval behaviour as the statistics are."""
        with torch.no_grad(), eval_behaviour(model), torch.autocast(batch.targets.device.type, enabled=False):
            return self._loss.mean(model, batch, batch.call(model))

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], apply: bool,
                      grads_owned: bool = False) -> list[Tensor] | None:
        """Advance the base optimizer's state for ``params``: apply the update (``apply``) or return
        the final updates ``u``; ``grads_owned``: the gradients are scratch tensors (the statistics
        direction) the update may modify in place."""
        raise NotImplementedError


def all_finite(tensors: list[Tensor], certificates: Sequence[Tensor] = (), certified: Sequence[Tensor] = (),
               bounds: Sequence[Tensor] = ()) -> bool:
    """Whether every entry of ``tensors`` and ``certified`` is finite and every one of ``bounds``
    holds, with one host sync. ``certificates``: 0-dim bool tensors, all True only if every
    ``certified`` tensor is finite (a layer rule's bound, :attr:`~masked_optim.stats.GradStats.finite`),
    read instead of those tensors; when one is False the tensors themselves decide. ``bounds``: 0-dim
    bool tensors that must all be True (no second opinion)."""
    # NaN and ±Inf survive a sum (inf − inf is NaN): one parallel reduction per tensor, 5x faster on
    # CPU than an L1 norm. Only finite values summing past the float range (~3e38) can fail it
    # without a non-finite entry, so a failure is confirmed exactly.
    sums = [t.sum(dtype=acc_dtype(t.dtype)) for t in tensors]
    # per list of flags: 0 when every flag holds, +inf when one does not
    held_certificates, held_bounds = (torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else None
                                      for flags in (certificates, bounds))
    sums += [torch.where(held, 0.0, math.inf) for held in (held_certificates, held_bounds) if held is not None]
    if not sums:
        return True
    try:
        total = float(torch.stack(sums).sum()) if len(sums) > 1 else float(sums[0])
    except RuntimeError:  # tensors on several devices (a float sum keeps NaN and inf − inf = NaN)
        total = sum(float(s) for s in sums)
    if math.isfinite(total):
        return True
    if held_bounds is not None and not bool(held_bounds):
        return False
    return all(bool(torch.isfinite(t).all()) for t in [*tensors, *certified])


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    """torch.optim's rule: the group's ``foreach``, or by default when every tensor is on CUDA."""
    foreach = group.get("foreach")
    if foreach is None:
        return bool(params) and all(p.is_cuda for p in params) and not torch.jit.is_scripting()
    return bool(foreach)
