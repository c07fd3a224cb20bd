"""masked_optim: probably-aligned masked optimizers for machine unlearning.

``ProbablyAlignedSGD`` and ``ProbablyAlignedAdam`` are ``torch.optim.Optimizer`` subclasses whose
``step(forget=..., retain=...)`` applies the base update only on the coordinates that are, with the
chosen confidence, aligned with both the forget and the retain gradient.
"""

from .mask import Constraint, feasibility_mask, feasibility_masks, normal_quantile, quantile, soft_mask, \
    step_scale, student_t_quantile, z_scores
from .batches import Batch, ParsedBatch, parse_batch
from .certify import directional_derivatives, one_sided_test
from .hooks import HookEngine
from .losses import PerSampleLoss, causal_lm_loss, classification_loss, token_loss
from .rules import Rule, register_rule, rule_for
from .optim import (
    Certificate,
    ProbablyAlignedAdam,
    ProbablyAlignedAdamW,
    ProbablyAlignedOptimizer,
    ProbablyAlignedSGD,
    StepDiagnostics,
)
from .stats import GradStats, StatsEngine, VmapEngine, chan_merge, per_sample_grad_stats

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Certificate",
    "Constraint",
    "GradStats",
    "HookEngine",
    "ParsedBatch",
    "PerSampleLoss",
    "ProbablyAlignedAdam",
    "ProbablyAlignedAdamW",
    "ProbablyAlignedOptimizer",
    "ProbablyAlignedSGD",
    "Rule",
    "StatsEngine",
    "StepDiagnostics",
    "VmapEngine",
    "causal_lm_loss",
    "chan_merge",
    "classification_loss",
    "directional_derivatives",
    "feasibility_mask",
    "feasibility_masks",
    "normal_quantile",
    "one_sided_test",
    "parse_batch",
    "per_sample_grad_stats",
    "quantile",
    "register_rule",
    "rule_for",
    "soft_mask",
    "step_scale",
    "student_t_quantile",
    "token_loss",
    "z_scores",
]
