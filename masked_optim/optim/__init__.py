"""The probably-aligned optimizers."""

from .adam import ProbablyAlignedAdam, ProbablyAlignedAdamW
from .base import ProbablyAlignedOptimizer
from .diagnostics import Certificate, StepDiagnostics
from .options import DEFAULT, MaskOptions
from .sgd import ProbablyAlignedSGD

__all__ = [
    "DEFAULT",
    "Certificate",
    "MaskOptions",
    "ProbablyAlignedAdam",
    "ProbablyAlignedAdamW",
    "ProbablyAlignedOptimizer",
    "ProbablyAlignedSGD",
    "StepDiagnostics",
]
