"""Data-parallel statistics under ``torch.distributed`` (docs/design.md §4: "the same merge combines results
across processes").

Each rank computes ``(n, mean, M2)`` of the per-sample gradients on *its shard* of a forget or retain
batch; :class:`DistributedEngine` merges them across the process group so that every rank holds the
statistics of the *global* batch, builds the same mask and keeps identical parameters.  Pass it to
any optimizer as ``engine=``; no other change is needed::

    model = DDP(net)                                  # or the bare module
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.01, momentum=0.9, model=model,
                             engine=DistributedEngine())
    opt.step(forget=shard_batch(forget), retain=shard_batch(retain))

The merge is Chan's, written as two all-reduces: ``Σ nᵢ·μᵢ`` gives the global mean ``μ``, then
``Σ (M2ᵢ + nᵢ·(μᵢ − μ)²)`` gives ``M2`` (deviations from the global mean, so no cancellation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .hooks import HookEngine
from .batches import Batch, parse_batch
from .stats import GradStats, LossFn, StatsEngine, VmapEngine, acc_dtype, unwrap_model

__all__ = [
    "DistributedEngine",
    "all_reduce_grad_stats",
    "parameters_in_sync",
    "shard_batch",
    "unwrap_model",
]


def _make_inner(inner: StatsEngine | str | None) -> StatsEngine:
    # the same names as the optimizers' engine= argument
    if inner is None or inner == "auto":
        return HookEngine(fallback=VmapEngine())
    if inner == "hooks":
        return HookEngine(fallback=None)
    if inner == "vmap":
        return VmapEngine()
    if isinstance(inner, str) or not callable(inner):
        raise TypeError(
            "inner must be 'auto', 'hooks', 'vmap' or a StatsEngine callable as "
            f"inner(model, params, batch, loss_fn), got {inner!r}"
        )
    return inner


def _require_group(group: Any) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every "
            "rank first (a single process can use the inner engine, e.g. VmapEngine, directly)"
        )


def shard_batch(
    batch: Batch, rank: int | None = None, world_size: int | None = None, group: Any = None
) -> Batch:
    """This rank's contiguous shard of a global ``(inputs, targets)`` batch.

    Shards are ``torch.tensor_split`` pieces: sizes differ by at most one and, concatenated in rank
    order, give back the batch.  ``rank``/``world_size`` default to the process group's.  Raises
    ``ValueError`` when the batch has fewer samples than ranks (an optimizer rejects empty batches).
    """
    parsed = parse_batch(batch)
    n = parsed.n
    if rank is None or world_size is None:
        _require_group(group)
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if n < world_size:
        raise ValueError(
            f"a batch of {n} samples cannot give each of {world_size} ranks at least one sample"
        )
    shard = parsed.map(lambda t: torch.tensor_split(t, world_size)[rank])
    if parsed.mapping:
        return {**shard.kwargs, "labels": shard.targets}
    inputs = shard.args[0] if isinstance(batch[0], Tensor) else shard.args  # type: ignore[index]
    return inputs, shard.targets


def _local_size(batch: Batch) -> int:
    """Number of samples of a batch that may legitimately be empty on this rank."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, Tensor):
            xs: tuple = (inputs,)
        else:
            xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
        if (
            isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] == 0
            and xs and all(isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 0 for x in xs)
        ):
            return 0
    return parse_batch(batch).n


def _by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _all_reduce_sum_(tensors: list[Tensor], group: Any) -> None:
    """In-place sum over ranks, one collective per (device, dtype) bucket."""
    for idx in _by_device_dtype(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, piece in zip(idx, torch.split(flat, [tensors[i].numel() for i in idx])):
            tensors[i].copy_(piece.view_as(tensors[i]))


def all_reduce_grad_stats(stats: GradStats, group: Any = None, *, loss_sum: float | None = None,
                          n_total: int | None = None) -> GradStats:
    """Merge every rank's :class:`GradStats` into the statistics of the union of their batches.

    Collective: every rank of ``group`` must call it with statistics of the same parameters (same
    shapes, same order).  A rank with no samples passes ``n=0`` with zero tensors of the right
    shapes.  ``n_total`` and ``loss_sum`` (``Σ nᵢ·lossᵢ``), when the caller has already gathered
    them, save one collective.  Returns new tensors of dtype at least float32.
    """
    _require_group(group)
    means = [m.to(acc_dtype(m.dtype)) for m in stats.mean]
    m2s = [q.to(acc_dtype(q.dtype)) for q in stats.m2]
    dev = means[0].device if means else stats.loss.device
    if n_total is None or loss_sum is None:
        head = torch.tensor([float(stats.n), float(stats.n) * float(stats.loss)],
                            dtype=torch.float64, device=dev)
        dist.all_reduce(head, group=group)
        n_total, loss_sum = int(head[0].item()), float(head[1].item())
    if n_total < 1:
        raise ValueError("the batch is empty on every rank")
    # Σ nᵢ·μᵢ / N: exact weights, no running update whose rounding depends on the rank order
    sums = [m * stats.n for m in means]
    _all_reduce_sum_(sums, group)
    mean = [s.div_(n_total) for s in sums]
    # M2 about the *global* mean: the cross term nᵢ·(μᵢ − μ)² is non-negative, nothing cancels
    parts = [q + (m - g).square_().mul_(stats.n) for q, m, g in zip(m2s, means, mean)]
    _all_reduce_sum_(parts, group)
    loss_dtype = acc_dtype(stats.loss.dtype)
    loss = torch.tensor(loss_sum / n_total, dtype=loss_dtype, device=stats.loss.device)
    return GradStats(n_total, mean, parts, loss)


class DistributedEngine:
    """A :class:`~masked_optim.stats.StatsEngine` that merges the statistics of every rank's shard.

    Args:
        inner: the engine run on the local shard: ``"auto"`` (default, as the optimizers:
            :class:`~masked_optim.HookEngine` with the vmap reference for unsupported layers),
            ``"hooks"``, ``"vmap"`` or any StatsEngine, e.g. ``VmapEngine(memory_budget=...)``.  The
            optimizer's ``chunk_size`` only configures the engine it builds itself, not this one.
        group: the process group (default: the world).

    Every rank must call the optimizer's ``step`` with the same kinds of batches (forget, retain or
    both); shard sizes may differ.  Within this engine a rank may even hold an empty shard, but the
    optimizers reject empty batches (and, for a tested constraint, batches of one sample) before the
    engine runs, so through ``step`` every rank needs at least one sample (two for a tested side).
    An error on one rank inside the engine (bad batch, vmap failure, mismatched parameters) is raised
    on *every* rank instead of leaving the others waiting in a collective, and so is one in the
    optimizer's input checks (:meth:`agree_on_checks`, one small collective at the start of every
    ``step``); the whole-update test's check batches need 2 samples over all ranks, not on each.

    Statistics are computed with autocast disabled, i.e. in the parameters' precision (float32 at
    least), whatever the caller's autocast context.  Models wrapped in DDP or ``torch.compile`` are
    unwrapped (see :func:`unwrap_model`).
    """

    def __init__(self, inner: StatsEngine | str | None = None, group: Any = None) -> None:
        if isinstance(inner, DistributedEngine):
            raise TypeError("inner is already a DistributedEngine: nesting would merge twice")
        self.inner: StatsEngine = _make_inner(inner)
        self.group = group

    def __repr__(self) -> str:
        return f"DistributedEngine(inner={self.inner!r}, group={self.group!r})"

    def __call__(
        self, model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn | None = None
    ) -> GradStats:
        _require_group(self.group)
        params = list(params)
        base = unwrap_model(model)
        local: GradStats | None = None
        error: BaseException | None = None
        try:
            n = _local_size(batch)
            if n > 0:
                local = self._local_stats(base, params, batch, loss_fn, n)
        except Exception as err:  # re-raised below, after the other ranks have been told
            error = err
        if error is None and local is None:  # empty shard: contributes nothing, but joins every collective
            dev = params[0].device if params else torch.device("cpu")
            local = GradStats(
                0,
                [torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device) for p in params],
                [torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device) for p in params],
                torch.zeros((), dtype=torch.float32, device=dev),
            )

        # one small gather: failures, counts, loss sums and a fingerprint of the parameter list
        dev = params[0].device if params else torch.device("cpu")
        numel = sum(p.numel() for p in params)
        if local is not None:
            head = [0.0, float(local.n), float(local.n) * float(local.loss), float(len(params)), float(numel)]
        else:
            head = [1.0, 0.0, 0.0, float(len(params)), float(numel)]
        table = _gather_or_raise(torch.tensor(head, dtype=torch.float64, device=dev), error, self.group,
                                 "per-sample statistics")
        if not (torch.all(table[:, 3] == table[0, 3]) and torch.all(table[:, 4] == table[0, 4])):
            raise ValueError(
                "ranks disagree on the parameters whose statistics are merged "
                f"(counts {table[:, 3].long().tolist()}, sizes {table[:, 4].long().tolist()}): "
                "every rank must optimise the same model with the same param groups"
            )
        assert local is not None
        n_total = int(table[:, 1].sum().item())
        if n_total < 1:
            raise ValueError("the batch is empty on every rank")
        return all_reduce_grad_stats(
            local, self.group, n_total=n_total, loss_sum=float(table[:, 2].sum().item())
        )

    def agree_on_checks(self, error: BaseException | None, counts: Sequence[int] = (),
                        device: torch.device | str | None = None) -> list[int]:
        """Decide the optimizer's input checks on every rank at once; returns ``counts`` summed over
        the ranks.

        Collective, called by ``step`` before anything else: each rank says whether its own checks
        failed (``error``). If any did, every rank raises — its own error where it failed, a
        ``RuntimeError`` naming the failed ranks elsewhere — instead of one rank raising while the
        others wait for it in a collective. ``device``: where the small message lives (the
        parameters' device, which NCCL needs).
        """
        _require_group(self.group)
        row = torch.tensor([0.0 if error is None else 1.0, *(float(c) for c in counts)], dtype=torch.float64,
                           device=device if device is not None else "cpu")
        table = _gather_or_raise(row, error, self.group, "the optimizer's input checks")
        return [int(v) for v in table[:, 1:].sum(dim=0).tolist()]

    def gather_samples(self, values: Tensor) -> Tensor:
        """Concatenate every rank's per-sample values (1-D, lengths may differ, even 0) in rank order.

        Collective.  For per-sample quantities other than the gradient moments, e.g. the directional
        derivatives of the whole-update test (``certify``), so that every rank tests the global batch
        and takes the same decision.
        """
        _require_group(self.group)
        if not isinstance(values, Tensor) or values.dim() != 1:
            raise ValueError("gather_samples expects a 1-D tensor of per-sample values")
        world = dist.get_world_size(self.group)
        n = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
        sizes = [torch.empty_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.group)
        counts = [int(c.item()) for c in sizes]
        padded = values.new_zeros(max(counts))
        padded[: values.numel()] = values
        rows = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(rows, padded, group=self.group)
        return torch.cat([r[:c] for r, c in zip(rows, counts)])

    def _local_stats(
        self, base: nn.Module, params: list[Tensor], batch: Batch, loss_fn: LossFn | None, n: int
    ) -> GradStats:
        dev_type = params[0].device.type if params else "cpu"
        # statistics stay in float32 even inside the caller's autocast region (docs/design.md §4)
        with torch.autocast(dev_type, enabled=False):
            stats = self.inner(base, params, batch, loss_fn)
        if not isinstance(stats, GradStats):
            raise TypeError(f"the inner engine returned {type(stats).__name__}, expected GradStats")
        if stats.n != n or len(stats.mean) != len(params) or len(stats.m2) != len(params):
            raise ValueError(
                f"the inner engine returned statistics of n={stats.n} samples for {len(stats.mean)} "
                f"parameters; expected n={n} and {len(params)} parameters"
            )
        for i, (p, m, q) in enumerate(zip(params, stats.mean, stats.m2)):
            if m.shape != p.shape or q.shape != p.shape:
                raise ValueError(f"the inner engine returned statistics of shape {tuple(m.shape)} for "
                                 f"parameter {i} of shape {tuple(p.shape)}")
        return stats


def _gather_or_raise(row: Tensor, error: BaseException | None, group: Any, what: str) -> Tensor:
    """Every rank's ``row`` (its first entry: 1 where that rank failed) as a CPU table; if any rank
    failed, every rank raises — its own error where it failed, a ``RuntimeError`` naming the failed
    ranks elsewhere — so that none waits forever in a later collective."""
    world = dist.get_world_size(group)
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu()
    failed = [r for r in range(world) if table[r, 0] != 0]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on rank(s) {failed} of the process group; see the error raised there "
                           "(every rank stops so that none waits forever in a collective)")
    return table


def parameters_in_sync(params: nn.Module | Iterable[Tensor], group: Any = None) -> bool:
    """``True`` on every rank iff all ranks hold bit-identical ``params`` (a module's parameters and
    buffers, or the given tensors).  Collective; meant for tests and debugging (it sends the whole
    model once)."""
    _require_group(group)
    if isinstance(params, nn.Module):
        tensors = [t.detach() for t in params.parameters()] + [b for b in params.buffers()]
    else:
        tensors = [t.detach() for t in params]
    same = True
    for idx in _by_device_dtype(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        ref = flat.clone()
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(ref, src=src, group=group)
        same = same and torch.equal(flat, ref)
    flag = torch.tensor([0.0 if same else 1.0], device=tensors[0].device if tensors else "cpu")
    dist.all_reduce(flag, group=group)
    return bool(flag.item() == 0)
