"""The probably-aligned optimizers."""

from ._base import Certificate, ProbablyAlignedOptimizer, StepDiagnostics
from .adam import ProbablyAlignedAdam, ProbablyAlignedAdamW
from .sgd import ProbablyAlignedSGD

__all__ = [
    "Certificate",
    "ProbablyAlignedAdam",
    "ProbablyAlignedAdamW",
    "ProbablyAlignedOptimizer",
    "ProbablyAlignedSGD",
    "StepDiagnostics",
]
