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
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .batches import Batch, ParsedBatch, concat, parse_batch
from .losses import PerSampleLoss
from .rules import Rule, SparseRows, rule_for, sum_sq, supports
from .stats import GradStats, LossFn, StatsEngine, VmapEngine, acc_dtype, eval_behaviour, merge_into, param_names

__all__ = ["HookEngine", "supports"]


# layers whose output gradient has at most this many elements run their rule after the backward
# rather than inside it: the same arithmetic measured up to 2x slower inside autograd's hooks for the
# small matrices of an MLP; large layers still run (and free their activations) one by one
_DEFER_MAX = 1 << 16

# verification: Σ_k g_k of the hooks against autograd, relative to the gradient's norm (float32
# sums of the same products in another order agree to ~1e-6; a misrouted parameter is off by O(1))
_VERIFY_RTOL = 1e-3
_ALONE_RTOL = 1e-3  # one sample's loss alone against in the batch


_REENTRANT = (
    "the model uses torch.utils.checkpoint with use_reentrant=True, whose layers run without gradients "
    "and again inside the backward: per-sample statistics cannot be taken through it; use "
    "use_reentrant=False (supported), or disable activation checkpointing for the statistics"
)


def _in_backward() -> bool:
    """Whether autograd is running a backward (a checkpointed layer being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


@dataclasses.dataclass
class _Plan:
    key: tuple
    rules: dict[nn.Module, tuple[Rule, dict[str, int]]]
    layers: dict[nn.Module, dict[str, int]]
    shared: set[int]
    whole: set[int]
    names: list[str]
    verified: bool = False


class _State:
    """What one forward+backward collects."""

    def __init__(self, n: int, segments: list[int], nparams: int, sq: bool) -> None:
        self.n, self.segments, self.sq = n, segments, sq
        self.equal = len(segments) > 1 and segments.count(segments[0]) == len(segments)  # k equal segments
        self.results: list[list[tuple[Tensor, Tensor] | None]] = [[None] * nparams for _ in segments]
        self.per_sample: dict[int, Tensor] = {}  # summed over uses: [n, *shape]
        self.sparse: dict[int, list[SparseRows]] = {}
        self.targets: list[Tensor] = []
        self.replaying = False
        self.unsplittable: dict[int, str] = {}  # param index -> why its layer's batch cannot be split

    def add(self, i: int, g: Tensor | SparseRows) -> None:
        if isinstance(g, SparseRows):  # added into the dense sum of the other uses at the end
            self.sparse.setdefault(i, []).append(g)
            return
        acc = self.per_sample.get(i)
        if acc is None:
            self.per_sample[i] = g
        else:
            acc.add_(g)

    def dense(self, i: int, shape: torch.Size) -> Tensor:
        """Parameter ``i``'s per-sample gradients, summed over every use: ``[n, *shape]``."""
        g = self.per_sample.get(i)
        for rows in self.sparse.get(i, []):
            if g is None:
                g = rows.dense(self.n, shape)
            else:
                g.view(self.n * shape[0], *shape[1:]).index_add_(0, rows.index, rows.values)
        return g


class _Call:
    __slots__ = ("a", "needs_grad", "node", "nr", "output", "version", "delta")

    def __init__(self, a: Tensor, needs_grad: bool) -> None:
        self.a, self.needs_grad = a, needs_grad
        self.node: Any = None
        self.nr = self.version = 0
        self.output: Tensor | None = None
        self.delta: Tensor | None = None


class _RuleTap:
    """A layer with a rule: per call its input and ``δ`` (from the node that formed the output)."""

    def __init__(self, module: nn.Module, rule: Rule, owned: dict[str, int], state: _State, dtype: torch.dtype,
                 shared: bool) -> None:
        self.module, self.rule, self.owned, self.state, self.dtype = module, rule, owned, state, dtype
        self.shared = shared  # some parameter is used by another layer too: per-sample gradients
        self.calls: list[_Call] = []
        self.no_grad = self.recomputed = False

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if st.replaying:
            return None
        if _in_backward():
            self.recomputed = True  # activation checkpointing recomputes the forward: nothing new
            return None
        if not torch.is_grad_enabled():
            self.no_grad = True
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = _first_input(args, kwargs)
        if not isinstance(x, Tensor):
            return None
        replaced = None
        if x.shape[0] != st.n or output.shape[0] != st.n:
            if x.shape[0] == 1 and output.dim() > 0 and output.shape[0] == 1 and st.n > 1:
                # an input shared by every sample (HF position ids [1, L]): each sample's own copy,
                # so that the backward keeps one δ per sample instead of their sum
                x = x.expand(st.n, *x.shape[1:])
                output = replaced = output.expand(st.n, *output.shape[1:])
            else:
                for i in self.owned.values():
                    st.unsplittable[i] = f"its layer's input has leading size {x.shape[0]}, not the batch's {st.n}"
                return None
        call = _Call(x.detach(), x.requires_grad)
        call.node, call.nr = output.grad_fn, output.output_nr
        self.calls.append(call)
        if output.numel() <= _DEFER_MAX:
            call.output, call.version = output, output._version
        else:
            self._hook(call)
        return replaced

    def _hook(self, call: _Call) -> None:
        # the backward only has to carry δ through every hooked module: it does when autograd is asked
        # for the parameters of the first layers (whose input needs no gradient) and for every leaf
        # the hooks do not own (measured cheaper than asking for module inputs)
        if not call.needs_grad:
            self.state.targets.append(getattr(self.module, "bias" if "bias" in self.owned else next(iter(self.owned))))
        call.node.register_prehook(lambda grad_outputs: self._backward(call, grad_outputs[call.nr]))
        call.node = None

    def direct(self) -> list[tuple[_Call, Tensor]]:
        """Outputs whose δ autograd should return directly (small, unchanged since the forward)."""
        out = []
        for call in self.calls:
            o, call.output = call.output, None
            if o is None:
                continue
            if o._version != call.version:
                self._hook(call)
            else:
                out.append((call, o))
        return out

    def _per_sample_mode(self) -> bool:
        return self.shared or len(self.calls) > 1

    def _backward(self, call: _Call, delta: Tensor | None) -> None:
        call.delta = delta
        if delta is not None and delta.numel() > _DEFER_MAX and not self._per_sample_mode():
            self.finish()  # large: run now and free the activation

    def finish(self) -> None:
        st, dt = self.state, self.dtype
        per_sample = self._per_sample_mode()
        calls, self.calls = self.calls, []
        for call in calls:
            if call.delta is None or call.a is None:
                continue
            x, call.a = call.a, None  # release the activation as soon as it is used
            a = x if x.dtype in (dt, torch.long, torch.int) else x.to(dt)
            d = call.delta if call.delta.dtype == dt else call.delta.to(dt)
            call.delta = None
            if per_sample:
                g = self.rule.per_sample(self.module, a, d)
                self._check(g)
                for name, i in self.owned.items():
                    st.add(i, g[name])
            else:
                self._moments(a, d)

    def _check(self, out: dict) -> None:
        missing = [name for name in self.owned if name not in out]
        if missing:  # a statistic no rule filled is an error, never zeros
            raise ValueError(f"the rule for {type(self.module).__name__} returned no statistics for its "
                             f"parameter(s) {missing}; a rule must fill every parameter it lists in params=")

    def _moments(self, a: Tensor, d: Tensor) -> None:
        st = self.state
        k, n = len(st.segments), st.segments[0]
        stacked = self.rule.segments(self.module, a, d, k) if st.equal and self.rule.segments else None
        if stacked is not None:  # every segment at once: [k, ...] means and Σg²
            self._check(stacked)
            for name, (mean, sq) in stacked.items():
                if name in self.owned:
                    m2 = sq if st.sq else _m2(mean, sq, n)
                    for seg, moments in enumerate(zip(mean.unbind(), m2.unbind())):
                        st.results[seg][self.owned[name]] = moments
            return
        for seg, (a_s, d_s) in enumerate(zip(a.split(st.segments), d.split(st.segments))):
            out = self.rule.moments(self.module, a_s, d_s)
            self._check(out)
            for name, (total, sq) in out.items():
                if name in self.owned:
                    mean = total.div_(a_s.shape[0])
                    st.results[seg][self.owned[name]] = (mean, sq if st.sq else _m2(mean, sq, a_s.shape[0]))


class _Capture(torch.autograd.Function):
    """Identity on a layer's outputs whose backward records their gradients."""

    @staticmethod
    def forward(ctx: Any, record: list, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.record = record
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.record.append(grads)
        return (None, *grads)


class _LayerTap:
    """Per-layer fallback: records each call's inputs and output gradients; afterwards, per-sample
    gradients of the layer's own parameters by ``vmap`` over its vector-Jacobian product."""

    def __init__(self, module: nn.Module, owned: dict[str, int], state: _State, dtype: torch.dtype) -> None:
        self.module, self.owned, self.state, self.dtype = module, owned, state, dtype
        self.calls: list[tuple[tuple, dict, Any, list[int], list]] = []
        self.no_grad = self.recomputed = False

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if st.replaying:
            return None
        if _in_backward():
            self.recomputed = True
            return None
        if not torch.is_grad_enabled():
            self.no_grad = True
            return None
        flat, spec = tree_flatten(output)
        idx = [j for j, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        if not idx:
            return None
        if any(flat[j].dim() == 0 or flat[j].shape[0] != st.n for j in idx):
            for i in self.owned.values():
                st.unsplittable[i] = "its layer's output is not split by sample"
            return None
        record: list = []
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        self.calls.append((tree_map(detach, args), tree_map(detach, kwargs), spec, idx, record))
        captured = _Capture.apply(record, *[flat[j] for j in idx])
        for j, c in zip(idx, captured):
            flat[j] = c
        return tree_unflatten(flat, spec)

    def finish(self) -> None:
        st, module = self.state, self.module
        params = {name: module._parameters[name].detach() for name in self.owned}
        for args, kwargs, _, idx, record in self.calls:
            if not record:
                continue
            deltas = [d.to(self.dtype) if d.dtype != self.dtype else d for d in record[0]]

            def inner(th: dict[str, Tensor], a: tuple, kw: dict, ds: list[Tensor]) -> Tensor:
                out = functional_call(module, th, a, kw)
                flat = tree_flatten(out)[0]
                return sum((flat[j].to(d.dtype) * d).sum() for j, d in zip(idx, ds))

            split = lambda v: 0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == st.n else None  # noqa: E731
            unsq = lambda v, dim: v.unsqueeze(0) if dim == 0 else v  # noqa: E731

            def one(th: dict[str, Tensor], a: tuple, kw: dict, ds: list[Tensor]) -> Tensor:
                a1 = tree_map(unsq, a, a_dims)
                kw1 = tree_map(unsq, kw, kw_dims)
                return inner(th, a1, kw1, [d.unsqueeze(0) for d in ds])

            a_dims, kw_dims = tree_map(split, args), tree_map(split, kwargs)
            st.replaying = True
            try:
                try:
                    g = vmap(grad(one), in_dims=(None, a_dims, kw_dims, 0))(params, args, kwargs, deltas)
                except (RuntimeError, NotImplementedError, ValueError, TypeError):
                    # data-dependent control flow (e.g. attention masks): one sample at a time
                    g = self._loop(inner, params, args, kwargs, deltas, a_dims, kw_dims)
            finally:
                st.replaying = False
            for name, i in self.owned.items():
                st.add(i, g[name].to(self.dtype))
        self.calls = []

    def _loop(self, inner: Any, params: dict, args: tuple, kwargs: dict, deltas: list[Tensor], a_dims: Any,
              kw_dims: Any) -> dict[str, Tensor]:
        rows = []
        for k in range(self.state.n):
            pick = lambda v, dim: v[k : k + 1] if dim == 0 else v  # noqa: E731
            th = {name: p.clone().requires_grad_(True) for name, p in params.items()}
            with torch.enable_grad():
                val = inner(th, tree_map(pick, args, a_dims), tree_map(pick, kwargs, kw_dims), [d[k : k + 1] for d in deltas])
                gs = torch.autograd.grad(val, list(th.values()), allow_unused=True)
            rows.append({name: torch.zeros_like(p) if gi is None else gi for (name, p), gi in zip(th.items(), gs)})
        return {name: torch.stack([r[name] for r in rows]) for name in params}


def _m2(mean: Tensor, sq: Tensor, n: int) -> Tensor:
    """M2 = Σg² − n·μ² in place of the fresh ``sq``, while the layer's sums are still in cache (the
    clamp absorbs the rounding of a near-constant coordinate)."""
    return sq.addcmul_(mean, mean, value=-n).clamp_min_(0)


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
        if sq and not one:
            for s in (f, r):
                s.m2 = [torch.addcmul(q, m, m, value=s.n) for m, q in zip(s.mean, s.m2)]
        return f, r

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
                outs = self._pass(model, params, plan, batch, [b.n for b in parsed], loss, sq)
                for acc, b, out in zip(accs, parsed, outs):
                    merge_into(acc, b.n, *out)
            else:
                for acc, b in zip(accs, parsed):
                    chunk = b.n if self.chunk_size is None else min(self.chunk_size, b.n)
                    for start in range(0, b.n, chunk):
                        stop = min(start + chunk, b.n)
                        outs = self._pass(model, params, plan, b.slice(start, stop), [stop - start], loss, False)
                        merge_into(acc, stop - start, *outs[0])
        whole = sorted(plan.whole | self._last_unsplittable)
        if whole:
            if self.fallback is None:
                raise ValueError(f"HookEngine(fallback=None) cannot compute the statistics of {[plan.names[i] for i in whole]}")
            sub = [params[i] for i in whole]
            for acc, b in zip(accs, parsed):
                st = self.fallback(model, sub, b, loss)
                for j, i in enumerate(whole):
                    acc.mean[i] = st.mean[j]
                    acc.m2[i] = torch.addcmul(st.m2[j], st.mean[j], st.mean[j], value=acc.n) if (sq and one_pass) else st.m2[j]
        return accs

    def _pass(self, model: nn.Module, params: list[Tensor], plan: _Plan, batch: ParsedBatch, segments: list[int],
              loss: PerSampleLoss, sq: bool, check: dict[int, Tensor] | None = None) -> list[tuple[list[Tensor], list[Tensor], Tensor]]:
        """One forward+backward; per segment ``(means, m2s, mean loss)``. ``check``: filled with
        autograd's gradient of the summed loss for every parameter (verification)."""
        dtypes = [acc_dtype(p.dtype) for p in params]
        st = _State(batch.n, segments, len(params), sq)
        hooked = {i for _, owned in plan.rules.values() for i in owned.values()}
        taps: list[_RuleTap | _LayerTap] = []
        for mod, (rule, owned) in plan.rules.items():
            owned = {n: i for n, i in owned.items() if i not in plan.whole}
            if owned:
                taps.append(_RuleTap(mod, rule, owned, st, dtypes[next(iter(owned.values()))],
                                     any(i in plan.shared for i in owned.values())))
        for mod, owned in plan.layers.items():
            owned = {n: i for n, i in owned.items() if i not in plan.whole}
            if owned:
                taps.append(_LayerTap(mod, owned, st, dtypes[next(iter(owned.values()))]))
        st.targets = [x for x in batch.tensors() if x.requires_grad]
        for i, p in enumerate(params):
            if p.requires_grad and (i not in hooked or check is not None):
                st.targets.append(p)
        handles = [t.module.register_forward_hook(t.forward_hook, with_kwargs=True) for t in taps]
        try:
            with torch.enable_grad():
                out = batch.call(model)
                losses = loss.batched(model, batch, out)
                direct = [(c, o) for t in taps if isinstance(t, _RuleTap) for c, o in t.direct()]
                unique = list({id(t): t for t in st.targets}.values())
                inputs = unique + [o for _, o in direct]
                if inputs:
                    try:
                        grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                    except RuntimeError as err:
                        if "use_reentrant=True" not in str(err):
                            raise
                        raise ValueError(_REENTRANT) from err
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
                    raise ValueError(f"{type(t.module).__name__}: {_REENTRANT}")
                t.finish()
        finally:
            for h in handles:
                h.remove()
        self._last_unsplittable = set(st.unsplittable)
        self._last_losses = losses.detach()
        for i, why in st.unsplittable.items():
            self._warn_once(plan.names[i], why)
        return self._collect(params, dtypes, st, losses, segments)

    def _collect(self, params: list[Tensor], dtypes: list[torch.dtype], st: _State, losses: Tensor,
                 segments: list[int]) -> list[tuple[list[Tensor], list[Tensor], Tensor]]:
        losses = losses.detach().to(acc_dtype(losses.dtype))
        seg_losses = [part.mean() for part in losses.split(segments)]
        per_sample = {i: st.dense(i, params[i].shape).split(segments) for i in set(st.per_sample) | set(st.sparse)}
        outs = []
        for seg in range(len(segments)):
            means, m2s = [], []
            for i, p in enumerate(params):
                r = st.results[seg][i]
                if i in per_sample:
                    g = per_sample[i][seg]
                    mean = g.sum(0).div_(g.shape[0])
                    sq = sum_sq(g)
                    r = (mean, sq if st.sq else _m2(mean, sq, g.shape[0]))
                elif r is None:  # not used by this forward (or left to the fallback): no gradient
                    r = (torch.zeros_like(p, dtype=dtypes[i]), torch.zeros_like(p, dtype=dtypes[i]))
                means.append(r[0])
                m2s.append(r[1])
            outs.append((means, m2s, seg_losses[seg]))
        return outs

    _last_unsplittable: set[int] = set()

    def _verify(self, model: nn.Module, params: list[Tensor], plan: _Plan, batch: ParsedBatch, loss: PerSampleLoss) -> None:
        """Check the plan against autograd on ``batch`` (see the module docstring); mark it verified."""
        check: dict[int, Tensor] = {}
        out = self._pass(model, params, plan, batch, [batch.n], loss, False, check=check)[0]
        bad = []
        scale = max((float(g.norm()) for g in check.values()), default=0.0)
        for i, g in check.items():
            if i in plan.whole or i in self._last_unsplittable:
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
            together = self._last_losses[0]
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
