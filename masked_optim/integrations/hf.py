"""HuggingFace ``transformers.Trainer``: masked unlearning steps from a Trainer's own loop.

An unlearning Trainer (open-unlearning style) receives batches ``{"forget": {...}, "retain": {...}}``
whose values are the model's keyword arguments with ``labels``, and its ``compute_loss`` forms the
method's loss (e.g. GradDiff ``retain_loss − forget_loss``), whose backward sets ``p.grad``. The
Trainer then calls ``optimizer.step()`` with no arguments; :class:`MaskedUnlearningCallback` stages
the forget and retain batches on the probably-aligned optimizer before that step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "masked_optim.integrations.hf needs transformers (and accelerate): pip install 'masked-optim[hf]'"
    ) from exc

from . import BatchSplit, unwrap_optimizer

__all__ = ["MaskedUnlearningCallback"]

Split = Callable[[Any], tuple[Any, Any]]


class MaskedUnlearningCallback(TrainerCallback):
    """Stages each training batch's forget and retain parts on the Trainer's probably-aligned optimizer.

    HF callbacks never see the batch, so the callback is attached to the Trainer itself::

        trainer = MyUnlearningTrainer(model, args, train_dataset=ds, data_collator=collate,
                                      optimizers=(ProbablyAlignedAdamW(params, lr=1e-4, model=model), None))
        MaskedUnlearningCallback().attach(trainer)
        trainer.train()

    ``attach`` adds the callback to the Trainer and wraps the instance's ``training_step``: before
    a micro-batch's forward/backward it stages ``inputs[forget_key]`` and ``inputs[retain_key]``
    (or ``split(inputs) -> (forget, retain)``) on ``unwrap_optimizer(trainer.optimizer)``.

    Gradient accumulation: only the micro-batch after which the optimizer steps (the Trainer's
    ``accelerator.sync_gradients``, i.e. the last of each accumulation window) is staged, so the
    statistics come from that micro-batch while the direction ``p.grad`` sums the whole window.

    The Trainer must keep the nested inputs: pass ``TrainingArguments(remove_unused_columns=False)``
    and a data collator that batches each part (HF's default collator does not nest).
    """

    def __init__(self, forget_key: str = "forget", retain_key: str = "retain", split: Split | None = None) -> None:
        self._split = BatchSplit(forget_key, retain_key, split, owner="MaskedUnlearningCallback",
                                 hint="keep them with TrainingArguments(remove_unused_columns=False), or ")
        self.forget_key, self.retain_key, self.split = forget_key, retain_key, split
        self._trainer: Trainer | None = None
        self._own_step: Any = None  # an instance-level training_step the Trainer had before attach

    def attach(self, trainer: Trainer) -> MaskedUnlearningCallback:
        """Add this callback to ``trainer`` and stage batches from its training steps; returns ``self``."""
        if self._trainer is trainer:
            return self
        if self._trainer is not None:
            raise RuntimeError("this MaskedUnlearningCallback is attached to another Trainer: create one per Trainer")
        if getattr(trainer.training_step, "_masked_optim_callback", None) is not None:
            raise RuntimeError("the Trainer already has a MaskedUnlearningCallback attached")
        original = trainer.training_step  # bound: a Trainer subclass's own training_step is kept
        own = trainer.__dict__.get("training_step")

        @functools.wraps(original)
        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            self._stage(trainer, inputs)
            return original(model, inputs, *args, **kwargs)

        training_step._masked_optim_callback = self  # type: ignore[attr-defined]
        trainer.training_step = training_step  # type: ignore[method-assign]
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._trainer, self._own_step = trainer, own
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`: the Trainer's steps are plain again."""
        trainer = self._trainer
        if trainer is None:
            return
        if self._own_step is not None:
            trainer.training_step = self._own_step  # type: ignore[method-assign]
        else:
            trainer.__dict__.pop("training_step", None)  # back to the class's method
        if any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(self)
        self._trainer = self._own_step = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fail before the first step when the callback is not attached or the optimizer is not masked."""
        if self._trainer is None:
            raise RuntimeError(
                "MaskedUnlearningCallback only sees batches through its Trainer: use "
                "MaskedUnlearningCallback(...).attach(trainer) instead of callbacks=[...] / add_callback"
            )
        unwrap_optimizer(self._trainer.optimizer)

    def batches(self, inputs: Any) -> tuple[Any, Any]:
        """The ``(forget, retain)`` batches of one training input."""
        return self._split(inputs)

    def _stage(self, trainer: Trainer, inputs: Any) -> None:
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and not getattr(accelerator, "sync_gradients", True):
            return  # not the micro-batch the optimizer steps after
        forget, retain = self.batches(inputs)
        unwrap_optimizer(trainer.optimizer).stage(forget=forget, retain=retain)
