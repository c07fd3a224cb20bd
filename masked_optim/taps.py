"""Layer taps of the hook engine (docs/design.md §4): what each layer call records in the forward
and the backward, and how it turns that into statistics.

:class:`RuleTap` serves a layer with a registered rule (:mod:`masked_optim.rules`): its input and
output gradient ``δ`` per call, the rule's moments — or, for a parameter shared between layers or a
layer called twice, the rule's per-sample gradients, summed over uses. :class:`LayerTap` is the
per-layer fallback: it records a layer's inputs and output gradients and takes per-sample gradients
of the layer's own parameters from ``vmap`` of that layer alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .rules import Rule, SparseRows
from .stats import sumsq_to_m2_

__all__ = ["CERTIFY_MIN_NUMEL", "DEFER_MAX", "REENTRANT", "Call", "LayerTap", "RuleTap", "State", "first_input",
           "in_backward"]


# layers whose output gradient has at most this many elements run their rule after the backward
# rather than inside it: the same arithmetic measured up to 2x slower inside autograd's hooks for the
# small matrices of an MLP; large layers still run (and free their activations) one by one
DEFER_MAX = 1 << 16
#: layers with at least this many parameter elements get a rule's finiteness certificate (Rule.finite):
#: below it, summing the means to check them is cheaper than the certificate's reductions
CERTIFY_MIN_NUMEL = 1 << 18

REENTRANT = (
    "the model uses torch.utils.checkpoint with use_reentrant=True, whose layers run without gradients "
    "and again inside the backward: per-sample statistics cannot be taken through it; use "
    "use_reentrant=False (supported), or disable activation checkpointing for the statistics"
)


def in_backward() -> bool:
    """Whether autograd is running a backward (a checkpointed layer being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


class State:
    """What one forward+backward collects."""

    def __init__(self, n: int, segments: list[int], nparams: int, sq: bool) -> None:
        self.n, self.segments, self.sq = n, segments, sq
        self.equal = len(segments) > 1 and segments.count(segments[0]) == len(segments)  # k equal segments
        self.results: list[list[tuple[Tensor, Tensor] | None]] = [[None] * nparams for _ in segments]
        # per segment and parameter: a rule's certificate that the mean is finite (Rule.finite), or None
        self.finite: list[list[Tensor | None]] = [[None] * nparams for _ in segments]
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


def _records(tap: Any, st: State) -> bool:
    """Whether a layer call is one to record: not the fallback replaying a layer, not activation
    checkpointing recomputing the forward inside the backward, not a forward without gradients
    (each noted on the tap)."""
    if st.replaying:
        return False
    if in_backward():
        tap.recomputed = True
        return False
    if not torch.is_grad_enabled():
        tap.no_grad = True
        return False
    return True


class Call:
    __slots__ = ("a", "needs_grad", "node", "nr", "output", "version", "delta")

    def __init__(self, a: Tensor, needs_grad: bool) -> None:
        self.a, self.needs_grad = a, needs_grad
        self.node: Any = None
        self.nr = self.version = 0
        self.output: Tensor | None = None
        self.delta: Tensor | None = None


class RuleTap:
    """A layer with a rule: per call its input and ``δ`` (from the node that formed the output)."""

    def __init__(self, module: nn.Module, rule: Rule, owned: dict[str, int], state: State, dtype: torch.dtype,
                 shared: bool, certify: bool) -> None:
        self.module, self.rule, self.owned, self.state, self.dtype = module, rule, owned, state, dtype
        self.shared = shared  # some parameter is used by another layer too: per-sample gradients
        self.certify = certify  # the rule's finiteness certificate is worth its reductions (see _certificate)
        self.calls: list[Call] = []
        self.no_grad = self.recomputed = False

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if not _records(self, st):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = first_input(args, kwargs)
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
        call = Call(x.detach(), x.requires_grad)
        call.node, call.nr = output.grad_fn, output.output_nr
        self.calls.append(call)
        if output.numel() <= DEFER_MAX:
            call.output, call.version = output, output._version
        else:
            self._hook(call)
        return replaced

    def _hook(self, call: Call) -> None:
        # the backward only has to carry δ through every hooked module: it does when autograd is asked
        # for the parameters of the first layers (whose input needs no gradient) and for every leaf
        # the hooks do not own (measured cheaper than asking for module inputs)
        if not call.needs_grad:
            self.state.targets.append(getattr(self.module, "bias" if "bias" in self.owned else next(iter(self.owned))))
        call.node.register_prehook(lambda grad_outputs: self._backward(call, grad_outputs[call.nr]))
        call.node = None

    def direct(self) -> list[tuple[Call, Tensor]]:
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

    def _backward(self, call: Call, delta: Tensor | None) -> None:
        call.delta = delta
        if delta is not None and delta.numel() > DEFER_MAX and not self._per_sample_mode():
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
            cert = self._certificate(a, d)
            for name, (mean, sq) in stacked.items():
                if name in self.owned:
                    m2 = sq if st.sq else sumsq_to_m2_(mean, sq, n)
                    for seg, moments in enumerate(zip(mean.unbind(), m2.unbind())):
                        st.results[seg][self.owned[name]] = moments
                        st.finite[seg][self.owned[name]] = cert
            return
        for seg, (a_s, d_s) in enumerate(zip(a.split(st.segments), d.split(st.segments))):
            out = self.rule.moments(self.module, a_s, d_s)
            self._check(out)
            cert = self._certificate(a_s, d_s)
            for name, (total, sq) in out.items():
                if name in self.owned:
                    mean = total.div_(a_s.shape[0])
                    st.results[seg][self.owned[name]] = (mean, sq if st.sq else sumsq_to_m2_(mean, sq, a_s.shape[0]))
                    st.finite[seg][self.owned[name]] = cert

    def _certificate(self, a: Tensor, d: Tensor) -> Tensor | None:
        """The rule's certificate that this layer's means are finite, for layers large enough that
        reading their means to check them costs more than the certificate's few reductions
        (``certify``, decided with the plan)."""
        return self.rule.finite(self.module, a, d) if self.certify else None


class Capture(torch.autograd.Function):
    """Identity on a layer's outputs whose backward records their gradients."""

    @staticmethod
    def forward(ctx: Any, record: list, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.record = record
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.record.append(grads)
        return (None, *grads)


class LayerTap:
    """Per-layer fallback: records each call's inputs and output gradients; afterwards, per-sample
    gradients of the layer's own parameters by ``vmap`` over its vector-Jacobian product."""

    def __init__(self, module: nn.Module, owned: dict[str, int], state: State, dtype: torch.dtype) -> None:
        self.module, self.owned, self.state, self.dtype = module, owned, state, dtype
        self.calls: list[tuple[tuple, dict, Any, list[int], list]] = []
        self.no_grad = self.recomputed = False

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if not _records(self, st):
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
        captured = Capture.apply(record, *[flat[j] for j in idx])
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
