"""Per-layer statistics rules and their public registry (docs/design.md §4).

A rule turns one layer call's input ``a`` and output gradient ``δ`` (leading dimension: the
samples) into the per-sample gradient statistics of that layer's own parameters:

* ``moments(module, a, δ) -> {param name: (Σ_k g_k, Σ_k g_k²)}`` — without forming the per-sample
  gradients where a closed form exists (``δᵀa`` and ``(δ²)ᵀ(a²)`` for a plain ``nn.Linear``);
* ``per_sample(module, a, δ) -> {param name: g}`` with ``g`` of shape ``[n, *param.shape]`` — used
  when a parameter is shared between layers, or a layer is called more than once, so that the
  per-sample gradients of every use are summed before they are squared.

Either may be given; the other is derived. Rules apply to modules of exactly the registered type
(a subclass may compute another function) and to the parameter names they list; a module with
other parameters, or with forward hooks of its own, is handled by the per-layer fallback.

Built in: ``nn.Linear`` (any leading dims), ``nn.Conv1d``/``nn.Conv2d`` (groups, stride, padding,
dilation; zero padding), ``nn.Embedding`` (``padding_idx``; not ``max_norm``), the affine parameters
of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (eval behaviour, running stats),
and transformers' ``Conv1D`` (GPT-2; registered by name, transformers is not imported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import workspace
from .mask import zero

__all__ = ["Rule", "SparseRows", "register_rule", "rule_for", "sum_sq", "supports"]

Moments = dict[str, tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------------
def sum_sq(g: Tensor) -> Tensor:
    """Σ over dim 0 of g², without materialising g² (einsum reduces it as a batched product,
    2-3x faster on CPU than ``(g * g).sum(0)``)."""
    flat = g.reshape(g.shape[0], -1)
    return torch.einsum("bi,bi->i", flat, flat).view(g.shape[1:])


_CACHE_RESIDENT = 1 << 22  # elements; above this, B per-sample gradients at once leave the CPU caches


_GRAM_MAX_INNER = 4  # contraction lengths up to this use the Gram form (see _gram_sum_sq)
_TRIU: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _sample_major(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, *, O, L]``, ``[B, *, L, K]`` → ``[*, O, B·L]``, ``[*, B·L, K]``: one product sums over samples."""
    b, batch, o, k, length = left.shape[0], left.shape[1:-2], left.shape[-2], right.shape[-1], left.shape[-1]
    return left.movedim(0, -2).reshape(*batch, o, b * length), right.movedim(0, -3).reshape(*batch, b * length, k)


def _matmul(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y``, into a workspace buffer when one is lent (a large per-layer product: no page faults)."""
    shape = (*torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-2], y.shape[-1])
    return torch.matmul(x, y, out=_ws(shape, x))


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
        return _matmul(*_sample_major(left.square(), right.square()))
    key = (length, left.device)
    if key not in _TRIU:  # cached per device: no host-to-device copies per layer and step
        iu = torch.triu_indices(length, length, device=left.device)
        _TRIU[key] = (iu[0], iu[1], torch.where(iu[0] == iu[1], 1.0, 2.0).to(left.device))
    i, j, w = _TRIU[key]
    x = left[..., i] * left[..., j] * w.to(left.dtype)  # [B, *, O, T]
    rt = right.transpose(-1, -2)
    y = (rt[..., i] * rt[..., j]).transpose(-1, -2)  # [B, *, T, K]
    return _matmul(*_sample_major(x, y))


def _per_sample_moments(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_b g_b, Σ_b g_b²)`` of the per-sample products ``g_b = left[b] @ right[b]``.

    A short contraction uses the Gram form. On CPU, when the B products would not fit the caches
    together, one sample at a time with in-place accumulation: measured 4-5x faster for the 3x3
    convolutions of a ResNet-18 (B=16), where one layer's per-sample gradients reach 150 MB."""
    if left.shape[-1] <= _GRAM_MAX_INNER:
        return _matmul(*_sample_major(left, right)), _gram_sum_sq(left, right)
    b = left.shape[0]
    per_sample = left[0].shape[:-1].numel() * right.shape[-1]
    if left.device.type != "cpu" or b * per_sample <= _CACHE_RESIDENT:
        g = _matmul(left, right)
        out = g.sum(0), sum_sq(g)
        workspace.give_back(g)  # dead from here: the next layer's products reuse it
        return out
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


def _ws(shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    # a step's large outputs go to the optimizer's workspace (no page faults on CPU); None: fresh
    return workspace.lend(shape, dtype=like.dtype, device=like.device)


def _linear(m: nn.Linear, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return _linear_moments(a, d, m.bias is not None)


def _linear_moments(a: Tensor, d: Tensor, bias: bool) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    if a.dim() == 2:
        d2 = d * d
        shape = (d.shape[1], a.shape[1])
        out["weight"] = (torch.mm(d.t(), a, out=_ws(shape, a)), torch.mm(d2.t(), a * a, out=_ws(shape, a)))
        if bias:
            out["bias"] = (d.sum(0), d2.sum(0))
    else:
        # a sequence dimension: per-sample gradients sum over positions before squaring
        a3, d3 = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
        out["weight"] = _per_sample_moments(d3.transpose(1, 2), a3)
        if bias:
            gb = d3.sum(1)
            out["bias"] = (gb.sum(0), (gb * gb).sum(0))
    return out


def _linear_finite(m: nn.Linear, a: Tensor, d: Tensor) -> Tensor:
    """True only if every entry of ``δᵀa/n`` (and of ``Σδ/n``) is finite and at most ``finfo.max/4``:
    each sums ``terms`` products (samples × positions) of at most ``max(|a|, 1)·max|δ|``, so below
    ``finfo.max / (4·terms)`` no partial sum exceeds a quarter of the range. A NaN or ±inf in ``a``
    or ``δ`` makes a maximum NaN or inf: False."""
    if a.numel() == 0 or d.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=d.device)
    terms = max(1, a.numel() // max(1, a.shape[-1]))
    big = torch.finfo(d.dtype).max / (4 * terms)
    return torch.clamp_min(a.abs().amax(), 1.0) * d.abs().amax() <= big


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
    shape = (k, dt.shape[1], a3.shape[2])
    mean = torch.baddbmm(zero(a), dt, a3, beta=0, alpha=1.0 / n, out=_ws(shape, a))
    out = {"weight": (mean, torch.bmm(d2.transpose(1, 2), a3 * a3, out=_ws(shape, a)))}
    if m.bias is not None:
        out["bias"] = (d3.mean(1), d2.sum(1))
    return out


def _conv_geometry(m: nn.Conv1d | nn.Conv2d, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """``a`` and ``δ`` as 2-d convolution tensors, and (kernel, stride, padding, dilation) in 2-d."""
    if isinstance(m, nn.Conv1d):
        pad = 0 if m.padding == "valid" else m.padding[0]
        return a.unsqueeze(2), d.unsqueeze(2), ((1, m.kernel_size[0]), (1, m.stride[0]), (0, pad), (1, m.dilation[0]))
    p = (0, 0) if m.padding == "valid" else m.padding
    return a, d, (m.kernel_size, m.stride, p, m.dilation)


def _conv(m: nn.Conv1d | nn.Conv2d, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    a, d, (k, s, p, dil) = _conv_geometry(m, a, d)
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


def _embedding_rows(m: nn.Embedding, idx: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Each position's row of the flattened per-sample gradients ``[n·vocab, dim]`` (sample·vocab +
    token) and its ``δ`` (zero at ``padding_idx``), ``[n·L]`` and ``[n·L, dim]``."""
    b, dim = idx.shape[0], d.shape[-1]
    idx = idx.reshape(b, -1)
    d = d.reshape(b, -1, dim)
    if m.padding_idx is not None:
        d = d * (idx != m.padding_idx).unsqueeze(-1).to(d.dtype)
    return (torch.arange(b, device=idx.device).unsqueeze(1) * m.num_embeddings + idx).reshape(-1), d.reshape(-1, dim)


def _embedding(m: nn.Embedding, idx: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    dim, vocab = d.shape[-1], m.num_embeddings
    # per-sample gradient rows: sum δ over the positions of each (sample, token) pair
    key, d = _embedding_rows(m, idx, d)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), dim, dtype=d.dtype, device=d.device).index_add_(0, inverse, d)
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

# -- per-sample forms: [n, *param.shape] per parameter -------------------------------------------------
def _seq(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _linear_per_sample(m: nn.Linear, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    a3, d3 = _seq(a), _seq(d)
    out = {"weight": torch.bmm(d3.transpose(1, 2), a3)}
    if m.bias is not None:
        out["bias"] = d3.sum(1)
    return out


def _hf_conv1d(m: nn.Module, a: Tensor, d: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape ``[in, out]``."""
    out = _linear_moments(a, d, getattr(m, "bias", None) is not None)
    s, q = out["weight"]
    out["weight"] = (s.t(), q.t())
    return out


def _hf_conv1d_per_sample(m: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    a3, d3 = _seq(a), _seq(d)
    out = {"weight": torch.bmm(a3.transpose(1, 2), d3)}
    if getattr(m, "bias", None) is not None:
        out["bias"] = d3.sum(1)
    return out


@dataclasses.dataclass(frozen=True)
class SparseRows:
    """Per-sample gradients given by rows: ``g.view(n * rows, -1)[index] += values`` (an embedding
    touches only the rows of its sample's tokens), added into the other uses' dense gradients."""

    index: Tensor
    values: Tensor

    def dense(self, n: int, shape: torch.Size) -> Tensor:
        g = self.values.new_zeros(n * shape[0], *shape[1:])
        return g.index_add_(0, self.index, self.values).view(n, *shape)


def _embedding_per_sample(m: nn.Embedding, idx: Tensor, d: Tensor) -> dict[str, Tensor | SparseRows]:
    return {"weight": SparseRows(*_embedding_rows(m, idx, d))}


def _conv_per_sample(m: nn.Conv1d | nn.Conv2d, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    a, d, (k, s, p, dil) = _conv_geometry(m, a, d)
    b, groups = a.shape[0], m.groups
    cols = F.unfold(a, k, dilation=dil, padding=p, stride=s)
    cols = cols.view(b, groups, -1, cols.shape[-1])
    dd = d.reshape(b, groups, -1, cols.shape[-1])
    out = {"weight": torch.matmul(dd, cols.transpose(-1, -2)).reshape(b, *m.weight.shape)}
    if m.bias is not None:
        out["bias"] = d.reshape(b, d.shape[1], -1).sum(-1)
    return out


def _affine_per_sample(x_hat: Tensor, d: Tensor, m: nn.Module, channel_dim: int | None) -> dict[str, Tensor]:
    b = d.shape[0]
    if channel_dim is None:
        shape = m.weight.shape if m.weight is not None else m.bias.shape
        gw = (d * x_hat).reshape(b, -1, *shape).sum(1)
        gb = d.reshape(b, -1, *shape).sum(1)
    else:
        gw = (d * x_hat).reshape(b, d.shape[1], -1).sum(-1)
        gb = d.reshape(b, d.shape[1], -1).sum(-1)
    out = {}
    if getattr(m, "weight", None) is not None:
        out["weight"] = gw
    if getattr(m, "bias", None) is not None:
        out["bias"] = gb
    return out


def _layer_norm_per_sample(m: nn.LayerNorm, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    return _affine_per_sample(F.layer_norm(a, m.normalized_shape, None, None, m.eps), d, m, None)


def _group_norm_per_sample(m: nn.GroupNorm, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    return _affine_per_sample(F.group_norm(a, m.num_groups, None, None, m.eps), d, m, 1)


def _batch_norm_per_sample(m: nn.modules.batchnorm._BatchNorm, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    view = (1, -1) + (1,) * (a.dim() - 2)
    x_hat = (a - m.running_mean.view(view)) * torch.rsqrt(m.running_var.view(view) + m.eps)
    return _affine_per_sample(x_hat.to(d.dtype), d, m, 1)


# -- the registry ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """How the hook engine forms one layer type's statistics (see the module docstring).

    ``params``: the parameter names the rule fills; ``supports(module)``: whether this instance is
    covered (e.g. zero padding only); ``segments(module, a, δ, k)``: optional — ``k`` equal
    consecutive segments at once, as ``[k, ...]`` means and ``Σg²`` (``None`` when it cannot)."""

    moments: Callable[[nn.Module, Tensor, Tensor], Moments]
    per_sample: Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
    params: tuple[str, ...] = ("weight", "bias")
    supports: Callable[[nn.Module], bool] | None = None
    segments: Callable[[nn.Module, Tensor, Tensor, int], Moments | None] | None = None
    #: optional — ``finite(module, a, δ)``: a 0-dim bool tensor that is True only if every mean the
    #: rule forms from these inputs is finite and at most a quarter of its dtype's largest value in
    #: magnitude (the optimizer's check then need not read the means, nor a fused pass's difference
    #: of two of them, which stays finite)
    finite: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None


_REGISTRY: dict[type, Rule] = {}
_BY_NAME: dict[str, Rule] = {}  # "module.QualName" of classes from packages not imported here


def _moments_from(per_sample: Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]):
    def moments(m: nn.Module, a: Tensor, d: Tensor) -> Moments:
        out = {}
        for k, g in per_sample(m, a, d).items():
            if isinstance(g, SparseRows):
                g = g.dense(a.shape[0], getattr(m, k).shape)
            out[k] = (g.sum(0), sum_sq(g))
        return out
    return moments


def _per_sample_from(moments: Callable[[nn.Module, Tensor, Tensor], Moments]):
    def per_sample(m: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
        rows = [moments(m, a[k : k + 1], d[k : k + 1]) for k in range(a.shape[0])]
        return {name: torch.stack([r[name][0] for r in rows]) for name in rows[0]}
    return per_sample


def register_rule(
    module_type: type[nn.Module] | str,
    moments: Callable[[nn.Module, Tensor, Tensor], Moments] | None = None,
    *,
    per_sample: Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]] | None = None,
    params: Iterable[str] = ("weight", "bias"),
    supports: Callable[[nn.Module], bool] | None = None,
) -> Rule:
    """Register (or replace) the statistics rule of ``module_type`` — a class, or its
    ``"module.QualName"`` when its package should not be imported — and return it.

    ``moments(module, a, δ)`` returns ``{name: (Σ_k g_k, Σ_k g_k²)}`` and ``per_sample(module, a, δ)``
    returns ``{name: g}`` with ``g`` of shape ``[n, *param.shape]`` (or :class:`SparseRows`); ``a`` is the layer's first input
    (positional or keyword) and ``δ`` the gradient of its output, both with the samples on dim 0, in
    float32 at least. Give either; the other is derived (one sample at a time, or from the stacked
    gradients). Every statistic the hook engine uses is checked against autograd when a model is
    first seen, so a wrong rule is reported, never silently used.
    """
    if moments is None and per_sample is None:
        raise ValueError("register_rule needs moments=, per_sample= or both")
    rule = Rule(
        moments if moments is not None else _moments_from(per_sample),  # type: ignore[arg-type]
        per_sample if per_sample is not None else _per_sample_from(moments),  # type: ignore[arg-type]
        tuple(params),
        supports,
    )
    if isinstance(module_type, str):
        _BY_NAME[module_type] = rule
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        _REGISTRY[module_type] = rule
    else:
        raise TypeError(f"module_type must be an nn.Module subclass or a 'module.QualName' string, got {module_type!r}")
    return rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering this module's own parameters, or ``None`` (exact type; every own parameter
    name known to the rule; the rule's ``supports`` check passed)."""
    cls = type(module)
    rule = _REGISTRY.get(cls)
    if rule is None:
        rule = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is None:
            return None
    if any(name not in rule.params for name, _ in module.named_parameters(recurse=False)):
        return None  # e.g. torch.nn.utils.prune's weight_orig: not the function the rule knows
    if rule.supports is not None and not rule.supports(module):
        return None
    return rule


def supports(module: nn.Module) -> bool:
    """Whether a registered rule computes this module's own parameters' statistics."""
    return rule_for(module) is not None


def _conv_ok(m: nn.Module) -> bool:
    return m.padding == "valid" or (m.padding_mode == "zeros" and not isinstance(m.padding, str))


register_rule(nn.Linear, _linear, per_sample=_linear_per_sample)
_REGISTRY[nn.Linear] = dataclasses.replace(_REGISTRY[nn.Linear], segments=_linear_segments,
                                           finite=_linear_finite)
register_rule(nn.Conv1d, _conv, per_sample=_conv_per_sample, supports=_conv_ok)
register_rule(nn.Conv2d, _conv, per_sample=_conv_per_sample, supports=_conv_ok)
register_rule(nn.Embedding, _embedding, per_sample=_embedding_per_sample, params=("weight",),
              supports=lambda m: m.max_norm is None and not m.scale_grad_by_freq)
register_rule(nn.LayerNorm, _layer_norm, per_sample=_layer_norm_per_sample)
register_rule(nn.GroupNorm, _group_norm, per_sample=_group_norm_per_sample)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, _batch_norm, per_sample=_batch_norm_per_sample,
                  supports=lambda m: m.track_running_stats and m.running_mean is not None)
register_rule("transformers.pytorch_utils.Conv1D", _hf_conv1d, per_sample=_hf_conv1d_per_sample)
