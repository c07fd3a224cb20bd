"""The probably-aligned optimizers."""

from ._base import ProbablyAlignedOptimizer, StepDiagnostics
from .adam import ProbablyAlignedAdam, ProbablyAlignedAdamW
from .sgd import ProbablyAlignedSGD

__all__ = [
    "ProbablyAlignedAdam",
    "ProbablyAlignedAdamW",
    "ProbablyAlignedOptimizer",
    "ProbablyAlignedSGD",
    "StepDiagnostics",
]
