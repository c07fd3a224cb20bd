"""A statistics engine that never materialises per-sample gradients of the whole model (docs/design.md §4).

One forward and one backward of the *summed* per-sample loss carry the output gradients ``δ`` of
every layer; module hooks turn each supported layer's input ``a`` and ``δ`` into ``Σ_k g_k`` and
``Σ_k g_k²`` of its own parameters — ``δᵀa`` and ``(δ²)ᵀ(a²)`` for a plain ``nn.Linear`` (two matrix
products), a Gram form for short convolutions and sequences, per-sample gradients of one layer at a
time otherwise — so memory is ``O(n × largest layer)``, never ``n × P``, and autograd forms no
weight gradient the rules form again (autograd returns a small layer's δ directly; a large first
layer's bias gradient, or its weight's, carries the backward to it).  :meth:`HookEngine.pair` serves
the forget and the retain batch with one pass over their concatenation.  Parameters of modules it does not support (or of
modules called more than once, or shared between modules) are handed to a fallback engine (the
vmap reference) within the same call.

Supported: ``nn.Linear`` (any leading dims), ``nn.Conv1d``/``nn.Conv2d`` (groups, stride, padding,
dilation; zero padding), ``nn.Embedding`` (``padding_idx``; not ``max_norm``), the affine parameters
of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (eval behaviour, running stats).
Subclasses of these are *not* assumed to compute the same function and fall back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .mask import _zero
from .stats import (
    Batch,
    GradStats,
    LossFn,
    StatsEngine,
    VmapEngine,
    _acc_dtype,
    _merge_into,
    _param_names,
    eval_behaviour,
    validate_batch,
)

__all__ = ["HookEngine", "supports"]


# ---------------------------------------------------------------------------------------------------
def _sum_sq(g: Tensor) -> Tensor:
    """Σ over dim 0 of g², without materialising g² (einsum reduces it as a batched product,
    2-3x faster on CPU than ``(g * g).sum(0)``)."""
    flat = g.reshape(g.shape[0], -1)
    return torch.einsum("bi,bi->i", flat, flat).view(g.shape[1:])


_CACHE_RESIDENT = 1 << 22  # elements; above this, B per-sample gradients at once leave the CPU caches


# layers whose output gradient has at most this many elements run their rule after the backward
# rather than inside it: the same arithmetic measured up to 2x slower inside autograd's hooks for the
# small matrices of an MLP; large layers still run (and free their activations) one by one
_DEFER_MAX = 1 << 16

_GRAM_MAX_INNER = 4  # contraction lengths up to this use the Gram form (see _gram_sum_sq)
_TRIU: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _sample_major(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, *, O, L]``, ``[B, *, L, K]`` → ``[*, O, B·L]``, ``[*, B·L, K]``: one product sums over samples."""
    b, batch, o, k, length = left.shape[0], left.shape[1:-2], left.shape[-2], right.shape[-1], left.shape[-1]
    return left.movedim(0, -2).reshape(*batch, o, b * length), right.movedim(0, -3).reshape(*batch, b * length, k)


def _gram_sum_sq(left: Tensor, right: Tensor) -> Tensor:
    """``Σ_b (left[b] @ right[b])²`` without forming any product ``left[b] @ right[b]``.

    With ``g_b = Σ_l x_bl y_blᵀ``, ``Σ_b g_b² = Σ_{b,l,l'} (x_bl ⊙ x_bl') (y_bl ⊙ y_bl')ᵀ``: one matrix
    product with inner size ``B·L(L+1)/2`` (symmetric pairs counted once, off-diagonal ones twice).
    For a short contraction (``L`` positions: the deep layers of a ResNet, short sequences) this is
    far cheaper than ``B`` outer products of the full layer size — measured 15x on a 512→512 3x3
    convolution at 1x1 resolution, B=16 — and it needs no ``B × layer`` memory at all.
    """
    length = left.shape[-1]
    if length == 1:
        return torch.matmul(*_sample_major(left.square(), right.square()))
    key = (length, left.device)
    if key not in _TRIU:  # cached per device: no host-to-device copies per layer and step
        iu = torch.triu_indices(length, length, device=left.device)
        _TRIU[key] = (iu[0], iu[1], torch.where(iu[0] == iu[1], 1.0, 2.0).to(left.device))
    i, j, w = _TRIU[key]
    x = left[..., i] * left[..., j] * w.to(left.dtype)  # [B, *, O, T]
    rt = right.transpose(-1, -2)
    y = (rt[..., i] * rt[..., j]).transpose(-1, -2)  # [B, *, T, K]
    return torch.matmul(*_sample_major(x, y))


def _per_sample_moments(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_b g_b, Σ_b g_b²)`` of the per-sample products ``g_b = left[b] @ right[b]``.

    A short contraction uses the Gram form. On CPU, when the B products would not fit the caches
    together, one sample at a time with in-place accumulation: measured 4-5x faster for the 3x3
    convolutions of a ResNet-18 (B=16), where one layer's per-sample gradients reach 150 MB."""
    if left.shape[-1] <= _GRAM_MAX_INNER:
        return torch.matmul(*_sample_major(left, right)), _gram_sum_sq(left, right)
    b = left.shape[0]
    per_sample = left[0].shape[:-1].numel() * right.shape[-1]
    if left.device.type != "cpu" or b * per_sample <= _CACHE_RESIDENT:
        g = torch.matmul(left, right)
        return g.sum(0), _sum_sq(g)
    return _accumulate(torch.matmul(left[k], right[k]) for k in range(b))


def _accumulate(gs: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """``(Σ g, Σ g²)`` over an iterable of same-shape tensors, in place."""
    it = iter(gs)
    g = next(it)
    total, sq = g, g.square()  # g is fresh: it becomes the running sum
    for g in it:
        total.add_(g)
        sq.addcmul_(g, g)
    return total, sq


def _linear(m: nn.Linear, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    if a.dim() == 2:
        d2 = d * d
        out["weight"] = (d.t() @ a, d2.t() @ (a * a))
        if m.bias is not None:
            out["bias"] = (d.sum(0), d2.sum(0))
    else:
        # a sequence dimension: per-sample gradients sum over positions before squaring
        a3, d3 = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
        out["weight"] = _per_sample_moments(d3.transpose(1, 2), a3)
        if m.bias is not None:
            gb = d3.sum(1)
            out["bias"] = (gb.sum(0), (gb * gb).sum(0))
    return out


def _linear_segments(m: nn.Linear, a: Tensor, d: Tensor, k: int) -> dict[str, tuple[Tensor, Tensor]] | None:
    """:func:`_linear` of ``k`` equal consecutive segments of a 2-d batch at once, as ``[k, ...]``
    *means* and ``Σg²`` (the products scale by 1/n on the fly: no pass to divide) from batched
    products, half the operations of one call per segment (``None``: not 2-d)."""
    if a.dim() != 2:
        return None
    n = a.shape[0] // k
    a3, d3 = a.view(k, n, a.shape[-1]), d.view(k, n, d.shape[-1])
    d2 = d3 * d3
    dt = d3.transpose(1, 2)
    mean = torch.baddbmm(_zero(a), dt, a3, beta=0, alpha=1.0 / n)
    out = {"weight": (mean, torch.bmm(d2.transpose(1, 2), a3 * a3))}
    if m.bias is not None:
        out["bias"] = (d3.mean(1), d2.sum(1))
    return out


def _conv(m: nn.Conv1d | nn.Conv2d, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    if isinstance(m, nn.Conv1d):
        a, d = a.unsqueeze(2), d.unsqueeze(2)
        pad = 0 if m.padding == "valid" else m.padding[0]
        k, s, p, dil = (1, m.kernel_size[0]), (1, m.stride[0]), (0, pad), (1, m.dilation[0])
    else:
        k, s, dil = m.kernel_size, m.stride, m.dilation
        p = (0, 0) if m.padding == "valid" else m.padding
    b, groups = a.shape[0], m.groups
    positions = d.shape[2] * d.shape[3]
    if (a.device.type == "cpu" and positions > _GRAM_MAX_INNER
            and b * (m.weight[0].numel() * groups) * positions > _CACHE_RESIDENT):
        # a large unfolded input: let the convolution kernel form each sample's weight gradient
        # (measured 2-4x faster than unfold + matmul for the 32x32 and 16x16 layers of a ResNet)
        w = m.weight.detach().to(a.dtype).reshape(d.shape[1], -1, *k)
        s_w, q_w = _accumulate(
            torch.ops.aten.convolution_backward(
                d[j : j + 1], a[j : j + 1], w, None, list(s), list(p), list(dil), False, [0, 0], groups,
                [False, True, False],
            )[1]
            for j in range(b)
        )
    else:
        cols = F.unfold(a, k, dilation=dil, padding=p, stride=s)  # [B, Cin·kh·kw, L]
        cols = cols.view(b, groups, -1, cols.shape[-1])
        dd = d.reshape(b, groups, -1, cols.shape[-1])  # [B, G, Cout/G, L]
        # per-sample gradients of this layer only: [B, G, Cout/G, L] @ [B, G, L, Cin/G·kh·kw]
        s_w, q_w = _per_sample_moments(dd, cols.transpose(-1, -2))
    out = {"weight": (s_w.reshape(m.weight.shape), q_w.reshape(m.weight.shape))}
    if m.bias is not None:
        gb = d.reshape(b, d.shape[1], -1).sum(-1)
        out["bias"] = (gb.sum(0), (gb * gb).sum(0))
    return out


def _embedding(m: nn.Embedding, idx: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    b, dim, vocab = idx.shape[0], d.shape[-1], m.num_embeddings
    idx = idx.reshape(b, -1)
    d = d.reshape(b, -1, dim)
    if m.padding_idx is not None:
        d = d * (idx != m.padding_idx).unsqueeze(-1).to(d.dtype)
    # per-sample gradient rows: sum δ over the positions of each (sample, token) pair
    key = (torch.arange(b, device=idx.device).unsqueeze(1) * vocab + idx).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), dim, dtype=d.dtype, device=d.device).index_add_(0, inverse, d.reshape(-1, dim))
    token = uniq % vocab
    total = torch.zeros(vocab, dim, dtype=d.dtype, device=d.device).index_add_(0, token, rows)
    sq = torch.zeros(vocab, dim, dtype=d.dtype, device=d.device).index_add_(0, token, rows * rows)
    return {"weight": (total, sq)}


def _affine_norm(x_hat: Tensor, d: Tensor, m: nn.Module, channel_dim: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    b = d.shape[0]
    if channel_dim is None:  # LayerNorm: parameters cover the trailing normalized_shape
        shape = m.weight.shape if m.weight is not None else m.bias.shape
        gw = (d * x_hat).reshape(b, -1, *shape).sum(1)
        gb = d.reshape(b, -1, *shape).sum(1)
    else:  # per-channel parameters on dim 1
        gw = (d * x_hat).reshape(b, d.shape[1], -1).sum(-1)
        gb = d.reshape(b, d.shape[1], -1).sum(-1)
    out = {}
    if getattr(m, "weight", None) is not None:
        out["weight"] = (gw.sum(0), (gw * gw).sum(0))
    if getattr(m, "bias", None) is not None:
        out["bias"] = (gb.sum(0), (gb * gb).sum(0))
    return out


def _layer_norm(m: nn.LayerNorm, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return _affine_norm(F.layer_norm(a, m.normalized_shape, None, None, m.eps), d, m, None)


def _group_norm(m: nn.GroupNorm, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return _affine_norm(F.group_norm(a, m.num_groups, None, None, m.eps), d, m, 1)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    view = (1, -1) + (1,) * (a.dim() - 2)
    x_hat = (a - m.running_mean.view(view)) * torch.rsqrt(m.running_var.view(view) + m.eps)
    return _affine_norm(x_hat.to(d.dtype), d, m, 1)


# Per-layer rules: (module, input a, output grad δ) -> {param name: (Σ_k g_k, Σ_k g_k²)}, in the
# accumulation dtype.
_RULES: dict[type, Callable[[nn.Module, Tensor, Tensor], dict[str, tuple[Tensor, Tensor]]]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
}

# Rules that take k equal consecutive segments at once ([k, ...] means and Σg²), or return None when
# they cannot.
_SEGMENT_RULES: dict[type, Callable[[nn.Module, Tensor, Tensor, int], dict[str, tuple[Tensor, Tensor]] | None]] = {
    nn.Linear: _linear_segments,
}


def supports(module: nn.Module) -> bool:
    """Whether :class:`HookEngine` computes this module's own parameters' statistics itself."""
    rule = _RULES.get(type(module))
    if rule is None:
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding == "valid" or (module.padding_mode == "zeros" and not isinstance(module.padding, str))
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    return True


class _Tap:
    """Forward/backward taps on one module: per segment of the batch, ``(mean, M2)`` of each owned
    parameter (``(mean, Σg²)`` with ``sq``), written to ``results[segment][param index]``."""

    def __init__(
        self,
        module: nn.Module,
        owned: dict[str, int],
        segments: list[int],
        equal: bool,
        results: list[list[tuple[Tensor, Tensor] | None]],
        targets: list[Tensor],
        acc_dtype: torch.dtype,
        sq: bool = False,
    ) -> None:
        self.module, self.owned, self.segments, self.results = module, owned, segments, results
        self.equal = equal  # k > 1 segments of one size
        self.targets, self.acc_dtype, self.sq = targets, acc_dtype, sq
        self.calls = 0
        self.input: Tensor | None = None
        self.input_needs_grad = False
        self.node: torch.autograd.graph.Node | None = None  # formed the output
        self.output_nr = self.version = 0
        self.output: Tensor | None = None  # a small layer's output, whose δ autograd returns directly
        self.deferred: Tensor | None = None

    def forward_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.calls += 1
        if self.calls > 1 or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = inputs[0]
        self.input, self.input_needs_grad = x.detach(), x.requires_grad
        self.node, self.output_nr = output.grad_fn, output.output_nr
        if output.numel() <= _DEFER_MAX:
            # small: autograd returns its δ directly (no hook; nor any backward below the first layer)
            # and the rule runs after the backward, where the same arithmetic measured up to 2x faster
            # than inside autograd's hooks
            self.output, self.version = output, output._version
        else:
            self.hook()

    def hook(self) -> None:
        """Take δ in the backward, from the node that formed the output (before any in-place change)."""
        # the backward only has to carry δ through every hooked module: it does when autograd is asked
        # for the parameters of the first layers (whose input needs no gradient) and for every leaf
        # the hooks do not own; gradients of module inputs would do too, but they would all be held
        # until the backward ends (measured +150 MiB on a ResNet-18 step)
        if not self.input_needs_grad:  # its bias when it has one: the cheapest gradient to form
            self.targets.append(getattr(self.module, "bias" if "bias" in self.owned else next(iter(self.owned))))
        nr = self.output_nr
        self.node.register_prehook(lambda grad_outputs: self.backward_hook(grad_outputs[nr]))  # type: ignore[union-attr]
        self.node = None

    def direct(self) -> Tensor | None:
        """The output whose δ autograd should return, or ``None`` (not small, or changed in place since
        the forward: then from the node that formed it, :meth:`hook`)."""
        out, self.output = self.output, None
        if out is not None and out._version != self.version:
            self.hook()
            return None
        return out

    def backward_hook(self, grad_out: Tensor | None) -> None:
        if self.calls != 1 or self.input is None or grad_out is None:
            return
        if grad_out.numel() <= _DEFER_MAX:
            self.deferred = grad_out
            return
        self.finish(grad_out)

    def finish(self, grad_out: Tensor | None = None) -> None:
        """Run the layer rule on the stored input and ``grad_out`` (default: the deferred one)."""
        if grad_out is None:
            grad_out, self.deferred = self.deferred, None
            if grad_out is None:
                return
        x, self.input = self.input, None  # release the activation as soon as it is used
        a = x if x.dtype in (self.acc_dtype, torch.long, torch.int) else x.to(self.acc_dtype)
        d = grad_out if grad_out.dtype == self.acc_dtype else grad_out.to(self.acc_dtype)
        k, n = len(self.segments), self.segments[0]
        batched = _SEGMENT_RULES.get(type(self.module)) if self.equal else None
        stacked = batched(self.module, a, d, k) if batched is not None else None
        if stacked is not None:  # every segment at once: [k, ...] means and Σg²
            for name, (mean, sq) in stacked.items():
                if name in self.owned:
                    m2 = sq if self.sq else _m2(mean, sq, n)
                    for seg, moments in enumerate(zip(mean.unbind(), m2.unbind())):
                        self.results[seg][self.owned[name]] = moments
            return
        rule = _RULES[type(self.module)]
        for seg, (a_s, d_s) in enumerate(zip(a.split(self.segments), d.split(self.segments))):
            for name, (total, sq) in rule(self.module, a_s, d_s).items():
                if name in self.owned:
                    mean = total.div_(a_s.shape[0])
                    self.results[seg][self.owned[name]] = (mean, sq if self.sq else _m2(mean, sq, a_s.shape[0]))


def _m2(mean: Tensor, sq: Tensor, n: int) -> Tensor:
    """M2 = Σg² − n·μ² in place of the fresh ``sq``, while the layer's sums are still in cache (the
    clamp absorbs the rounding of a near-constant coordinate)."""
    return sq.addcmul_(mean, mean, value=-n).clamp_min_(0)


class HookEngine:
    """Fast statistics engine: one forward+backward per chunk, moments from layer hooks.

    The backward only propagates output gradients δ; each supported layer forms ``Σ g`` and ``Σ g²``
    of its own parameters from its input and δ.  :meth:`pair` computes the statistics of two batches
    (forget and retain) in one forward+backward over their concatenation.

    Args:
        fallback: engine for the parameters of unsupported modules (the vmap reference by default);
            ``None`` raises instead.
        chunk_size: samples per forward/backward (``None``: the whole batch at once); chunk results are
            Chan-merged, so memory scales with the chunk, not the batch.
    """

    def __init__(self, fallback: StatsEngine | None = "default", chunk_size: int | None = None) -> None:  # type: ignore[assignment]
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.fallback = VmapEngine() if fallback == "default" else fallback
        self.chunk_size = chunk_size
        self._plan: tuple | None = None

    def plan(self, model: nn.Module, params: Sequence[Tensor]) -> tuple[dict[nn.Module, dict[str, int]], list[int]]:
        """Which parameters (by index) the hooks handle, per module, and which go to the fallback."""
        return self._cached_plan(model, params, list(model.modules()))

    def _cached_plan(
        self, model: nn.Module, params: Sequence[Tensor], modules: list[nn.Module]
    ) -> tuple[dict[nn.Module, dict[str, int]], list[int]]:
        # the optimizer asks for the same plan every step: reuse it while model and params are the same
        key = (id(model), tuple(id(p) for p in params), tuple(id(m) for m in modules))
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        result = self._make_plan(model, params)
        self._plan = (key, result)
        return result

    def _make_plan(self, model: nn.Module, params: Sequence[Tensor]) -> tuple[dict[nn.Module, dict[str, int]], list[int]]:
        _param_names(model, params)  # a clear error for foreign parameters, once per plan
        homes: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                homes.setdefault(id(p), []).append((mod, pname))
        owned: dict[nn.Module, dict[str, int]] = {}
        rest = []
        for i, p in enumerate(params):
            home = homes.get(id(p), [])
            if len(home) == 1 and supports(home[0][0]):
                owned.setdefault(home[0][0], {})[home[0][1]] = i
            else:
                rest.append(i)
        return owned, rest

    def __call__(
        self, model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn | None = None
    ) -> GradStats:
        return self._run(model, list(params), [validate_batch(batch)], loss_fn, concat=False)[0]

    def pair(
        self, model: nn.Module, params: Sequence[Tensor], first: Batch, second: Batch, loss_fn: LossFn | None = None
    ) -> tuple[GradStats, GradStats]:
        """Statistics of two batches, equal to two calls. Without ``chunk_size``, and when the inputs
        agree in dtype and trailing shape, one forward+backward over the concatenated batches (the
        model runs in eval behaviour, so the samples stay independent)."""
        parsed = [validate_batch(b) for b in (first, second)]
        first_stats, second_stats = self._run(model, list(params), parsed, loss_fn, concat=self._one_pass(parsed))
        return first_stats, second_stats

    def _pair_sq(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        first: Batch,
        second: Batch,
        loss_fn: LossFn | None = None,
        *,
        validated: bool = False,
    ) -> tuple[GradStats, GradStats] | None:
        """:meth:`pair` whose ``m2`` lists hold ``Σ_k g_k²`` instead of M2, saving two passes over every
        parameter's statistics; for the optimizers' hard mask, which reads ``Σg²`` with an adjusted
        threshold. ``None`` when the batches would not go through one pass together. ``validated``:
        the batches are :func:`~masked_optim.stats.validate_batch`'s results (the caller checked them)."""
        batches = [first, second]
        parsed = batches if validated else [validate_batch(b) for b in batches]
        if not self._one_pass(parsed):  # type: ignore[arg-type]
            return None
        first_stats, second_stats = self._run(model, list(params), parsed, loss_fn, concat=True, sq=True)  # type: ignore[arg-type]
        return first_stats, second_stats

    def _one_pass(self, parsed: list[tuple[tuple[Tensor, ...], Tensor, int]]) -> bool:
        """Whether validated batches go through one forward+backward together."""
        return len(parsed) > 1 and self.chunk_size is None and _concatenable(parsed)

    def _run(
        self,
        model: nn.Module,
        params: list[Tensor],
        parsed: list[tuple[tuple[Tensor, ...], Tensor, int]],
        loss_fn: LossFn | None,
        concat: bool,
        sq: bool = False,
    ) -> list[GradStats]:
        """Statistics of each (validated) batch; ``concat``: in one pass over their concatenation
        (:meth:`_one_pass`), else chunk by chunk; ``sq``: ``Σg²`` in place of M2 (one pass only)."""
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        modules = list(model.modules())
        owned, rest = self._cached_plan(model, params, modules)
        device = params[0].device if params else parsed[0][1].device
        parsed = [(tuple(_to(x, device) for x in xs), _to(y, device), n) for xs, y, n in parsed]
        accs = [GradStats(0, [], [], None) for _ in parsed]  # type: ignore[arg-type]  # set by the first merge
        reused: set[int] = set()
        with eval_behaviour(model, modules):
            if concat:
                xs = tuple(torch.cat(parts) for parts in zip(*(p[0] for p in parsed)))
                y = torch.cat([p[1] for p in parsed])
                outs, reused = self._pass(model, modules, params, owned, xs, y, [p[2] for p in parsed], loss_fn, sq)
                for acc, (_, _, n), out in zip(accs, parsed, outs):
                    _merge_into(acc, n, *out)
            else:
                for acc, (xs, y, n) in zip(accs, parsed):
                    chunk = n if self.chunk_size is None else min(self.chunk_size, n)
                    for start in range(0, n, chunk):
                        stop = min(start + chunk, n)
                        outs, again = self._pass(
                            model, modules, params, owned, tuple(x[start:stop] for x in xs), y[start:stop], [stop - start],
                            loss_fn,
                        )
                        reused |= again
                        _merge_into(acc, stop - start, *outs[0])
        rest = sorted(set(rest) | reused)
        if rest:
            if self.fallback is None:
                names = _param_names(model, [params[i] for i in rest])
                raise ValueError(f"HookEngine does not support the modules owning parameters {names}")
            sub_params = [params[i] for i in rest]
            for acc, (xs, y, _) in zip(accs, parsed):
                sub = self.fallback(model, sub_params, (xs, y), loss_fn)
                for j, i in enumerate(rest):
                    acc.mean[i] = sub.mean[j]
                    acc.m2[i] = torch.addcmul(sub.m2[j], sub.mean[j], sub.mean[j], value=acc.n) if sq else sub.m2[j]
        return accs

    def _pass(
        self,
        model: nn.Module,
        modules: list[nn.Module],
        params: list[Tensor],
        owned: dict[nn.Module, dict[str, int]],
        xs: tuple[Tensor, ...],
        y: Tensor,
        segments: list[int],
        loss_fn: LossFn,
        sq: bool = False,
    ) -> tuple[list[tuple[list[Tensor], list[Tensor], Tensor]], set[int]]:
        """One forward+backward; per segment ``(means, m2s, mean loss)``, and the parameters of
        modules that turned out to be called more than once (left to the fallback)."""
        dtypes = [_acc_dtype(p.dtype) for p in params]
        results: list[list[tuple[Tensor, Tensor] | None]] = [[None] * len(params) for _ in segments]
        equal = len(segments) > 1 and segments.count(segments[0]) == len(segments)
        targets: list[Tensor] = [x for x in xs if x.requires_grad]
        hooked = {id(params[i]) for names in owned.values() for i in names.values()}
        targets += [  # (a shared leaf may appear twice: deduplicated below)
            p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad and id(p) not in hooked
        ]
        taps = [
            _Tap(mod, names, segments, equal, results, targets, dtypes[next(iter(names.values()))], sq)
            for mod, names in owned.items()
        ]
        handles = [t.module.register_forward_hook(t.forward_hook) for t in taps]
        try:
            with torch.enable_grad():
                out = model(*xs)
                losses = _per_sample_losses(loss_fn, out, y)
                outputs = [(t, o) for t in taps if (o := t.direct()) is not None]
                unique = list({id(t): t for t in targets}.values())
                inputs = unique + [o for _, o in outputs]
                if inputs:
                    grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                    for (t, _), g in zip(outputs, grads[len(unique):]):
                        t.deferred = g
            for t in taps:
                t.finish()
        finally:
            for h in handles:
                h.remove()
        again = {i for t in taps if t.calls > 1 for i in t.owned.values()}
        outs = []
        losses = losses.detach().to(_acc_dtype(losses.dtype))
        if equal:
            seg_losses = losses.view(len(segments), -1).mean(1).unbind()
        else:
            seg_losses = [part.mean() for part in losses.split(segments)]
        for seg in range(len(segments)):
            means, m2s = [], []
            for i, (p, r) in enumerate(zip(params, results[seg])):
                if r is None or i in again:  # unused here, or left to the fallback
                    r = (torch.zeros_like(p, dtype=dtypes[i]), torch.zeros_like(p, dtype=dtypes[i]))
                means.append(r[0])
                m2s.append(r[1])
            outs.append((means, m2s, seg_losses[seg]))
        return outs, again  # type: ignore[return-value]


def _to(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _concatenable(parsed: list[tuple[tuple[Tensor, ...], Tensor, int]]) -> bool:
    def same(ts: list[Tensor]) -> bool:
        return all(t.dtype == ts[0].dtype and t.shape[1:] == ts[0].shape[1:] for t in ts)

    if len({len(xs) for xs, _, _ in parsed}) != 1:
        return False
    return all(same(list(col)) for col in zip(*(xs for xs, _, _ in parsed))) and same([y for _, y, _ in parsed])


def _per_sample_losses(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    if loss_fn is F.cross_entropy:  # the default: skip vmap's overhead
        return F.cross_entropy(out, y, reduction="none")
    def one(o: Tensor, t: Tensor) -> Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    try:
        return vmap(one)(out, y)
    except (RuntimeError, NotImplementedError):  # a loss vmap cannot batch: one sample at a time
        return torch.stack([one(out[k], y[k]) for k in range(y.shape[0])])
