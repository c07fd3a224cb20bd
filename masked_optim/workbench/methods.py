"""Unlearning methods, each a small unit that gives the loss of one step.

A method does not own an optimizer or a loop. In your own loop::

    method = RL()
    method.setup(model, forget_batches, seed=0)       # SalUn's saliency, SCRUB's teacher, RNG
    opt = ProbablyAlignedSGD(model.parameters(), lr=method.lr, momentum=0.9,
                             weight_decay=5e-4, model=model)
    for forget, retain in batches:                   # (inputs, true labels) pairs
        opt.zero_grad()
        method.loss(model, forget=forget, retain=retain).backward()
        method.before_step(model)
        opt.step(forget=forget, retain=retain)        # plain optimizers: opt.step()
        method.after_step(model)

Losses are to be *minimised*; ascent methods return the negated objective. Forget batches are
always passed with their true labels: a method that needs other labels (RL) makes them itself,
so the same batch can feed the optimizer's alignment test, which must see the true labels.

``epochs``, ``lr`` and ``batch_size`` hold the published recipe where there is one (CIFAR-10,
ResNet-18, SGD with momentum 0.9 and weight decay 5e-4); :meth:`phases` says which set drives each
epoch, which :func:`masked_optim.workbench.runner.run_unlearning` follows.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FT",
    "GA",
    "METHODS",
    "L1Sparse",
    "NegGradPlus",
    "Phase",
    "RL",
    "SCRUB",
    "SalUn",
    "UnlearningMethod",
    "distill_kl",
    "get_method",
    "saliency_mask",
]

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Phase:
    """One pass within an epoch: the loss variant ``kind`` driven by the set ``over``.

    ``over`` is ``"forget"``, ``"retain"`` or ``"all"`` (forget and retain together, every batch
    holding forget and retain samples in proportion to the set sizes). ``batch_size`` overrides
    the method's batch size for this pass.
    """

    kind: str = "main"
    over: str = "retain"
    batch_size: int | None = None


def _need(batch: Batch | None, what: str, method: str) -> Batch:
    if batch is None:
        raise ValueError(f"{method} needs a {what} batch")
    return batch


@dataclass
class UnlearningMethod:
    """Base class: override :meth:`loss`; the hooks default to doing nothing."""

    name: ClassVar[str] = "method"
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 256

    def setup(self, model: nn.Module, forget_batches: Iterable[Batch] = (), seed: int = 0) -> None:
        """Prepare before the first step at the original weights (default: seed the RNG)."""
        self.generator = torch.Generator().manual_seed(seed)

    def phases(self, epoch: int) -> tuple[Phase, ...]:
        """The passes of epoch ``epoch`` (0-based)."""
        return (Phase(),)

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        """The loss to minimise for one step. ``progress`` is the fraction of the run done."""
        raise NotImplementedError

    def before_step(self, model: nn.Module) -> None:
        """Called after ``backward()``, before ``optimizer.step()``."""

    def after_step(self, model: nn.Module) -> None:
        """Called after ``optimizer.step()``."""

    def hyperparameters(self) -> dict[str, object]:
        """The constructor arguments: the recipe and the method's own settings."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@dataclass
class FT(UnlearningMethod):
    """Fine-tuning: cross-entropy on the retain set (catastrophic forgetting of the rest).
    SalUn's recipe: 10 epochs at lr 0.01."""

    name: ClassVar[str] = "FT"
    epochs: int = 10
    lr: float = 0.01

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        x, y = _need(retain, "retain", self.name)
        return F.cross_entropy(model(x), y)


@dataclass
class GA(UnlearningMethod):
    """Gradient ascent on the forget set: the loss is minus its cross-entropy.
    Recipe of Unlearn-Sparse/SalUn on CIFAR-10: 5 epochs at lr 1e-4 (SalUn grid-searched the
    learning rate in [1e-5, 0.1])."""

    name: ClassVar[str] = "GA"
    epochs: int = 5
    lr: float = 1e-4

    def phases(self, epoch: int) -> tuple[Phase, ...]:
        return (Phase(over="forget"),)

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        x, y = _need(forget, "forget", self.name)
        return -F.cross_entropy(model(x), y)


@dataclass
class NegGradPlus(UnlearningMethod):
    """NegGrad+ (Kurmanji et al., 2023): descent on the retain set and ascent on the forget set,
    ``beta * CE_r - (1 - beta) * CE_f``, one batch of each per step.

    The paper tunes ``beta``; 0.95 is a common choice. ``beta=0.5`` gives (half) the direction
    ``mu_r - mu_f`` that the masked optimizers take when ``step()`` gets no gradient. Epochs and
    learning rate are ours (there is no published recipe for these data)."""

    name: ClassVar[str] = "NegGrad+"
    epochs: int = 5
    lr: float = 0.01
    beta: float = 0.95

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        xf, yf = _need(forget, "forget", self.name)
        xr, yr = _need(retain, "retain", self.name)
        return (self.beta * F.cross_entropy(model(xr), yr)
                - (1.0 - self.beta) * F.cross_entropy(model(xf), yf))


@dataclass
class RL(UnlearningMethod):
    """Random labels: cross-entropy of the forget samples against labels drawn uniformly from
    all classes (fresh at every step, as SalUn does), plus cross-entropy on the retain samples,
    averaged over the combined batch. SalUn's recipe: 10 epochs at lr 0.013."""

    name: ClassVar[str] = "RL"
    epochs: int = 10
    lr: float = 0.013

    def phases(self, epoch: int) -> tuple[Phase, ...]:
        return (Phase(over="all"),)

    def random_labels(self, targets: Tensor, num_classes: int) -> Tensor:
        """Uniform labels in ``[0, num_classes)``, drawn from the method's own generator."""
        if not hasattr(self, "generator"):
            self.generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, num_classes, targets.shape, generator=self.generator)
        return labels.to(targets.device)

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        xf, yf = _need(forget, "forget", self.name)
        out_f = model(xf)
        total = F.cross_entropy(out_f, self.random_labels(yf, out_f.shape[1]), reduction="sum")
        count = len(yf)
        if retain is not None:
            xr, yr = retain
            total = total + F.cross_entropy(model(xr), yr, reduction="sum")
            count += len(yr)
        return total / count


def saliency_mask(model: nn.Module, forget_batches: Iterable[Batch],
                  ratio: float = 0.5) -> dict[str, Tensor]:
    """SalUn's weight saliency: the global top ``ratio`` of ``|gradient of the forget loss|`` at
    the current weights (evaluation mode), as boolean tensors per parameter name.

    The gradient is that of the summed per-batch mean cross-entropy, as in SalUn's
    ``generate_mask.py``; the model is not changed.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for x, y in forget_batches:
            loss = F.cross_entropy(model(x), y)
            for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()),
                                                                     allow_unused=True)):
                if g is not None:
                    grads[n] += g
    finally:
        model.train(was_training)
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    k = int(ratio * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        # topk (not a threshold) so that ties cannot make the mask larger than asked.
        keep[flat.topk(k, sorted=False).indices] = True
    out, start = {}, 0
    for n, g in grads.items():
        out[n] = keep[start:start + g.numel()].view_as(g)
        start += g.numel()
    return out


@dataclass
class SalUn(RL):
    """SalUn: RL restricted to the salient weights (:func:`saliency_mask`, computed once at the
    original weights). Recipe: 10 epochs at lr 0.013, 50 % of the weights salient.

    The restriction is applied to the final update: after every step the non-salient weights
    are put back to their original values. Masking only the gradient (SalUn issue #32) lets
    momentum and weight decay move the "frozen" weights. The gradient is masked as well, so that
    a masked optimizer judges the direction SalUn actually takes.
    """

    name: ClassVar[str] = "SalUn"
    ratio: float = 0.5
    mask: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def setup(self, model: nn.Module, forget_batches: Iterable[Batch] = (), seed: int = 0) -> None:
        super().setup(model, forget_batches, seed)
        self.mask = saliency_mask(model, forget_batches, self.ratio)
        self._frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.mask}

    def before_step(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.grad is not None and n in self.mask:
                p.grad.mul_(self.mask[n])

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.mask:
                p.copy_(torch.where(self.mask[n], p, self._frozen[n]))


@dataclass
class L1Sparse(UnlearningMethod):
    """l1-sparse unlearning (Jia et al., 2023): retain cross-entropy plus ``alpha * ||theta||_1``
    with ``alpha`` decaying linearly to 0 over the run. Recipe: 10 epochs at lr 0.01,
    alpha 5e-4."""

    name: ClassVar[str] = "l1-sparse"
    epochs: int = 10
    lr: float = 0.01
    alpha: float = 5e-4

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        x, y = _need(retain, "retain", self.name)
        l1 = sum(p.abs().sum() for p in model.parameters())
        return F.cross_entropy(model(x), y) + self.alpha * (1.0 - progress) * l1


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch (Hinton distillation)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * temperature ** 2


@dataclass
class SCRUB(UnlearningMethod):
    """SCRUB (Kurmanji et al., 2023): the original model is a frozen teacher; "max" passes over
    the forget set minimise ``-KL(teacher || student)``, "min" passes over the retain set minimise
    ``gamma * CE + alpha * KL``. The first ``msteps`` epochs hold both passes, the rest only "min".
    Recipe (the authors' small-scale CIFAR setting): 3 epochs, 2 max epochs, lr 5e-4, batch 128
    for retain and 32 for forget, gamma 0.99, alpha 0.001, temperature 4."""

    name: ClassVar[str] = "SCRUB"
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 128
    forget_batch_size: int = 32
    msteps: int = 2
    gamma: float = 0.99
    alpha: float = 0.001
    temperature: float = 4.0

    def setup(self, model: nn.Module, forget_batches: Iterable[Batch] = (), seed: int = 0) -> None:
        super().setup(model, forget_batches, seed)
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def phases(self, epoch: int) -> tuple[Phase, ...]:
        mx = (Phase("max", "forget", self.forget_batch_size),) if epoch < self.msteps else ()
        return (*mx, Phase("min", "retain"))

    def loss(self, model: nn.Module, forget: Batch | None = None, retain: Batch | None = None, *,
             phase: str = "main", progress: float = 0.0) -> Tensor:
        if not hasattr(self, "teacher"):
            raise RuntimeError("SCRUB.setup(model) must run first: it copies the teacher")
        if phase == "max":
            x, _ = _need(forget, "forget", self.name)
            with torch.no_grad():
                t = self.teacher(x)
            return -distill_kl(model(x), t, self.temperature)
        x, y = _need(retain, "retain", self.name)
        with torch.no_grad():
            t = self.teacher(x)
        s = model(x)
        return self.gamma * F.cross_entropy(s, y) + self.alpha * distill_kl(s, t, self.temperature)


METHODS: dict[str, type[UnlearningMethod]] = {
    m.name: m for m in (FT, GA, NegGradPlus, RL, SalUn, L1Sparse, SCRUB)
}


def get_method(name: str, **overrides: object) -> UnlearningMethod:
    """A method by its name (case-insensitive; ``NegGrad+``, ``l1-sparse``, ...) with field
    overrides, e.g. ``get_method("RL", epochs=5)``. ``None`` overrides are ignored."""
    lookup = {k.lower(): v for k, v in METHODS.items()}
    aliases = {"neggradplus": "neggrad+", "neggrad": "neggrad+", "l1": "l1-sparse",
               "l1sparse": "l1-sparse"}
    key = aliases.get(name.lower(), name.lower())
    if key not in lookup:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return lookup[key](**{k: v for k, v in overrides.items() if v is not None})
