"""Per-sample losses: one contract for every engine and for the certificate (docs/design.md §4).

A *user* ``loss_fn(outputs, targets)`` keeps the contract it always had: it is applied to one sample
at a time (outputs and targets with a leading dimension of 1), so its reduction does not matter.
``outputs`` are what the model returned: a tensor, a tuple, or an object with ``.logits``.

The built-in losses are batched (``[n]`` per-sample values from one call) and chosen
automatically when no ``loss_fn`` is given:

* ``"classification"``: cross-entropy of the logits (``outputs.logits``, the first element of a
  tuple, or the tensor) against class targets — every ``(inputs, targets)`` batch, and mapping
  batches whose ``labels`` are one class per sample;
* ``"causal_lm"``: token cross-entropy of a causal language model, shifted (position ``t`` predicts
  label ``t + 1``), ``-100`` ignored, averaged over each sequence's counted tokens (0 for a sequence
  with none) — mapping batches with ``[n, L]`` labels on a model whose class name ends with
  ``ForCausalLM`` or ``LMHeadModel`` (PEFT wrappers included);
* ``"token"``: the same without the shift (token classification, masked LMs) — other mapping
  batches with ``[n, L]`` labels.

Pass ``loss_fn`` as one of these names to choose explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from .batches import ParsedBatch

__all__ = ["BUILTIN_LOSSES", "PerSampleLoss", "causal_lm_loss", "classification_loss", "logits_of", "token_loss"]

IGNORE_INDEX = -100
LossFn = Callable[[Any, Tensor], Tensor]


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: the tensor itself, ``.logits``, ``["logits"]`` or the first
    element of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in the model's outputs ({type(outputs).__name__}): return a tensor, a tuple "
        "whose first element is the logits, or an object with .logits — or pass loss_fn"
    )


def classification_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy, ``[n]``."""
    return F.cross_entropy(logits_of(outputs), targets, reduction="none")


def _sequence_mean(logits: Tensor, labels: Tensor) -> Tensor:
    # half-precision logits are promoted: a sum of log-probabilities over a sequence in bf16 loses digits
    lg = logits.flatten(0, 1)
    lg = lg if lg.dtype in (torch.float32, torch.float64) else lg.float()
    tok = F.cross_entropy(lg, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    tok = tok.view(labels.shape)
    count = (labels != IGNORE_INDEX).sum(1)
    return tok.sum(1) / count.clamp_min(1).to(tok.dtype)


def causal_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sequence mean token cross-entropy of a causal LM (shifted, ``-100`` ignored), ``[n]``."""
    logits = logits_of(outputs)
    return _sequence_mean(logits[:, :-1], labels[:, 1:])


def token_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sequence mean token cross-entropy, unshifted (``-100`` ignored), ``[n]``."""
    return _sequence_mean(logits_of(outputs), labels)


BUILTIN_LOSSES: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "classification": classification_loss,
    "causal_lm": causal_lm_loss,
    "token": token_loss,
}


def _is_causal_lm(model: nn.Module) -> bool:
    names = [type(model).__name__]
    base = getattr(model, "base_model", None)  # PEFT: PeftModelForCausalLM(base_model=LoraModel(model=...))
    inner = getattr(base, "model", None)
    if isinstance(inner, nn.Module):
        names.append(type(inner).__name__)
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


class PerSampleLoss:
    """The per-sample loss of a model on a batch, ``[n]``, under one contract for every engine.

    Args:
        loss_fn: ``None`` (choose a built-in loss from the batch and the model), a built-in name, or
            a user ``loss_fn(outputs, targets)`` applied to one sample at a time.
    """

    def __init__(self, loss_fn: LossFn | str | None = None) -> None:
        if isinstance(loss_fn, str) and loss_fn not in BUILTIN_LOSSES:
            raise ValueError(f"loss_fn must be callable, None or one of {sorted(BUILTIN_LOSSES)}, got {loss_fn!r}")
        if loss_fn is not None and not isinstance(loss_fn, str) and not callable(loss_fn):
            raise TypeError("loss_fn must be callable(outputs, targets) -> scalar loss, a built-in name or None")
        self.loss_fn = loss_fn

    def builtin(self, model: nn.Module, batch: ParsedBatch) -> Callable[[Any, Tensor], Tensor] | None:
        """The batched built-in this batch uses, or ``None`` for a user function."""
        if isinstance(self.loss_fn, str):
            return BUILTIN_LOSSES[self.loss_fn]
        if self.loss_fn is F.cross_entropy:  # the old spelling of the default
            return classification_loss
        if self.loss_fn is not None:
            return None
        if batch.mapping and batch.targets.dim() >= 2:
            return causal_lm_loss if _is_causal_lm(model) else token_loss
        return classification_loss

    def batched(self, model: nn.Module, batch: ParsedBatch, outputs: Any) -> Tensor:
        """Per-sample losses ``[n]`` from the outputs of one forward over the whole batch."""
        fn = self.builtin(model, batch)
        if fn is not None:
            return fn(outputs, batch.targets)
        user = self.loss_fn

        def one(o: Any, t: Tensor) -> Tensor:
            return user(tree_map(lambda v: v.unsqueeze(0) if isinstance(v, Tensor) else v, o), t.unsqueeze(0))

        dims = tree_map(lambda v: 0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch.n else None, outputs)
        try:
            return vmap(one, in_dims=(dims, 0))(outputs, batch.targets)
        except (RuntimeError, NotImplementedError, ValueError):  # a loss vmap cannot batch: one sample at a time
            def pick(k: int) -> Any:
                return tree_map(lambda v: v[k] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch.n else v,
                                outputs)

            return torch.stack([one(pick(k), batch.targets[k]) for k in range(batch.n)])

    def for_one(self, model: nn.Module, batch: ParsedBatch) -> Callable[[Any, Tensor], Tensor]:
        """``loss(outputs, targets)`` of a one-sample batch (leading size 1) as a scalar, for ``vmap``
        over the samples of ``batch``."""
        fn = self.builtin(model, batch)
        if fn is not None:
            return lambda outputs, targets: fn(outputs, targets).squeeze(0)
        return self.loss_fn  # type: ignore[return-value]

    def mean(self, model: nn.Module, batch: ParsedBatch, outputs: Any) -> Tensor:
        """The batch's mean per-sample loss."""
        return self.batched(model, batch, outputs).mean()
