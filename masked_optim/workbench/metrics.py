"""The numbers unlearning papers compare (docs/design.md §6): FA/RA/TA, UA, MIA-efficacy, gap to retrain."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .data import ImageSet, UnlearningSplit

__all__ = [
    "COLLAPSE_MARGIN",
    "GAP_METRICS",
    "Metrics",
    "accuracy",
    "avg_gap",
    "evaluate",
    "is_collapsed",
    "majority_rate",
    "mia_efficacy",
    "svc_mia_efficacy",
    "true_label_confidence",
]

GAP_METRICS = ("FA", "RA", "TA", "MIA")

#: Percentage points above the majority-class rate within which a retain accuracy counts as
#: collapsed (docs/design.md §6).
COLLAPSE_MARGIN = 10.0


def majority_rate(labels: Tensor | np.ndarray | Sequence[int]) -> float:
    """Share of the most frequent class among ``labels``, in percent (like the accuracies):
    the retain accuracy of a model that predicts that one class everywhere. NaN when empty."""
    y = torch.as_tensor(np.asarray(labels)).flatten().long()
    if y.numel() == 0:
        return float("nan")
    return 100.0 * float(torch.bincount(y - y.min()).max()) / y.numel()


def is_collapsed(ra: float, majority: float, margin: float = COLLAPSE_MARGIN) -> bool:
    """Whether a retain accuracy ``ra`` (percent) is near chance: ``ra ≤ majority + margin``,
    ``majority`` being :func:`majority_rate` of the retain labels.

    Such a model predicts (almost) one class, and its MIA lands at 0 or 100, which can make its
    gap to retrain look deceptively good (docs/design.md §6). NaN inputs are not collapsed.
    """
    return bool(ra <= majority + margin)  # False for NaN


@dataclass(frozen=True)
class Metrics:
    """Accuracies on forget/retain/test and MIA-efficacy, all in percent.

    ``diverged`` is set when the model gave non-finite outputs on some evaluated sample;
    ``collapsed`` when its retain accuracy is within :data:`COLLAPSE_MARGIN` points of the
    majority-class rate of the retain set (:func:`is_collapsed`): it predicts near chance, and its
    gap to retrain must not be read as a good result. Neither flag enters :meth:`as_dict`.
    """

    FA: float
    RA: float
    TA: float
    MIA: float
    diverged: bool = False
    collapsed: bool = False

    @property
    def UA(self) -> float:
        """Unlearning accuracy, 100 - FA."""
        return 100.0 - self.FA

    def as_dict(self) -> dict[str, float]:
        """The four measured numbers plus UA."""
        return {"FA": self.FA, "RA": self.RA, "TA": self.TA, "MIA": self.MIA, "UA": self.UA}


class _EvalMode:
    """Evaluation behaviour (BatchNorm running statistics, no dropout) restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _logits(model: nn.Module, images: ImageSet, idx: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    device = _device_of(model)
    outs, ys = [], []
    with _EvalMode(model):
        for chunk in idx.split(batch_size):
            x, y = images.batch(chunk, device)
            outs.append(model(x).float().cpu())
            ys.append(y.cpu())
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    # A diverged model (non-finite logits) gets no credit, whatever argmax makes of NaN.
    correct = (logits.argmax(1) == y) & torch.isfinite(logits).all(1)
    return 100.0 * float(correct.float().mean())


def _confidence(logits: Tensor, y: Tensor) -> np.ndarray:
    probs = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
    return torch.nan_to_num(probs, nan=0.0).double().numpy()


def accuracy(model: nn.Module, images: ImageSet, idx: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent of ``model`` (evaluation mode) on the rows ``idx``.

    Samples with non-finite logits count as wrong.
    """
    return _accuracy(*_logits(model, images, idx, batch_size))


def true_label_confidence(model: nn.Module, images: ImageSet, idx: Tensor,
                          batch_size: int = 1024) -> np.ndarray:
    """Softmax probability of the true label, one number per sample (evaluation mode).

    Samples with non-finite logits (a diverged model) get probability 0.
    """
    return _confidence(*_logits(model, images, idx, batch_size))


def svc_mia_efficacy(members: np.ndarray, non_members: np.ndarray, targets: np.ndarray) -> float:
    """Percent of ``targets`` that an RBF SVC, fit on members (label 1) versus non-members
    (label 0), calls non-members. Each input holds one feature per sample.

    This is SalUn's ``SVC_fit_predict`` with ``target_train=None``: ``SVC(C=3, gamma="auto",
    kernel="rbf")``.
    """
    from sklearn.svm import SVC

    members = np.asarray(members, dtype=np.float64).reshape(len(members), -1)
    non_members = np.asarray(non_members, dtype=np.float64).reshape(len(non_members), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    if len(members) == 0 or len(non_members) == 0 or len(targets) == 0:
        raise ValueError("MIA needs at least one member, one non-member and one target sample")
    x = np.concatenate([members, non_members])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return 100.0 * float(1.0 - clf.predict(targets).mean())


def mia_efficacy(model: nn.Module, split: UnlearningSplit, batch_size: int = 1024) -> float:
    """MIA-efficacy on the forget set, the SalUn recipe (docs/design.md §6).

    Members are the first N retain samples, N = the test-set size (all of them if the retain set
    is smaller); non-members are the test set; the feature is the true-label softmax probability.
    """
    n = len(split.test_idx)
    members = true_label_confidence(model, split.data.train, split.retain_idx[:n], batch_size)
    non_members = true_label_confidence(model, split.data.test, split.test_idx, batch_size)
    targets = true_label_confidence(model, split.data.train, split.forget_idx, batch_size)
    return svc_mia_efficacy(members, non_members, targets)


def evaluate(model: nn.Module, split: UnlearningSplit, batch_size: int = 1024) -> Metrics:
    """FA, RA, TA and MIA-efficacy of ``model`` on ``split`` (one forward pass per set), with the
    ``diverged`` and ``collapsed`` flags (see :class:`Metrics`)."""
    train, test = split.data.train, split.data.test
    lf, yf = _logits(model, train, split.forget_idx, batch_size)
    lr, yr = _logits(model, train, split.retain_idx, batch_size)
    lt, yt = _logits(model, test, split.test_idx, batch_size)
    n = len(split.test_idx)  # members: the first N retain samples, as in mia_efficacy
    mia = svc_mia_efficacy(_confidence(lr[:n], yr[:n]), _confidence(lt, yt), _confidence(lf, yf))
    finite = all(bool(torch.isfinite(t).all()) for t in (lf, lr, lt))
    ra = _accuracy(lr, yr)
    return Metrics(FA=_accuracy(lf, yf), RA=ra, TA=_accuracy(lt, yt), MIA=mia, diverged=not finite,
                   collapsed=is_collapsed(ra, majority_rate(yr)))


def avg_gap(metrics: Metrics | Mapping[str, float], retrain: Metrics | Mapping[str, float]) -> float:
    """Mean absolute difference to the retrained model over FA, RA, TA and MIA ("Avg. Gap")."""
    a = metrics.as_dict() if isinstance(metrics, Metrics) else metrics
    b = retrain.as_dict() if isinstance(retrain, Metrics) else retrain
    return float(np.mean([abs(a[k] - b[k]) for k in GAP_METRICS]))
