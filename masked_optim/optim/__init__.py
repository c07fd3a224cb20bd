"""The probably-aligned optimizers."""

from ._base import DEFAULT, Certificate, ProbablyAlignedOptimizer, StepDiagnostics
from .adam import ProbablyAlignedAdam, ProbablyAlignedAdamW
from .sgd import ProbablyAlignedSGD

__all__ = [
    "DEFAULT",
    "Certificate",
    "ProbablyAlignedAdam",
    "ProbablyAlignedAdamW",
    "ProbablyAlignedOptimizer",
    "ProbablyAlignedSGD",
    "StepDiagnostics",
]
