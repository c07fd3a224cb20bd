"""Lightning: masked unlearning steps from a ``LightningModule``'s training loop.

Automatic optimisation: add :class:`MaskedStepCallback` to the ``Trainer``; it stages each training
batch's forget and retain parts on the module's probably-aligned optimizer, whose ``step`` Lightning
then calls with the closure of ``training_step`` (the method's loss, e.g. NegGrad+).

Manual optimisation needs no callback: ``opt = self.optimizers(); opt.stage(forget=..., retain=...)``
then ``self.manual_backward(loss); opt.step()`` (``stage`` reaches the optimizer that
``LightningOptimizer`` wraps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "masked_optim.integrations.lightning needs lightning: pip install 'masked-optim[lightning]'"
    ) from exc

from ..optim import ProbablyAlignedOptimizer
from . import BatchSplit, unwrap_optimizer

__all__ = ["MaskedStepCallback"]

Split = Callable[[Any], tuple[Any, Any]]


class MaskedStepCallback(pl.Callback):
    """Stages ``batch[forget_key]`` and ``batch[retain_key]`` (or ``split(batch) -> (forget, retain)``)
    on every probably-aligned optimizer of the Trainer at the start of each training batch.

    A batch is a mapping such as ``CombinedLoader({"forget": ..., "retain": ...})`` yields; each part
    is an ``(inputs, targets)`` pair or a mapping of the model's keyword arguments with ``labels``.
    With ``accumulate_grad_batches=k`` each micro-batch replaces the staged batches, so the step
    (after the k-th) takes its statistics from the last micro-batch of the window, while ``p.grad``
    sums all k.
    """

    def __init__(self, forget_key: str = "forget", retain_key: str = "retain", split: Split | None = None) -> None:
        self._split = BatchSplit(forget_key, retain_key, split, owner="MaskedStepCallback")
        self.forget_key, self.retain_key, self.split = forget_key, retain_key, split

    def batches(self, batch: Any) -> tuple[Any, Any]:
        """The ``(forget, retain)`` batches of one training batch."""
        return self._split(batch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        forget, retain = self.batches(batch)
        for opt in _masked_optimizers(trainer):
            opt.stage(forget=forget, retain=retain)


def _masked_optimizers(trainer: pl.Trainer) -> list[ProbablyAlignedOptimizer]:
    found = []
    for opt in trainer.optimizers:
        try:
            found.append(unwrap_optimizer(opt))
        except TypeError:
            continue  # another optimizer of a manual-optimisation module (a GAN's, say)
    if not found:
        unwrap_optimizer(trainer.optimizers[0] if trainer.optimizers else None)  # raises, naming what is there
    return found
