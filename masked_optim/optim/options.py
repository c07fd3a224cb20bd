"""The optimizers' mask options: defaults, validation, and the one object the constructors fill."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ..hooks import HookEngine
from ..losses import PerSampleLoss
from ..mask import RESCALE_MODES, RESCALE_SCOPES
from ..stats import StatsEngine, VmapEngine

__all__ = ["DEFAULT", "FORGET_CONFIDENCE", "MASK_KEYS", "RETAIN_CONFIDENCE", "MaskOptions", "make_engine",
           "validate_confidence", "validate_group"]


class _Default:
    """Marks a mask keyword the caller did not give (see :data:`DEFAULT`); one instance, also
    through copies and pickles."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"  # pickled by reference to the module attribute

    def __copy__(self) -> _Default:
        return self

    def __deepcopy__(self, memo: dict) -> _Default:
        return self


#: Default of ``confidence`` and ``retain_confidence``: with neither given, the forget test runs at
#: :data:`FORGET_CONFIDENCE` and the retain test at :data:`RETAIN_CONFIDENCE`; a ``confidence`` the
#: caller gives applies to both tests (``None``: no mask), unless a side is given its own.
DEFAULT: Any = _Default()
FORGET_CONFIDENCE = 0.95
RETAIN_CONFIDENCE = 0.05  # q < 0: drop only coordinates whose step probably raises the retain loss

#: the per-group mask settings (param-group keys, like torch.optim's lr or momentum)
MASK_KEYS = ("confidence", "forget_confidence", "retain_confidence", "quantile", "soft", "rescale", "rescale_scope",
             "max_scale")


@dataclasses.dataclass(frozen=True)
class MaskOptions:
    """Every keyword the probably-aligned optimizers add to torch.optim's, as given by the caller.

    The constructors keep explicit keyword signatures (as torch.optim's do) and pass them on with
    :meth:`collect`; :meth:`group_defaults` are the param-group keys (:data:`MASK_KEYS`), the rest
    configure the optimizer as a whole."""

    model: nn.Module
    loss_fn: Callable[[Any, Tensor], Tensor] | str | None = None
    confidence: float | None = DEFAULT
    forget_confidence: float | None = None
    retain_confidence: float | None = DEFAULT
    quantile: str = "normal"
    soft: bool = False
    chunk_size: int | None = None
    engine: StatsEngine | str | None = None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    certify: float | None = None
    certify_policy: str = "tighten"
    certify_tries: int = 8
    retain_guard: float | None = 0.05
    rescale: str | None = "norm"
    rescale_scope: str = "tensor"
    max_scale: float = 100.0
    reuse_buffers: bool | None = None

    @classmethod
    def collect(cls, kwargs: Mapping[str, Any]) -> MaskOptions:
        """The options among ``kwargs`` (a constructor's ``locals()``)."""
        return cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs})

    def validate(self) -> None:
        """Checks of the optimizer-wide options (the group keys are checked per group)."""
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        PerSampleLoss(self.loss_fn)
        if self.forget_weight < 0 or self.retain_weight < 0:
            raise ValueError("forget_weight and retain_weight must be non-negative")
        validate_confidence(self.certify, "certify")
        if self.certify_policy not in ("tighten", "skip"):
            raise ValueError(f"certify_policy must be 'tighten' or 'skip', got {self.certify_policy!r}")
        if not isinstance(self.certify_tries, int) or self.certify_tries < 1:
            raise ValueError(f"certify_tries must be a positive int, got {self.certify_tries!r}")
        if self.reuse_buffers not in (None, False, True):
            raise ValueError(f"reuse_buffers must be None, False or True, got {self.reuse_buffers!r}")
        guard = self.retain_guard
        if guard is not None and (isinstance(guard, bool) or not isinstance(guard, (int, float))
                                  or not 0.0 <= guard < math.inf):
            raise ValueError(f"retain_guard must be None or a finite number >= 0, got {guard!r}")

    def group_defaults(self) -> dict[str, Any]:
        """The param-group mask keys, :data:`DEFAULT` resolved."""
        confidence, retain = self.confidence, self.retain_confidence
        if retain is DEFAULT:
            retain = RETAIN_CONFIDENCE if confidence is DEFAULT else None
        if confidence is DEFAULT:
            confidence = FORGET_CONFIDENCE
        return dict(confidence=confidence, forget_confidence=self.forget_confidence, retain_confidence=retain,
                    quantile=self.quantile, soft=self.soft, rescale=self.rescale, rescale_scope=self.rescale_scope,
                    max_scale=self.max_scale)


def validate_confidence(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be None or a float in (0, 1), got {value!r}")


def validate_group(group: dict[str, Any], owner: str, model_param_ids: set[int], index: int) -> None:
    """Check one param group's mask keys and parameters (``owner``: the optimizer's class name)."""
    for key in ("confidence", "forget_confidence", "retain_confidence"):
        validate_confidence(group[key], key)
    if group["quantile"] not in ("normal", "t"):
        raise ValueError(f"quantile must be 'normal' or 't', got {group['quantile']!r}")
    if group["rescale"] not in RESCALE_MODES:
        raise ValueError(f"rescale must be None, 'count' or 'norm', got {group['rescale']!r}")
    if group["rescale_scope"] not in RESCALE_SCOPES:
        raise ValueError(f"rescale_scope must be 'tensor', 'group' or 'global', got {group['rescale_scope']!r}")
    cap = group["max_scale"]
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 1.0 <= cap < math.inf:
        raise ValueError(f"max_scale must be a finite number >= 1, got {cap!r}")
    if group.get("fused") not in (None, False, True):
        raise ValueError(f"fused must be None, False or True, got {group['fused']!r}")
    if group.get("differentiable"):
        raise ValueError(f"{owner} does not support differentiable=True")
    for i, p in enumerate(group["params"]):
        if id(p) not in model_param_ids:
            raise ValueError(
                f"parameter {i} of group {index} (shape {tuple(p.shape)}) is not a parameter of `model`: "
                "per-sample statistics can only be computed for the model's own parameters"
            )


def make_engine(engine: StatsEngine | str | None, chunk_size: int | None) -> StatsEngine:
    """The statistics engine an ``engine=`` option names."""
    if engine is None or engine == "auto":
        return HookEngine(fallback=VmapEngine(chunk_size), chunk_size=chunk_size)
    if engine == "hooks":
        return HookEngine(fallback=None, chunk_size=chunk_size)
    if engine == "vmap":
        return VmapEngine(chunk_size)
    if isinstance(engine, str) or not callable(engine):
        raise ValueError(f"engine must be 'auto', 'hooks', 'vmap' or a StatsEngine, got {engine!r}")
    return engine
