"""Batches as the ecosystem passes them (docs/design.md §4).

Two layouts are accepted wherever a batch is (``forget=``, ``retain=``, ``stage()``, the
certificate's check batches, the engines):

* ``(inputs, targets)``: ``inputs`` a tensor or a tuple of tensors, called as ``model(*inputs)``;
* a mapping of the model's keyword arguments that includes ``"labels"`` (HuggingFace style, e.g.
  ``{"input_ids", "attention_mask", "labels"}``), called as ``model(**batch)`` without ``labels``:
  the per-sample loss is computed here, so the model's own (batch-mean) loss is never formed.

A tensor whose leading size is the batch size is split per sample; any other value (a tensor
that broadcasts over the batch, a flag such as ``use_cache=False``) is passed to every call as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = ["Batch", "ParsedBatch", "parse_batch"]

Batch = Union[tuple[Union[Tensor, Sequence[Tensor]], Tensor], Mapping[str, Any]]
"""``(inputs, targets)`` or a mapping of keyword arguments with ``"labels"``."""

LABELS = "labels"


@dataclasses.dataclass(frozen=True)
class ParsedBatch:
    """A checked batch: positional and keyword inputs, targets and the number of samples ``n``.

    ``mapping``: it came as a keyword mapping (HuggingFace style), which selects the default loss."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Tensor
    n: int
    mapping: bool = False

    def call(self, model: nn.Module) -> Any:
        """The model's outputs on this batch, called as the user would."""
        return model(*self.args, **self.kwargs)

    def _split(self, v: Any) -> bool:
        return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == self.n

    def in_dims(self) -> tuple[tuple[int | None, ...], dict[str, int | None]]:
        """``vmap`` dims of the inputs: 0 for per-sample tensors, ``None`` for what broadcasts."""
        return (tuple(0 if self._split(a) else None for a in self.args),
                {k: 0 if self._split(v) else None for k, v in self.kwargs.items()})

    def map(self, fn: Any) -> ParsedBatch:
        """The batch with ``fn`` applied to every per-sample tensor, targets included (``n`` is
        re-read from the targets)."""
        args = tuple(fn(a) if self._split(a) else a for a in self.args)
        kwargs = {k: fn(v) if self._split(v) else v for k, v in self.kwargs.items()}
        y = fn(self.targets)
        return ParsedBatch(args, kwargs, y, y.shape[0], self.mapping)

    def slice(self, start: int, stop: int) -> ParsedBatch:
        return self.map(lambda t: t[start:stop])

    def to(self, device: torch.device) -> ParsedBatch:
        """Every tensor on ``device`` (per-sample or not); the batch itself when they all are."""
        if all(not isinstance(v, Tensor) or v.device == device
               for v in (self.targets, *self.args, *self.kwargs.values())):
            return self  # frozen: nothing to copy (a new batch costs more than the check on small steps)

        def move(v: Any) -> Any:
            return v.to(device, non_blocking=True) if isinstance(v, Tensor) and v.device != device else v

        return ParsedBatch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                           move(self.targets), self.n, self.mapping)

    def tensors(self) -> list[Tensor]:
        """The per-sample input tensors (positional, then keyword)."""
        return [a for a in self.args if self._split(a)] + [v for v in self.kwargs.values() if self._split(v)]

    def signature(self) -> tuple:
        """What must agree for two batches to be concatenated into one forward."""
        def sig(v: Any) -> Any:
            if self._split(v):
                return ("split", v.dtype, tuple(v.shape[1:]), v.device)
            if isinstance(v, Tensor):
                return ("shared", id(v))
            return ("value", repr(v))

        return (self.mapping, tuple(sig(a) for a in self.args),
                tuple((k, sig(v)) for k, v in self.kwargs.items()),
                (self.targets.dtype, tuple(self.targets.shape[1:])))


def concat(batches: Sequence[ParsedBatch]) -> ParsedBatch:
    """One batch of the samples of ``batches`` in order (their :meth:`~ParsedBatch.signature` agree)."""
    first = batches[0]
    args = tuple(torch.cat([b.args[i] for b in batches]) if first._split(a) else a for i, a in enumerate(first.args))
    kwargs = {k: torch.cat([b.kwargs[k] for b in batches]) if first._split(v) else v for k, v in first.kwargs.items()}
    y = torch.cat([b.targets for b in batches])
    return ParsedBatch(args, kwargs, y, y.shape[0], first.mapping)


def parse_batch(batch: Batch | ParsedBatch, name: str = "batch") -> ParsedBatch:
    """Check a batch and return it parsed.

    Raises ``TypeError`` for a wrong structure and ``ValueError`` for empty batches or per-sample
    inputs and targets whose leading sizes differ, naming ``name``.
    """
    if isinstance(batch, ParsedBatch):
        return batch
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise TypeError(
                f"{name}: a mapping batch needs a {LABELS!r} entry (the targets of the per-sample loss); "
                f"got keys {sorted(map(str, batch))}"
            )
        y = batch[LABELS]
        if not isinstance(y, Tensor):
            raise TypeError(f"{name}[{LABELS!r}] must be a tensor, got {type(y).__name__}")
        if y.dim() == 0:
            raise ValueError(f"{name}[{LABELS!r}] needs a leading batch dimension")
        kwargs = {k: v for k, v in batch.items() if k != LABELS}
        parsed = ParsedBatch((), kwargs, y, y.shape[0], mapping=True)
        if not parsed.tensors():
            raise ValueError(
                f"{name}: no input has the labels' batch size {y.shape[0]} "
                f"(inputs: { {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in kwargs.items()} })"
            )
    else:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"{name} must be an (inputs, targets) pair or a mapping with {LABELS!r}, got {type(batch).__name__}"
            )
        inputs, y = batch
        xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs) if isinstance(inputs, (tuple, list)) else None
        if not xs or not all(isinstance(x, Tensor) for x in xs):
            raise TypeError(f"{name} inputs must be a tensor or a non-empty tuple of tensors")
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} targets must be a tensor, got {type(y).__name__}")
        if y.dim() == 0 or any(x.dim() == 0 for x in xs):
            raise ValueError(f"{name}: inputs and targets need a leading batch dimension")
        sizes = [x.shape[0] for x in xs]
        if any(s != y.shape[0] for s in sizes):
            raise ValueError(f"{name}: inputs have batch size {sizes} but targets have {y.shape[0]}")
        parsed = ParsedBatch(xs, {}, y, y.shape[0])
    if parsed.n == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    return parsed
