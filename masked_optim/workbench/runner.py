"""One unlearning run: a method, an optimizer (masked or plain), a split; metrics and a trace."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from masked_optim import ProbablyAlignedAdam, ProbablyAlignedSGD

from .data import UnlearningSplit
from .methods import Phase, UnlearningMethod
from .metrics import Metrics, accuracy, evaluate

__all__ = ["MASK_OPTIONS", "PLAIN_OPTIONS", "BatchStream", "RunResult", "check_batch_indices",
           "make_optimizer", "phase_batch_sizes", "run_unlearning"]

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


#: Keywords of the optimizers' mask (per group) and whole-update test (optimizer level) that
#: ``mask_options`` carries; :func:`make_optimizer` also accepts them as plain keywords.
MASK_OPTIONS = ("confidence", "forget_confidence", "retain_confidence", "quantile", "soft", "rescale",
                "rescale_scope", "max_scale", "certify", "certify_policy", "certify_tries", "retain_guard")

#: What makes a probably-aligned optimizer plain (no test on either side: exactly torch.optim).
PLAIN_OPTIONS: dict[str, Any] = {"confidence": None, "forget_confidence": None, "retain_confidence": None}


def make_optimizer(model: nn.Module, kind: str = "sgd", *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4, masked: bool = True,
                   mask_options: Mapping[str, Any] | None = None,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """A probably-aligned optimizer (``kind`` ``"sgd"`` or ``"adam"``) over the trainable
    parameters of ``model``.

    ``masked=True`` passes exactly the given ``mask_options`` (e.g. ``{"confidence": 0.9,
    "rescale": None}``); every option not given takes the optimizer's own default, so this
    function never fixes a mask default. ``masked=False`` passes ``confidence``,
    ``forget_confidence`` and ``retain_confidence`` as ``None``: no test on either side, i.e. the
    trajectory of torch.optim.SGD / Adam whatever the defaults are; it takes no mask options.

    Mask keywords given directly (``confidence=0.95``, as in earlier versions) join
    ``mask_options``; other keyword arguments (``engine``, ``chunk_size``, ...) go to the
    optimizer as they are.
    """
    options = dict(mask_options or {})
    for key in [k for k in kwargs if k in MASK_OPTIONS]:
        if key in options:
            raise ValueError(f"{key!r} given both as a keyword and in mask_options")
        options[key] = kwargs.pop(key)
    if not masked:
        if options:
            raise ValueError(f"a plain optimizer takes no mask options, got {sorted(options)}")
        options = dict(PLAIN_OPTIONS)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return ProbablyAlignedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  model=model, **options, **kwargs)
    if kind == "adam":
        return ProbablyAlignedAdam(params, lr=lr, weight_decay=weight_decay, model=model,
                                   **options, **kwargs)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', not {kind!r}")


def check_batch_indices(pool: Tensor, exclude: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` indices drawn without replacement from ``pool`` minus ``exclude`` (all of them if
    fewer remain): the independent batch of the whole-update test, disjoint from the batch the
    mask was chosen on."""
    rest = pool[~torch.isin(pool, exclude)]
    return rest[torch.randperm(len(rest), generator=generator)[:n]]


def _check_generator(seed: int) -> torch.Generator:
    # A second stream for the check batches, derived from the run's seed alone, so that the step
    # batches of a certified run are the same as those of the plain run with the same seed.
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))


@dataclass
class RunResult:
    """Outcome of :func:`run_unlearning`.

    ``runtime_s`` covers set-up and steps, not the evaluations of the trace. ``kept_fraction`` is
    the mean over steps of the optimizer's kept fraction (1.0 for a plain run). ``trace`` holds
    ``{"step", "FA", "RA"}`` every ``track_every`` steps (and at step 0); ``kept`` one value per
    step. ``diverged``: non-finite weights or outputs; ``collapsed``: the final retain accuracy is
    near chance (:attr:`Metrics.collapsed`; ``False`` without final metrics). ``certificates``
    counts the steps per whole-update test outcome (``"accepted"``, ``"tightened"``,
    ``"emptied"``, ``"skipped"``); empty when no step was certified.
    """

    metrics: Metrics | None
    runtime_s: float
    steps: int
    kept_fraction: float
    skipped_steps: int
    trace: list[dict[str, float]] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    diverged: bool = False
    collapsed: bool = False
    certificates: dict[str, int] = field(default_factory=dict)


def run_unlearning(model: nn.Module, method: UnlearningMethod, split: UnlearningSplit, *,
                   masked: bool = True, lr: float | None = None, epochs: int | None = None,
                   batch_size: int | None = None, optimizer: str = "sgd", momentum: float = 0.9,
                   weight_decay: float = 5e-4, mask_options: Mapping[str, Any] | None = None,
                   seed: int = 0,
                   track_every: int = 0, trace_points: int = 0, evaluate_at_end: bool = True,
                   progress: bool = False, desc: str | None = None,
                   optimizer_kwargs: dict[str, Any] | None = None) -> RunResult:
    """Unlearn ``split.forget_idx`` from ``model`` (in place) with ``method``.

    ``masked=True`` uses the probably-aligned optimizer with ``mask_options`` (see
    :func:`make_optimizer`; options not given take the optimizer's defaults) and passes every
    step's forget batch (true labels) and retain batch to ``step()``; ``masked=False`` uses the
    same optimizer with no test on either side, i.e. plain SGD/Adam, and ignores
    ``mask_options``. Both draw the same batches for a given ``seed``. ``lr``, ``epochs`` and
    ``batch_size`` default to the method's recipe. ``optimizer_kwargs`` go to the optimizer too
    (non-mask keywords such as ``engine``).

    When ``mask_options`` sets ``certify``, each masked step also gets ``check_retain=``: as many
    retain samples as the step's retain batch (fewer only if the retain set has no more), drawn
    without replacement from the retain samples *outside* that batch, from a generator derived
    from ``seed`` alone (:func:`check_batch_indices`) — an independent batch for the whole-update
    test, and the same step batches as the plain run.

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
    options = dict(mask_options or {}) if masked else None
    certify = masked and options is not None and options.get("certify") is not None
    check_gen = _check_generator(seed) if certify else None
    opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         masked=masked, mask_options=options, **(optimizer_kwargs or {}))
    certificates: dict[str, int] = {}
    was_training = model.training
    model.train()
    bar = tqdm(total=total, desc=desc or method.name, disable=not progress, leave=False, unit="step")
    step = 0
    for phase, nf, nr, steps in plan:
        for _ in range(steps):
            forget = images.batch(forget_stream.take(nf), device)
            retain_idx = retain_stream.take(nr)
            retain = images.batch(retain_idx, device)
            check = None
            if check_gen is not None:
                check_idx = check_batch_indices(split.retain_idx, retain_idx, len(retain_idx), check_gen)
                if len(check_idx) < 2:
                    raise ValueError("certify needs at least 2 retain samples outside each step's "
                                     "retain batch for the independent check batch")
                check = images.batch(check_idx, device)
            opt.zero_grad(set_to_none=True)
            loss = method.loss(model, forget=forget, retain=retain, phase=phase.kind,
                               progress=step / total)
            loss.backward()
            method.before_step(model)
            if check is not None:
                opt.step(forget=forget, retain=retain, check_retain=check)
            elif masked:
                opt.step(forget=forget, retain=retain)
            else:
                opt.step()
            method.after_step(model)
            diag = opt.diagnostics
            if diag is None and masked:
                raise RuntimeError("the masked optimizer reported no diagnostics after a step")
            kept.append(1.0 if diag is None else float(diag.kept_fraction))
            skipped += int(bool(diag is not None and diag.skipped))
            cert = getattr(diag, "certificate", None)
            if cert is not None:
                certificates[cert.action] = certificates.get(cert.action, 0) + 1
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
                     skipped_steps=skipped, trace=trace, kept=kept, diverged=diverged,
                     collapsed=metrics is not None and metrics.collapsed, certificates=certificates)
