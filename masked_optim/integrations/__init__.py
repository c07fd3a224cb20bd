"""Integrations with training frameworks.

``masked_optim.integrations.hf`` (HuggingFace ``Trainer``; ``pip install 'masked-optim[hf]'``) and
``masked_optim.integrations.lightning`` (Lightning; ``pip install 'masked-optim[lightning]'``) are
imported on first use: importing this package imports neither framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch.optim import Optimizer

from ..optim import ProbablyAlignedOptimizer

__all__ = ["BatchSplit", "MaskedStepCallback", "MaskedUnlearningCallback", "stage", "unwrap_optimizer"]

# the framework classes re-exported here, and the submodule that defines each
_LAZY = {"MaskedUnlearningCallback": "hf", "MaskedStepCallback": "lightning"}
# attributes through which framework wrappers hold the optimizer they wrap: Lightning's
# LightningOptimizer (``_optimizer``), accelerate's AcceleratedOptimizer and DeepSpeed's (``optimizer``)
_WRAPPED_ATTRS = ("_optimizer", "optimizer")
_MAX_DEPTH = 32


class BatchSplit:
    """``(forget, retain)`` of one training batch: ``batch[forget_key]`` and ``batch[retain_key]``,
    or ``split(batch)``; ``hint``: what the error for a batch without those keys suggests."""

    def __init__(self, forget_key: str = "forget", retain_key: str = "retain",
                 split: Callable[[Any], tuple[Any, Any]] | None = None, *, owner: str = "", hint: str = "") -> None:
        if split is not None and not callable(split):
            raise TypeError("split must be callable(batch) -> (forget, retain)")
        self.forget_key, self.retain_key, self.split = forget_key, retain_key, split
        self.owner, self.hint = owner, hint

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        if self.split is not None:
            return self.split(batch)
        if not isinstance(batch, Mapping) or self.forget_key not in batch or self.retain_key not in batch:
            found = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"{self.owner} expects training batches with keys {self.forget_key!r} and "
                           f"{self.retain_key!r}, got {found}; {self.hint}pass forget_key/retain_key or split=")
        return batch[self.forget_key], batch[self.retain_key]


def stage(optimizer: Any, forget: Any = None, retain: Any = None) -> None:
    """:meth:`~masked_optim.ProbablyAlignedOptimizer.stage` through any framework wrapper (accelerate's
    ``AcceleratedOptimizer`` forwards no attribute, so ``trainer.optimizer.stage`` does not exist)."""
    unwrap_optimizer(optimizer).stage(forget, retain)


def unwrap_optimizer(optimizer: Any) -> ProbablyAlignedOptimizer:
    """The probably-aligned optimizer inside ``optimizer``, through any nesting of framework wrappers
    (accelerate's ``AcceleratedOptimizer``, as HF ``Trainer.optimizer`` holds it; Lightning's
    ``LightningOptimizer``, as ``LightningModule.optimizers()`` returns it).

    Raises ``TypeError`` naming the types found when there is no probably-aligned optimizer inside.
    """
    chain = [optimizer]
    obj = optimizer
    for _ in range(_MAX_DEPTH):
        inner = _wrapped(obj)
        if inner is None:
            break
        obj = inner
        chain.append(obj)
    # a LightningOptimizer is an instance of the class it wraps: only the innermost object is the optimizer
    if isinstance(obj, ProbablyAlignedOptimizer) and _wrapped(obj) is None:
        return obj
    names = " -> ".join(type(o).__name__ for o in chain)
    raise TypeError(
        f"expected a ProbablyAlignedSGD/Adam/AdamW optimizer (possibly wrapped by accelerate or Lightning), "
        f"got {names}"
    )


def _wrapped(obj: Any) -> Any:
    for attr in _WRAPPED_ATTRS:
        try:
            inner = getattr(obj, attr, None)
        except Exception:  # a wrapper's property may fail on a half-built object: not a wrapper then
            inner = None
        if inner is not None and inner is not obj and (isinstance(inner, Optimizer) or hasattr(inner, "param_groups")):
            return inner
    return None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
