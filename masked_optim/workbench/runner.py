"""One unlearning run: a method, an optimizer (masked or plain), a split; metrics and a trace."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from masked_optim import ProbablyAlignedAdam, ProbablyAlignedSGD

from .data import UnlearningSplit
from .methods import Phase, UnlearningMethod
from .metrics import Metrics, accuracy, evaluate

__all__ = ["BatchStream", "RunResult", "make_optimizer", "phase_batch_sizes", "run_unlearning"]

#: Retain samples used for the per-step retain accuracy of the trace (the final RA uses all).
TRACE_RETAIN_SAMPLES = 2000


class BatchStream:
    """Endless shuffled passes over ``indices``: :meth:`take` continues where the last call
    stopped and reshuffles at the end of each pass, so every sample is seen once per pass."""

    def __init__(self, indices: Tensor, generator: torch.Generator) -> None:
        if len(indices) == 0:
            raise ValueError("cannot draw batches from an empty set")
        self.indices = indices
        self.generator = generator
        self._buffer = indices[:0]

    def take(self, n: int) -> Tensor:
        """The next ``n`` indices (``n`` at most the set size)."""
        n = min(n, len(self.indices))
        while len(self._buffer) < n:
            perm = torch.randperm(len(self.indices), generator=self.generator)
            self._buffer = torch.cat([self._buffer, self.indices[perm]])
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


def phase_batch_sizes(phase: Phase, batch_size: int, n_forget: int,
                      n_retain: int) -> tuple[int, int, int]:
    """``(forget batch, retain batch, steps)`` of one pass.

    A pass over one set takes ``ceil(size / batch)`` steps and draws a batch of the same size
    from the other set (for the loss or for the optimizer's alignment test). A pass over ``"all"``
    splits each batch in proportion to the set sizes, as one shuffled loader over the union would
    on average, with at least 2 forget samples so that a variance exists.
    """
    b = phase.batch_size or batch_size
    if phase.over == "forget":
        return min(b, n_forget), min(b, n_retain), math.ceil(n_forget / b)
    if phase.over == "retain":
        return min(b, n_forget), min(b, n_retain), math.ceil(n_retain / b)
    if phase.over == "all":
        total = n_forget + n_retain
        nf = min(n_forget, max(2, round(b * n_forget / total)))
        return nf, min(n_retain, max(2, b - nf)), math.ceil(total / b)
    raise ValueError(f"phase.over must be 'forget', 'retain' or 'all', not {phase.over!r}")


def make_optimizer(model: nn.Module, kind: str = "sgd", *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4, confidence: float | None = 0.95,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """A probably-aligned optimizer over the trainable parameters of ``model``.

    ``confidence=None`` gives the plain base optimizer (SGD or Adam, same trajectory as
    torch.optim). Extra keyword arguments go to the optimizer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return ProbablyAlignedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  model=model, confidence=confidence, **kwargs)
    if kind == "adam":
        return ProbablyAlignedAdam(params, lr=lr, weight_decay=weight_decay, model=model,
                                   confidence=confidence, **kwargs)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', not {kind!r}")


@dataclass
class RunResult:
    """Outcome of :func:`run_unlearning`.

    ``runtime_s`` covers set-up and steps, not the evaluations of the trace. ``kept_fraction`` is
    the mean over steps of the optimizer's kept fraction (1.0 for a plain run). ``trace`` holds
    ``{"step", "FA", "RA"}`` every ``track_every`` steps (and at step 0); ``kept`` one value per
    step.
    """

    metrics: Metrics | None
    runtime_s: float
    steps: int
    kept_fraction: float
    skipped_steps: int
    trace: list[dict[str, float]] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    diverged: bool = False


def run_unlearning(model: nn.Module, method: UnlearningMethod, split: UnlearningSplit, *,
                   masked: bool = True, lr: float | None = None, epochs: int | None = None,
                   batch_size: int | None = None, optimizer: str = "sgd", momentum: float = 0.9,
                   weight_decay: float = 5e-4, confidence: float = 0.95, seed: int = 0,
                   track_every: int = 0, trace_points: int = 0, evaluate_at_end: bool = True,
                   progress: bool = False, desc: str | None = None,
                   optimizer_kwargs: dict[str, Any] | None = None) -> RunResult:
    """Unlearn ``split.forget_idx`` from ``model`` (in place) with ``method``.

    ``masked=True`` uses the probably-aligned optimizer at ``confidence`` and passes every step's
    forget batch (true labels) and retain batch to ``step()``; ``masked=False`` uses the same
    optimizer with ``confidence=None``, i.e. plain SGD/Adam. Both draw the same batches for a
    given ``seed``. ``lr``, ``epochs`` and ``batch_size`` default to the method's recipe.

    Forget and retain accuracy are recorded every ``track_every`` steps, or at about
    ``trace_points`` evenly spaced steps; both 0 records nothing.
    """
    lr = method.lr if lr is None else lr
    epochs = method.epochs if epochs is None else epochs
    batch_size = method.batch_size if batch_size is None else batch_size
    device = next(model.parameters()).device
    images = split.data.train
    n_f, n_r = len(split.forget_idx), len(split.retain_idx)

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and any other module randomness
    forget_stream = BatchStream(split.forget_idx, gen)
    retain_stream = BatchStream(split.retain_idx, gen)
    plan = [(ph, *phase_batch_sizes(ph, batch_size, n_f, n_r))
            for e in range(epochs) for ph in method.phases(e)]
    total = sum(steps for *_, steps in plan)
    if trace_points and not track_every:
        track_every = max(1, math.ceil(total / trace_points))
    trace_retain = split.retain_idx[:TRACE_RETAIN_SAMPLES]

    def track(step: int) -> None:
        trace.append({"step": step,
                      "FA": accuracy(model, images, split.forget_idx),
                      "RA": accuracy(model, images, trace_retain)})

    trace: list[dict[str, float]] = []
    kept: list[float] = []
    skipped = 0
    if track_every:
        track(0)
    start = time.perf_counter()
    untimed = 0.0
    method.setup(model, (images.batch(c, device) for c in split.forget_idx.split(batch_size)), seed)
    opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         confidence=confidence if masked else None, **(optimizer_kwargs or {}))
    was_training = model.training
    model.train()
    bar = tqdm(total=total, desc=desc or method.name, disable=not progress, leave=False, unit="step")
    step = 0
    for phase, nf, nr, steps in plan:
        for _ in range(steps):
            forget = images.batch(forget_stream.take(nf), device)
            retain = images.batch(retain_stream.take(nr), device)
            opt.zero_grad(set_to_none=True)
            loss = method.loss(model, forget=forget, retain=retain, phase=phase.kind,
                               progress=step / total)
            loss.backward()
            method.before_step(model)
            if masked:
                opt.step(forget=forget, retain=retain)
            else:
                opt.step()
            method.after_step(model)
            diag = opt.diagnostics
            if diag is None and masked:
                raise RuntimeError("the masked optimizer reported no diagnostics after a step")
            kept.append(1.0 if diag is None else float(diag.kept_fraction))
            skipped += int(bool(diag is not None and diag.skipped))
            step += 1
            bar.update()
            if track_every and (step % track_every == 0 or step == total):
                t = time.perf_counter()
                track(step)
                untimed += time.perf_counter() - t
    bar.close()
    runtime = time.perf_counter() - start - untimed
    model.train(was_training)
    metrics = evaluate(model, split) if evaluate_at_end else None
    diverged = (metrics is not None and metrics.diverged) or not all(
        bool(torch.isfinite(p).all()) for p in model.parameters())
    return RunResult(metrics=metrics, runtime_s=runtime, steps=step,
                     kept_fraction=sum(kept) / len(kept) if kept else 1.0,
                     skipped_steps=skipped, trace=trace, kept=kept, diverged=diverged)
