"""A statistics engine that never materialises per-sample gradients of the whole model (docs/design.md §4).

One forward and one backward of the *summed* per-sample loss carry the output gradients ``δ`` of
every layer; module hooks turn each layer call's input ``a`` and ``δ`` into the statistics of that
layer's own parameters, so memory is ``O(n × largest layer)``, never ``n × P``.  Every parameter
takes one of three routes, decided per model by a *plan*:

* **rules** (:mod:`masked_optim.rules`): a registered closed form (``δᵀa`` and ``(δ²)ᵀ(a²)`` for a
  plain ``nn.Linear``). A parameter shared between layers (GPT-2's tied embedding), or a layer
  called more than once, sums the per-sample gradients of every use before squaring them;
* **per-layer fallback**: a layer no rule covers (or one with forward hooks of its own, or pruned)
  gets per-sample gradients of its own parameters from its recorded inputs and output gradient —
  ``vmap`` over the samples of one layer's vector-Jacobian product, one layer at a time;
* **whole-model fallback** (the vmap reference engine): what neither can do.

The plan verifies itself when it is made (and again whenever the model's structure, parameters or
hooks change): each parameter's ``Σ_k g_k`` from the hooks is compared with autograd's gradient of
the summed loss, and a mismatch — a parameter used outside its layer's forward (``h @ emb.weight.T``),
a layer whose output a hook replaces — moves that parameter to the whole-model fallback with a
warning naming it. The loss of one sample computed alone is compared with its loss in the batch:
a model whose samples interact (``x - x.mean(0)``) goes to the whole-model fallback entirely.
What cannot be detected: a model whose samples interact only on some batches, and a layer whose
input is not sample-major but happens to have the batch size as its first dimension.

:meth:`HookEngine.pair` serves the forget and the retain batch with one pass over their
concatenation when their inputs agree in shape.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .batches import Batch, ParsedBatch, concat, parse_batch
from .losses import PerSampleLoss
from .rules import Rule, rule_for, sum_sq, supports
from .stats import (GradStats, LossFn, StatsEngine, VmapEngine, acc_dtype, eval_behaviour, m2_to_sumsq, merge_into,
                    param_names, sumsq_to_m2_)
from .taps import CERTIFY_MIN_NUMEL, REENTRANT, LayerTap, RuleTap, State

__all__ = ["HookEngine", "supports"]


# verification: Σ_k g_k of the hooks against autograd, relative to the gradient's norm (float32
# sums of the same products in another order agree to ~1e-6; a misrouted parameter is off by O(1))
_VERIFY_RTOL = 1e-3
_ALONE_RTOL = 1e-3  # one sample's loss alone against in the batch


class _RuleSpec(NamedTuple):
    module: nn.Module
    rule: Rule
    owned: dict[str, int]  # parameter name -> index
    first: int  # the index whose accumulation dtype the tap uses
    shared: bool  # some parameter is used by another layer too
    certify: bool  # the rule's finiteness certificate is worth its reductions


class _LayerSpec(NamedTuple):
    module: nn.Module
    owned: dict[str, int]
    first: int


class _TapSpecs(NamedTuple):
    rules: list[_RuleSpec]
    layers: list[_LayerSpec]
    hooked: set[int]  # the indices the rules own


@dataclasses.dataclass
class _Plan:
    key: tuple
    rules: dict[nn.Module, tuple[Rule, dict[str, int]]]
    layers: dict[nn.Module, dict[str, int]]
    shared: set[int]
    whole: set[int]
    names: list[str]
    verified: bool = False
    # what every pass builds its taps from; rebuilt when ``whole`` grows (it only grows), so a
    # step does not re-derive it
    specs: _TapSpecs | None = None
    specs_for: int = -1

    def tap_specs(self) -> _TapSpecs:
        """The taps of a pass, left out what ``whole`` took."""
        if self.specs is None or self.specs_for != len(self.whole):
            rule_specs, layer_specs = [], []
            for mod, (rule, owned) in self.rules.items():
                owned = {n: i for n, i in owned.items() if i not in self.whole}
                if owned:
                    certify = rule.finite is not None and sum(
                        getattr(mod, n).numel() for n in owned) >= CERTIFY_MIN_NUMEL
                    rule_specs.append(_RuleSpec(mod, rule, owned, next(iter(owned.values())),
                                                any(i in self.shared for i in owned.values()), certify))
            for mod, owned in self.layers.items():
                owned = {n: i for n, i in owned.items() if i not in self.whole}
                if owned:
                    layer_specs.append(_LayerSpec(mod, owned, next(iter(owned.values()))))
            # whole's parameters stay "hooked": the fallback gives their statistics, so a pass needs
            # no autograd gradient for them either
            hooked = {i for _, owned in self.rules.values() for i in owned.values()}
            self.specs, self.specs_for = _TapSpecs(rule_specs, layer_specs, hooked), len(self.whole)
        return self.specs


def _has_own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))


class HookEngine:
    """Fast statistics engine: one forward+backward per chunk, moments from layer hooks.

    Args:
        fallback: engine for what neither the rules nor the per-layer fallback can do (the vmap
            reference by default); ``None`` raises instead.
        chunk_size: samples per forward/backward (``None``: the whole batch at once); chunk results are
            Chan-merged, so memory scales with the chunk, not the batch.
        verify: check each new plan against autograd (see the module docstring). Default ``True``.
    """

    def __init__(self, fallback: StatsEngine | None = "default", chunk_size: int | None = None,  # type: ignore[assignment]
                 verify: bool = True) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.fallback = VmapEngine() if fallback == "default" else fallback
        self.chunk_size = chunk_size
        self.verify = verify
        self._plan: _Plan | None = None
        self._warned: set[tuple[str, str]] = set()

    #: :meth:`pair` takes ``sq=True`` (``Σ_k g_k²`` in place of M2; see :class:`~masked_optim.stats.StatsEngine`)
    pair_sq = True

    # -- the plan ------------------------------------------------------------------------------------
    @staticmethod
    def _key(model: nn.Module, params: Sequence[Tensor], modules: list[nn.Module]) -> tuple:
        return (id(model), tuple(id(p) for p in params),
                tuple((id(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules))

    def plan(self, model: nn.Module, params: Sequence[Tensor]) -> tuple[dict[nn.Module, dict[str, int]], list[int]]:
        """Which parameters (by index) the rules handle, per module, and which the fallbacks do."""
        p = self._get_plan(model, list(params), list(model.modules()))
        return {m: owned for m, (_, owned) in p.rules.items()}, sorted(
            {i for owned in p.layers.values() for i in owned.values()} | p.whole)

    def routes(self, model: nn.Module, params: Sequence[Tensor]) -> dict[str, list[int]]:
        """Each parameter's route by index: ``"rules"``, ``"layer"`` (the per-layer fallback) or
        ``"whole"`` (the whole-model fallback). Verification only runs inside a call, so before the
        first call every parameter is on the route its layer's type gives it."""
        p = self._get_plan(model, list(params), list(model.modules()))
        rules = {i for _, owned in p.rules.values() for i in owned.values()} - p.whole
        layer = {i for owned in p.layers.values() for i in owned.values()} - p.whole - rules
        return {"rules": sorted(rules), "layer": sorted(layer), "whole": sorted(p.whole)}

    def _get_plan(self, model: nn.Module, params: list[Tensor], modules: list[nn.Module]) -> _Plan:
        key = self._key(model, params, modules)
        if self._plan is not None and self._plan.key == key:
            return self._plan
        names = param_names(model, params)  # a clear error for foreign parameters, once per plan
        homes: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in modules:
            for pname, p in mod.named_parameters(recurse=False):
                homes.setdefault(id(p), []).append((mod, pname))
        rules: dict[nn.Module, tuple[Rule, dict[str, int]]] = {}
        layers: dict[nn.Module, dict[str, int]] = {}
        shared: set[int] = set()
        for i, p in enumerate(params):
            home = homes.get(id(p), [])
            if len(home) > 1:
                shared.add(i)
            for mod, pname in home:
                rule = None if _has_own_hooks(mod) else rule_for(mod)
                if rule is not None:
                    rules.setdefault(mod, (rule, {}))[1][pname] = i
                else:
                    layers.setdefault(mod, {})[pname] = i
        self._plan = _Plan(key, rules, layers, shared, set(), names, verified=not self.verify)
        return self._plan

    # -- public calls --------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn | None = None) -> GradStats:
        return self._run(model, list(params), [parse_batch(batch)], loss_fn, one_pass=False)[0]

    def pair(self, model: nn.Module, params: Sequence[Tensor], first: Batch, second: Batch,
             loss_fn: LossFn | None = None, *, sq: bool = False) -> tuple[GradStats, GradStats]:
        """Statistics of two batches, equal to two calls. Without ``chunk_size``, and when the inputs
        agree in dtype and trailing shape, one forward+backward over the concatenated batches (the
        model runs in eval behaviour, so the samples stay independent). ``sq``: the ``m2`` lists
        hold ``Σ_k g_k²`` instead of M2 (the optimizers' hard tests read it with an adjusted
        threshold, saving two passes over the statistics)."""
        parsed = [parse_batch(b) for b in (first, second)]
        one = self.chunk_size is None and parsed[0].signature() == parsed[1].signature()
        f, r = self._run(model, list(params), parsed, loss_fn, one_pass=one, sq=sq)
        return (f.as_sumsq(), r.as_sumsq()) if sq else (f, r)

    # -- the work ------------------------------------------------------------------------------------
    def _run(self, model: nn.Module, params: list[Tensor], parsed: list[ParsedBatch], loss_fn: Any,
             one_pass: bool, sq: bool = False) -> list[GradStats]:
        loss = loss_fn if isinstance(loss_fn, PerSampleLoss) else PerSampleLoss(loss_fn)
        modules = list(model.modules())
        plan = self._get_plan(model, params, modules)
        device = params[0].device if params else parsed[0].targets.device
        parsed = [b.to(device) for b in parsed]
        accs = [GradStats(0, [], [], None) for _ in parsed]  # type: ignore[arg-type]  # set by the first merge
        with eval_behaviour(model, modules):
            if not plan.verified:
                self._verify(model, params, plan, parsed[0], loss)
            if one_pass:
                batch = concat(parsed)
                outs, _ = self._pass(model, params, plan, batch, [b.n for b in parsed], loss, sq)
                for acc, b, out in zip(accs, parsed, outs):
                    merge_into(acc, b.n, *out[:3])
                    acc.sumsq = sq
                    acc.finite = out[3]  # one pass, no merge: the rules' certificates hold
            else:
                for acc, b in zip(accs, parsed):
                    chunk = b.n if self.chunk_size is None else min(self.chunk_size, b.n)
                    for start in range(0, b.n, chunk):
                        stop = min(start + chunk, b.n)
                        outs, _ = self._pass(model, params, plan, b.slice(start, stop), [stop - start], loss,
                                             False)
                        merge_into(acc, stop - start, *outs[0][:3])
        whole = sorted(plan.whole)
        if whole:
            if self.fallback is None:
                raise ValueError(f"HookEngine(fallback=None) cannot compute the statistics of {[plan.names[i] for i in whole]}")
            sub = [params[i] for i in whole]
            for acc, b in zip(accs, parsed):
                st = self.fallback(model, sub, b, loss)
                for j, i in enumerate(whole):
                    acc.mean[i] = st.mean[j]
                    if acc.finite is not None:
                        acc.finite[i] = None
                    acc.m2[i] = m2_to_sumsq(st.mean[j], st.m2[j], acc.n) if acc.sumsq else st.m2[j]
        return accs

    def _pass(self, model: nn.Module, params: list[Tensor], plan: _Plan, batch: ParsedBatch, segments: list[int],
              loss: PerSampleLoss, sq: bool, check: dict[int, Tensor] | None = None
              ) -> tuple[list[tuple[list[Tensor], list[Tensor], Tensor, list[Tensor | None]]], Tensor]:
        """One forward+backward; per segment ``(means, m2s, mean loss, finiteness certificates)``, and
        the per-sample losses.
        ``check``: filled with autograd's gradient of the summed loss for every parameter
        (verification). Parameters whose layer's batch cannot be split join the plan's whole-model
        fallback."""
        dtypes = [acc_dtype(p.dtype) for p in params]
        st = State(batch.n, segments, len(params), sq)
        rule_specs, layer_specs, hooked = plan.tap_specs()
        taps: list[RuleTap | LayerTap] = [RuleTap(mod, rule, owned, st, dtypes[first], shared, certify)
                                          for mod, rule, owned, first, shared, certify in rule_specs]
        taps += [LayerTap(mod, owned, st, dtypes[first]) for mod, owned, first in layer_specs]
        st.targets = [x for x in batch.tensors() if x.requires_grad]
        for i, p in enumerate(params):
            if p.requires_grad and (i not in hooked or check is not None):
                st.targets.append(p)
        handles = [t.module.register_forward_hook(t.forward_hook, with_kwargs=True) for t in taps]
        try:
            with torch.enable_grad():
                out = batch.call(model)
                losses = loss.batched(model, batch, out)
                direct = [(c, o) for t in taps if isinstance(t, RuleTap) for c, o in t.direct()]
                unique = list({id(t): t for t in st.targets}.values())
                inputs = unique + [o for _, o in direct]
                if inputs:
                    try:
                        grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                    except RuntimeError as err:
                        if "use_reentrant=True" not in str(err):
                            raise
                        raise ValueError(REENTRANT) from err
                    for (c, _), g in zip(direct, grads[len(unique):]):
                        c.delta = g
                    if check is not None:
                        pos = {id(t): k for k, t in enumerate(unique)}
                        for i, p in enumerate(params):
                            if id(p) in pos:
                                g = grads[pos[id(p)]]
                                check[i] = torch.zeros_like(p, dtype=dtypes[i]) if g is None else g.to(dtypes[i])
            for t in taps:
                if t.no_grad and t.recomputed:
                    raise ValueError(f"{type(t.module).__name__}: {REENTRANT}")
                t.finish()
        finally:
            for h in handles:
                h.remove()
        for i, why in st.unsplittable.items():  # left to the whole-model fallback, from this pass on
            plan.whole.add(i)
            self._warn_once(plan.names[i], why)
        return self._collect(params, dtypes, st, losses, segments), losses.detach()

    def _collect(self, params: list[Tensor], dtypes: list[torch.dtype], st: State, losses: Tensor,
                 segments: list[int]) -> list[tuple[list[Tensor], list[Tensor], Tensor, list[Tensor | None]]]:
        losses = losses.detach().to(acc_dtype(losses.dtype))
        if len(segments) > 1 and segments.count(segments[0]) == len(segments):
            seg_losses = losses.view(len(segments), -1).mean(1).unbind()  # one reduction for k equal segments
        else:
            seg_losses = [part.mean() for part in losses.split(segments)]
        per_sample = {i: st.dense(i, params[i].shape).split(segments) for i in set(st.per_sample) | set(st.sparse)}
        outs = []
        for seg in range(len(segments)):
            # this pass's own lists: completed in place, then handed on
            results, finite = st.results[seg], st.finite[seg]
            for i, gs in per_sample.items():
                g = gs[seg]
                mean = g.sum(0).div_(g.shape[0])
                sq = sum_sq(g)
                results[i], finite[i] = (mean, sq if st.sq else sumsq_to_m2_(mean, sq, g.shape[0])), None
            if None in results:  # not used by this forward (or left to the fallback): no gradient
                for i, r in enumerate(results):
                    if r is None:
                        results[i] = (torch.zeros_like(params[i], dtype=dtypes[i]),
                                      torch.zeros_like(params[i], dtype=dtypes[i]))
            outs.append(([r[0] for r in results], [r[1] for r in results], seg_losses[seg], finite))
        return outs

    def _verify(self, model: nn.Module, params: list[Tensor], plan: _Plan, batch: ParsedBatch, loss: PerSampleLoss) -> None:
        """Check the plan against autograd on ``batch`` (see the module docstring); mark it verified."""
        check: dict[int, Tensor] = {}
        outs, losses = self._pass(model, params, plan, batch, [batch.n], loss, False, check=check)
        out = outs[0]
        bad = []
        scale = max((float(g.norm()) for g in check.values()), default=0.0)
        for i, g in check.items():
            if i in plan.whole:
                continue
            total = out[0][i] * batch.n
            err = float((total - g).norm())
            if err > _VERIFY_RTOL * float(g.norm()) + 1e-6 * scale:
                bad.append(i)
        for i in bad:
            plan.whole.add(i)
            self._warn_once(plan.names[i], "its per-layer gradients do not add up to autograd's gradient (the "
                            "parameter is used outside its layer's forward, or a hook changes the layer's output)")
        if batch.n > 1:
            together = losses[0]
            with torch.no_grad():
                one = batch.slice(0, 1)
                alone = loss.batched(model, one, one.call(model))[0]
            if not torch.allclose(alone.float(), together.float(), rtol=_ALONE_RTOL, atol=1e-5):
                plan.whole.update(range(len(params)))
                self._warn_once("*", "a sample's loss alone differs from its loss in the batch: the model's samples "
                                "interact, so every statistic is computed one sample at a time (torch.func.vmap)")
        plan.verified = True

    def _warn_once(self, name: str, why: str) -> None:
        if (name, why) in self._warned:
            return
        self._warned.add((name, why))
        what = "every parameter" if name == "*" else f"parameter {name!r}"
        warnings.warn(f"HookEngine: {what} goes to the whole-model fallback: {why}", RuntimeWarning, stacklevel=4)
