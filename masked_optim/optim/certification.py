"""The whole-update test of a masked step (``certify=c``, docs/design.md §3): pick the smallest
threshold shift whose step passes, apply it — or nothing, for the "skip" policy."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..certify import one_sided_test
from .diagnostics import Certificate
from .masking import StepLengths, Update, apply_updates, finite_update, masks_of, step_lengths

__all__ = ["certify_step", "restore_state", "snapshot_state"]

#: per-sample directional derivatives of a batch along the tangents (one per update)
Directional = Callable[[list[Tensor], list[Tensor], Any], Tensor]


def certify_step(updates: Sequence[Update], confidence: float, kind: str, tries_max: int, policy: str,
                 directional: Directional, check_forget: Any, check_retain: Any) -> tuple[Certificate, list[Tensor]]:
    """Test the masked step ``−lr·s·m⊙u`` as a whole on the check batches (``None``: that side is not
    tested): ``⟨m⊙u, g_r⟩ ≥ 0`` (it does not raise the retain loss) and ``⟨m⊙u, g_f⟩ ≤ 0`` (it raises
    the forget loss), one-sided at ``confidence``. On failure, ``"tighten"`` raises every threshold
    (doubling, then bisection, at most ``tries_max`` evaluations; an empty step if none passes),
    ``"skip"`` applies nothing. Returns the certificate and the masks applied."""
    params = [up.param for up in updates]

    def evaluate(delta: float) -> tuple[bool, float | None, float | None, list[Tensor], StepLengths]:
        cache: dict[int, Any] = {}
        ms = masks_of(updates, tests=None if not delta else lambda t: cache.setdefault(id(t), t.shifted(delta)))
        lengths = step_lengths(updates, ms)
        us = [finite_update(up, known) for up, known in zip(updates, lengths.known_finite)]
        tangents = [m * u if s is None else m * u * s.to(m.device) for m, u, s in zip(ms, us, lengths.scales)]
        ok, t_r, t_f = True, None, None
        if check_retain is not None:
            passed, t_r = one_sided_test(directional(params, tangents, check_retain), confidence, kind)
            ok &= passed
        if check_forget is not None and ok:
            passed, t_f = one_sided_test(-directional(params, tangents, check_forget), confidence, kind)
            ok &= passed
        return ok, t_r, t_f, ms, lengths

    tries = 1
    ok, t_r, t_f, ms, lengths = evaluate(0.0)
    delta, action = 0.0, "accepted"
    if not ok and policy == "skip":
        return Certificate("skipped", tries, 0.0, t_r, t_f, confidence), []
    if not ok:
        # grow the shift until a step passes, then bisect between the last failure and it
        lo, hi, best = 0.0, None, None
        step = 0.5
        while tries < tries_max:
            mid = step if hi is None else 0.5 * (lo + hi)
            tries += 1
            res = evaluate(mid)
            if res[0]:
                hi, best = mid, res
            else:
                lo = mid
                step *= 2.0
        if best is None:  # nothing passed in the budget: the empty step is trivially safe
            delta, action, t_r, t_f = math.inf, "emptied", None, None
            ms = [torch.zeros_like(up.u) for up in updates]
            lengths = step_lengths(updates, ms)
        else:
            delta, action = hi, "tightened"
            _, t_r, t_f, ms, lengths = best
    apply_updates(updates, ms, lengths)  # the lengths the accepted masks were tested with
    return Certificate(action, tries, delta, t_r, t_f, confidence), ms


def snapshot_state(state: dict, params: Sequence[Tensor]) -> dict[int, tuple[Tensor, dict[str, Any]]]:
    """Copies of the optimizer state of ``params`` (for the "skip" policy)."""
    snap = {}
    for p in params:
        st = state.get(p, {})
        snap[id(p)] = (p, {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()})
    return snap


def restore_state(state: dict, snap: dict[int, tuple[Tensor, dict[str, Any]]] | None) -> None:
    for p, st in (snap or {}).values():
        if st:
            state[p] = st
        else:
            state.pop(p, None)
