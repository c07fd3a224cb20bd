"""Buffers one optimizer step lends out and the next step reuses (on CPU).

A masked step makes a few parameter-sized temporaries: each layer's statistics (a mean and a
``Σg²`` per side) and, behind the retain guard, the deferred moves. On CPU a freshly allocated large
tensor is not free: glibc serves blocks above its mmap threshold (at most 32 MiB) with new pages, and
the first write to each page faults, and glibc trims freed heap memory back to the system, so
smaller ones fault again too (benchmarks/bench_workspace.py: a default step of a 16.8 M-parameter
MLP took 98 k minor faults and twice the time without the workspace, ResNet-18's 32 k). CUDA's
caching allocator already reuses blocks, so there the step allocates as usual.

:class:`Workspace` lends buffers for the length of a step (``with lending(ws): ...``): inside, the
built-in layer rules and the fused step take their large outputs from :func:`empty`; when the block
ends every lent buffer returns to the workspace, and buffers the step did not ask for are dropped,
so between steps the workspace holds exactly what the last step used (:attr:`Workspace.nbytes`).
Outside a ``lending`` block (the statistics functions called directly, custom engines, another
thread) :func:`empty` is ``torch.empty``: nothing handed to a caller is ever reused behind its back.

The contract that makes this safe: a tensor from :func:`empty` lives only until the end of the step
that made it. The optimizers keep nothing from the statistics past ``step()``: the statistics
direction, which SGD's first step would adopt as its momentum buffer, is copied instead when it is
lent (:func:`is_lent`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "Workspace", "empty", "empty_like", "give_back", "is_lent", "lend", "lending"]

#: buffers smaller than this are allocated as usual: glibc's heap serves them without faults
MIN_BYTES = 1 << 20

_Key = tuple[tuple[int, ...], torch.dtype, torch.device]


class Workspace:
    """A pool of buffers lent for one step at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._free: dict[_Key, list[Tensor]] = {}  # ready to lend
        self._round: dict[int, tuple[_Key, Tensor]] = {}  # every buffer lent in this round, by id
        self._out: dict[int, Tensor] = {}  # lent and not given back yet

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised buffer of ``shape``, not lent to anyone else until :meth:`release`."""
        key = (tuple(int(s) for s in shape), dtype, torch.device(device))
        free = self._free.get(key)
        buf = free.pop() if free else torch.empty(key[0], dtype=dtype, device=device)
        self._round[id(buf)] = (key, buf)
        self._out[id(buf)] = buf
        return buf

    def lent(self, t: Tensor) -> bool:
        """Whether ``t`` is (a view of) a buffer lent and not given back."""
        ptr = t.untyped_storage().data_ptr()
        return any(buf.untyped_storage().data_ptr() == ptr for buf in self._out.values())

    def give_back(self, t: Tensor) -> None:
        """Take ``t`` (a buffer lent in this round) back before the round ends, for the round's later
        requests: a temporary that dies inside the step does not hold its memory to the end."""
        if self._out.pop(id(t), None) is not None:
            self._free.setdefault(self._round[id(t)][0], []).append(t)

    def release(self) -> None:
        """Take every lent buffer back; drop the buffers this round did not use."""
        free: dict[_Key, list[Tensor]] = {}
        for key, buf in self._round.values():
            free.setdefault(key, []).append(buf)
        self._free, self._round, self._out = free, {}, {}

    def clear(self) -> None:
        """Drop every buffer (the memory goes back to the allocator)."""
        self._free, self._round, self._out = {}, {}, {}

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffers ready to lend and those lent."""
        held = {id(b): b for bufs in self._free.values() for b in bufs} | dict(self._out)
        return sum(b.numel() * b.element_size() for b in held.values())


_ACTIVE: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("masked_optim_workspace",
                                                                           default=None)


@contextlib.contextmanager
def lending(workspace: Workspace | None) -> Iterator[Workspace | None]:
    """Within the block, :func:`empty` lends from ``workspace`` (``None``: allocates as usual); at
    its end the lent buffers return to it."""
    token = _ACTIVE.set(workspace)
    try:
        yield workspace
    finally:
        _ACTIVE.reset(token)
        if workspace is not None:
            workspace.release()


def lend(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The active workspace's buffer for a temporary of at least :data:`MIN_BYTES` on CPU, else
    ``None`` (for ``out=``: the operation then allocates its result as usual)."""
    if math.prod(shape) * dtype.itemsize < MIN_BYTES:  # the common case on small layers: decided first
        return None
    ws = _ACTIVE.get()
    if ws is None or torch.device(device).type != "cpu":
        return None
    return ws.empty(shape, dtype, device)


def give_back(t: Tensor | None) -> None:
    """Return a temporary from :func:`lend` to the active workspace before the step ends (``None``,
    or a tensor not lent: nothing happens)."""
    ws = _ACTIVE.get()
    if ws is not None and t is not None:
        ws.give_back(t)


def is_lent(t: Tensor) -> bool:
    """Whether ``t`` lives in a buffer the active workspace has lent: such a tensor must not be kept
    past the step (as optimizer state, say)."""
    ws = _ACTIVE.get()
    return ws is not None and ws.lent(t)


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer for a step's temporary: :func:`lend`'s, else ``torch.empty``."""
    buf = lend(shape, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device) if buf is None else buf


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`empty` of ``t``'s shape (contiguous), dtype (or ``dtype``) and device."""
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
