"""Per-sample gradient statistics (docs/design.md §4).

The engine returns, for every parameter, the count ``n``, the mean ``μ`` and the sum of squared
deviations ``M2`` of the per-sample gradients ``g_k = ∇θ ℓ(f_θ(x_k), y_k)`` of a batch.  The reference
engine is ``torch.func``: ``vmap(grad(per-sample loss))`` over chunks of the batch, with chunk
results merged by Chan's parallel formula, so peak memory is ``chunk_size × P`` and not ``n × P``.

Statistics are always computed with the model in *evaluation behaviour* (BatchNorm uses its running
statistics, dropout is off): BatchNorm in training mode has no per-sample gradients at all, since each
sample's output depends on the whole batch.  The caller's module modes and running statistics are
restored/untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .batches import Batch, parse_batch
from .losses import PerSampleLoss

__all__ = [
    "Batch",
    "GatheringEngine",
    "GradStats",
    "PairEngine",
    "acc_dtype",
    "StatsEngine",
    "VmapEngine",
    "chan_merge",
    "chunk_moments",
    "eval_behaviour",
    "m2_to_sumsq",
    "merge_into",
    "param_names",
    "sumsq_to_m2_",
    "per_sample_grad_stats",
    "unwrap_model",
    "validate_batch",
]

LossFn = Callable[[Any, Tensor], Tensor]

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of per-sample gradients held at once


@dataclasses.dataclass
class GradStats:
    """Moments of per-sample gradients, one entry per parameter (in the order they were requested).

    ``mean[i]`` and ``m2[i]`` have the shape of parameter ``i`` and dtype at least float32;
    ``loss`` is the mean per-sample loss of the batch (0-dim tensor).
    """

    n: int
    mean: list[Tensor]
    m2: list[Tensor]
    loss: Tensor
    #: what ``m2`` holds: M2 = Σ_k (g_k − μ)² (``False``, every engine's default), or Σ_k g_k²
    #: (``True``: an engine's ``pair(..., sq=True)``, which the optimizers' hard tests read with an
    #: adjusted threshold, saving two passes over the statistics)
    sumsq: bool = False
    #: per parameter, ``None`` or a 0-dim bool tensor that is True only if ``mean[i]`` is certainly
    #: finite and at most a quarter of its dtype's range in magnitude (a layer rule's bound from its
    #: inputs, :attr:`masked_optim.rules.Rule.finite`): the optimizers' finite check reads it instead
    #: of the mean. ``None`` for the whole list: no certificates (every engine's default; merged or
    #: gathered statistics never carry them)
    finite: list[Tensor | None] | None = None

    def variance(self) -> list[Tensor]:
        """Unbiased per-coordinate variance ``M2 / (n - 1)``."""
        if self.n < 2:
            raise ValueError(f"variance needs at least 2 samples, got n={self.n}")
        return [m / (self.n - 1) for m in self.as_m2().m2]

    def merge(self, other: GradStats) -> GradStats:
        """Statistics of the union of the two batches (Chan's formula)."""
        return chan_merge(self.as_m2(), other.as_m2())

    def as_sumsq(self) -> GradStats:
        """The same statistics with ``Σ_k g_k²`` in ``m2``."""
        if self.sumsq:
            return self
        return GradStats(self.n, self.mean, [m2_to_sumsq(m, q, self.n) for m, q in zip(self.mean, self.m2)],
                         self.loss, sumsq=True)

    def as_m2(self) -> GradStats:
        """The same statistics with M2 in ``m2``."""
        if not self.sumsq:
            return self
        return GradStats(self.n, self.mean, [sumsq_to_m2_(m, q.clone(), self.n) for m, q in zip(self.mean, self.m2)],
                         self.loss)


def m2_to_sumsq(mean: Tensor, m2: Tensor, n: int) -> Tensor:
    """``Σ_k g_k² = M2 + n·μ²`` (a new tensor)."""
    return torch.addcmul(m2, mean, mean, value=n)


def sumsq_to_m2_(mean: Tensor, sq: Tensor, n: int) -> Tensor:
    """``M2 = Σ_k g_k² − n·μ²`` in place of ``sq`` (the clamp absorbs the rounding of a near-constant
    coordinate)."""
    return sq.addcmul_(mean, mean, value=-n).clamp_min_(0)


def chunk_moments(g: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and M2 over dim 0 of stacked per-sample values ``g`` (two-pass; far faster than
    ``torch.var_mean`` on CPU and as accurate)."""
    mean = g.sum(0).div_(g.shape[0])
    dev = g - mean
    return mean, dev.mul_(dev).sum(0)


def chan_merge(a: GradStats, b: GradStats) -> GradStats:
    """Merge statistics of two disjoint batches (Chan, Golub & LeVeque's parallel update)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    mean, m2 = [], []
    for ma, mb, qa, qb in zip(a.mean, b.mean, a.m2, b.m2):
        delta = mb - ma
        mean.append(ma + delta * (b.n / n))
        m2.append(qa + qb + delta.square() * (a.n * b.n / n))
    loss = a.loss + (b.loss - a.loss) * (b.n / n)
    return GradStats(n, mean, m2, loss)


def merge_into(acc: GradStats, n_c: int, means: list[Tensor], m2s: list[Tensor], loss: Tensor) -> None:
    """In-place Chan merge of one chunk into a running accumulator (avoids reallocations)."""
    if acc.n == 0:
        acc.n, acc.mean, acc.m2, acc.loss = n_c, means, m2s, loss
        return
    n = acc.n + n_c
    w_new, w_cross = n_c / n, acc.n * n_c / n
    deltas = torch._foreach_sub(means, acc.mean)
    torch._foreach_add_(acc.m2, m2s)
    sq = torch._foreach_mul(deltas, deltas)
    torch._foreach_add_(acc.m2, sq, alpha=w_cross)
    torch._foreach_add_(acc.mean, deltas, alpha=w_new)
    acc.loss = acc.loss + (loss - acc.loss) * w_new
    acc.n = n


def validate_batch(batch: Batch, name: str = "batch") -> tuple[tuple[Tensor, ...], Tensor, int]:
    """Check an ``(inputs, targets)`` batch and return ``(inputs_tuple, targets, n)`` (kept for
    callers of the tuple layout; :func:`~masked_optim.batches.parse_batch` takes mappings too)."""
    parsed = parse_batch(batch, name)
    if parsed.mapping:
        raise TypeError(f"{name}: validate_batch takes (inputs, targets) pairs; use parse_batch for mappings")
    return parsed.args, parsed.targets, parsed.n


# torch.nn modules whose forward never reads ``training`` (exact types: a subclass may)
_MODE_FREE: frozenset[type] = frozenset({
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
})


@contextlib.contextmanager
def eval_behaviour(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Run ``model`` in eval mode inside the block and restore every submodule's own mode after
    (``modules``: ``list(model.modules())`` when the caller has it already, in that order).

    When some module overrides ``train()``, the switch goes through ``model.eval()`` so that it sees
    it, and the way back through ``train(mode)`` calls, top-down, that end in every module's own
    mode: an overridden ``train(True)`` undoes what its ``train(False)`` did (a hyperparameter it
    changed, a cache only valid in eval mode) as it would after the caller's own ``model.eval()``."""
    modules = list(model.modules()) if modules is None else modules
    if all(type(m) in _MODE_FREE for m in modules):  # nothing would behave differently
        yield
        return
    modes = [m.training for m in modules]
    replay = any(type(m).train is not nn.Module.train for m in modules)
    root_mode = model.training
    if replay:
        model.eval()  # a module with its own train(): let it see the switch
    else:
        for m in modules:  # the same as model.eval(), without its per-module overhead
            m.__dict__["training"] = False
    try:
        yield
    finally:
        if replay:
            model.train(root_mode)
            for m, training in zip(modules, modes):  # pre-order: every parent is right before its children
                if m.training != training:
                    m.train(training)
        for m, training in zip(modules, modes):  # exact flags, whatever an override set
            m.__dict__["training"] = training


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel``/``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, in any nesting.

    The wrappers share their parameters with the inner module, so statistics computed on the inner
    module are those of the wrapped one.  Running ``torch.func`` through the wrappers is wrong or
    harmful: DDP's forward issues collectives, and a compiled module called under ``vmap(grad)``
    makes dynamo mark its frame as skipped (``Unsupported functorch tracing attempt``), which
    silently turns *every* compiled module in the process back to eager.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif _has_orig_mod(model) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch._dynamo.eval_frame.OptimizedModule
        else:
            return model


def _has_orig_mod(model: nn.Module) -> bool:
    # where getattr could find it; a failed getattr on a module builds an AttributeError message
    # (~10 µs, twice a step)
    return "_orig_mod" in model._modules or "_orig_mod" in model.__dict__ or hasattr(type(model), "_orig_mod")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of statistics of a ``dtype`` parameter."""
    # float32 at least; float64 parameters keep float64 (cached: promote_types is an operator call)
    acc = _ACC_DTYPES.get(dtype)
    if acc is None:
        acc = _ACC_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return acc


_ACC_DTYPES: dict[torch.dtype, torch.dtype] = {}


class StatsEngine(Protocol):
    """Computes per-sample gradient statistics of ``params`` (parameters of ``model``) on a batch.

    The optimizers use two optional capabilities when an engine has them: :class:`PairEngine`
    (both batches at once) and :class:`GatheringEngine` (a distributed engine)."""

    def __call__(
        self, model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn | None = None
    ) -> GradStats: ...


@runtime_checkable
class PairEngine(Protocol):
    """An engine that computes the forget and the retain batch's statistics together (one forward and
    backward over their concatenation). With a class attribute ``pair_sq = True`` its ``pair`` also
    takes ``sq=True`` and may return ``Σ_k g_k²`` in ``m2`` (:attr:`GradStats.sumsq`)."""

    def pair(self, model: nn.Module, params: Sequence[Tensor], first: Batch, second: Batch,
             loss_fn: LossFn | None = None) -> tuple[GradStats, GradStats]: ...


@runtime_checkable
class GatheringEngine(Protocol):
    """A distributed engine: every rank's per-sample values (for the whole-update test) and the
    step's input checks decided on every rank at once."""

    def gather_samples(self, values: Tensor) -> Tensor: ...

    def agree_on_checks(self, error: BaseException | None, counts: list[int], device: Any) -> list[int]: ...


class VmapEngine:
    """Reference engine: ``torch.func.vmap(grad(...))`` over manual chunks, Chan-merged.

    Args:
        chunk_size: samples per vmap call. ``None`` picks the largest chunk whose per-sample gradients
            fit in ``memory_budget`` bytes.
        memory_budget: bytes of per-sample gradients allowed at once when ``chunk_size`` is ``None``.
    """

    def __init__(self, chunk_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget}")
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget

    def _chunk(self, params: Sequence[Tensor], n: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, n)
        per_sample = sum(p.numel() * acc_dtype(p.dtype).itemsize for p in params)
        if per_sample > self.memory_budget:
            raise MemoryError(
                f"one sample's gradients need {per_sample / 2**20:.1f} MiB but memory_budget is "
                f"{self.memory_budget / 2**20:.1f} MiB; raise memory_budget or use an engine that does "
                "not materialise per-sample gradients"
            )
        return max(1, min(n, self.memory_budget // max(per_sample, 1)))

    def __call__(
        self, model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn | None = None
    ) -> GradStats:
        loss = loss_fn if isinstance(loss_fn, PerSampleLoss) else PerSampleLoss(loss_fn)
        names = param_names(model, params)
        device = params[0].device if params else None
        parsed = parse_batch(batch)
        if device is not None:
            parsed = parsed.to(device)
        n = parsed.n
        one_loss = loss.for_one(model, parsed)
        a_dims, kw_dims = parsed.in_dims()

        wanted = {id(p) for p in params}
        consts = {k: v.detach() for k, v in model.named_parameters() if id(v) not in wanted}
        consts.update({k: v for k, v in model.named_buffers()})
        theta = {name: p.detach() for name, p in zip(names, params)}

        def sample_loss(th: dict[str, Tensor], args: tuple, kwargs: dict, target: Tensor) -> tuple[Tensor, Tensor]:
            a1 = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args, a_dims))
            kw1 = {k: v.unsqueeze(0) if kw_dims[k] == 0 else v for k, v in kwargs.items()}
            out = functional_call(model, (th, consts), a1, kw1)
            value = one_loss(out, target.unsqueeze(0))
            return value, value.detach()

        per_sample = vmap(grad(sample_loss, has_aux=True), in_dims=(None, a_dims, kw_dims, 0))
        acc = GradStats(0, [], [], torch.zeros((), device=parsed.targets.device))
        chunk = self._chunk(params, n)
        with eval_behaviour(model):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                try:
                    part = parsed.slice(start, stop)
                    grads, losses = per_sample(theta, part.args, part.kwargs, part.targets)
                except (RuntimeError, NotImplementedError) as err:
                    raise RuntimeError(
                        f"per-sample gradients could not be computed with torch.func.vmap: {err}. Check "
                        "that the batch fits the model; layers vmap cannot batch (data-dependent control "
                        "flow, .item(), in-place updates of inputs or buffers) are not supported"
                    ) from err
                means, m2s = [], []
                for name, p in zip(names, params):
                    g = grads[name]
                    if g.dtype != acc_dtype(p.dtype):
                        g = g.to(acc_dtype(p.dtype))
                    mu, m2 = chunk_moments(g)
                    means.append(mu)
                    m2s.append(m2)
                del grads
                merge_into(acc, stop - start, means, m2s, losses.float().mean())
        return acc


def param_names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    names = []
    for i, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) is not a parameter of the given model"
            )
        names.append(by_id[id(p)])
    return names


def per_sample_grad_stats(
    model: nn.Module,
    batch: Batch,
    params: Sequence[Tensor] | None = None,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> GradStats:
    """Per-coordinate ``(n, mean, M2)`` of the per-sample gradients of ``loss_fn`` on ``batch``.

    ``params`` defaults to every parameter of ``model`` that requires grad; ``loss_fn(outputs,
    targets)`` defaults to cross-entropy and is applied to one sample at a time, so its reduction
    does not matter.  Computed in eval behaviour (see module docstring).
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return VmapEngine(chunk_size)(model, list(params), batch, loss_fn)
