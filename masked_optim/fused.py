"""Fused masked steps (issue 15): the whole elementwise part of a masked SGD or Adam/AdamW step in one
compiled pass per parameter tensor.

One pass reads the parameter, the direction (the caller's gradient, or ``u = retain_weight·μ_r −
forget_weight·μ_f`` from the statistics), the optimizer state and the statistics of both tests; it
advances the state exactly as the base optimizer would, decides the mask (docs/design.md §3) on the
final update ``u`` and writes ``θ − lr·s·m⊙u`` and the kept count. ``torch.compile`` (inductor)
generates the kernel: vectorised C++ with OpenMP on CPU, Triton on CUDA.

Everything here is a function of tensors and scalars, with no optimizer object in sight; the
optimizers call :func:`masked_sgd_` and :func:`masked_adam_` (integration is a separate step).

What is compiled, and when it recompiles
    One graph per *structure* and dtypes: which inputs are present (gradient or statistics
    direction, momentum buffer, each side's statistics, AMSGrad's maximum), ``soft`` and the pass
    (``"apply"``, ``"defer"``, ...), and the parameter/statistics dtypes and device. Every number —
    learning rate, momentum, dampening, weight decay, ``maximize``, Nesterov, the first step of the
    momentum buffer (a zeroed buffer and coefficients that make it ``g``), betas, ε, bias corrections,
    each side's threshold and its sign (strict or lenient), the direction's weights, ``max_scale`` —
    reaches the kernel as an element of one small tensor, so learning-rate schedules, new batch sizes
    and threshold shifts never recompile. Tensors are passed flattened with symbolic sizes
    (``dynamic=True``): one graph serves every parameter size (sizes 0 and 1 aside). Consecutive
    tensors of one structure run in chunks of :data:`GROUP_SIZE` per compiled call (one graph per
    chunk length), which pays the call overhead once per chunk. Each structure gets a code object of
    its own, so dynamo's per-function cache limit is never reached.

Numerics
    The arithmetic runs in float32 (float64 when a parameter or a statistic is float64) whatever the
    parameter's dtype, and each stored tensor is rounded once: for bfloat16/float16 parameters the
    update ``u`` the mask reads is the float32 value, before the state is rounded to the parameter's
    dtype (torch's fused optimizers do the same). The hard mask uses no division or square root::

        q ≥ 0 ("probably aligned"):        keep ⇔ sign·u·μ > 0  and (q = 0 or μ² > coeff·S)
        q < 0 ("not probably misaligned"): keep ⇔ not (sign·u·μ < 0 and μ² > coeff·S)

    and ``|u| > 0``, where ``coeff = q²/(n(n−1))`` and ``S`` is M2 — or ``Σg²`` when the caller passes
    the adjusted ``q' = q/√(1 + q²/(n−1))`` (the optimizers' Σg² trick: the same mask). The soft mask
    is ``Π Φ(z − q)`` with the z-scores of :func:`masked_optim.mask.z_scores`. A masked-out coordinate
    never moves, even where ``u`` is not finite (the update is a select, not a multiplication by 0).
    The kept count is an integer sum (exact), returned as float64.

    Where it differs from the optimizers' eager path (``sgd_updates``/``adam_updates`` and their
    ``_GroupMask``): a NaN ``u`` is never kept (eager: kept by a lenient-only or soft mask); a
    masked-out non-finite ``u`` leaves the parameter as it was (eager: ``addcmul`` by 0 makes it
    NaN); low-precision parameters get the float32 ``u`` (eager rounds it, and each intermediate, to
    the parameter's dtype); and float32 results may differ in the last bit where ATen fuses a
    multiply-add (``lerp``, ``add(alpha=)``). At the mask's boundary ``μ² = coeff·S`` the two
    formulas (here ``μ² > coeff·S``, there ``S − μ²/coeff < 0``) may round differently.

Step length
    ``rescale="norm"|"count"`` sets each tensor's step length from the whole mask, so the update needs
    the mask's sums before it moves anything. The compiled path makes two passes per tensor: the
    first advances the state and writes ``m⊙u`` to a scratch buffer (lent by the optimizer's step
    workspace, :mod:`masked_optim.workspace`) with the three sums (kept, ``‖u‖²``, ``‖m⊙u‖²``), the
    second applies ``θ − lr·s·(m⊙u)`` (``RESCALE_PASSES`` below says which variant;
    benchmarks/bench_kernel.py measured both). Factors over a group or over every group
    (``rescale_scope``) take the ``deltas=`` route: the pass writes ``m⊙u`` and the sums, the caller
    pools them with :func:`scale_from_sums` and applies with :func:`apply_deltas_`. The retain guard
    moves (and backs off) a tensor's deferred ``m⊙u`` with its own length through :func:`add_scaled_`:
    one pass reading θ and ``m⊙u`` that rounds ``s·(m⊙u)`` and adds it with a fused multiply-add,
    the rounding of ``d.mul_(s)`` and ``θ.add_(d, alpha=a)`` (ATen's add with alpha is itself a fused
    multiply-add where vectorised: the same bits) without their extra pass over ``d``.

When it runs compiled
    ``fused=True``: compiled (an error when :func:`available` is False); ``fused=False``: the same
    functions run eagerly (a reference, slower than the optimizers' own eager path); ``fused=None``:
    compiled where it pays off (:func:`use_fused`): every CUDA tensor, CPU tensors of at least
    :data:`CPU_MIN_NUMEL` elements, and eager below. A compilation that fails (no C++ compiler, say)
    is reported once as a warning and the step runs eagerly from then on.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import types
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import workspace
from .mask import check_step_length, length_factor
from .mask import coeff as _coeff_of

__all__ = [
    "CPU_MIN_NUMEL",
    "Direction",
    "Side",
    "StepSums",
    "add_scaled_",
    "apply_deltas_",
    "available",
    "masked_adam_",
    "masked_sgd_",
    "scale_from_sums",
    "use_fused",
]

#: ``fused=None`` compiles CPU tensors from this many elements on; smaller ones run eagerly, where the
#: call overhead of compiled kernels (dynamo's guards and wrappers, shared by a chunk of GROUP_SIZE
#: tensors) is more than the passes it saves. Measured (one thread, masked SGD with momentum, 16
#: tensors a step, fused / the optimizers' eager path): 1.7x at 2^12 elements, 1.5x at 2^14, 1.0x at
#: 2^15, 0.63x at 2^16, 0.42x at 2^17. The threshold sits a step above the crossover, at 2^17: the
#: first call of each graph also pays the compilation (seconds on CPU), which a few small tensors
#: do not win back in a short run, and on a loaded machine the compiled call's overhead grows.
CPU_MIN_NUMEL = 1 << 17

#: how ``rescale`` runs on one tensor: "scratch" (pass 1 advances the state and writes m⊙u to a scratch
#: buffer with the sums; pass 2 reads it back: 12 B/param more than the unscaled step) or "recompute"
#: (pass 1 only reads, to get the sums; pass 2 is the whole step again: 28 B/param more, no scratch)
RESCALE_PASSES = "scratch"

_FMA: Any = None  # inductor's fused multiply-add (torch.ops.prims.fma), imported on first use


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return _FMA(a, b, c)


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else bool(torch._dynamo.is_compiling())


class Side(NamedTuple):
    """One side's test for a list of parameters; the field names are those of the optimizers' own
    ``_Side``, so one of those passes as it is.

    ``m2s``: the batch's M2 per parameter — or its ``Σg²``, with ``q`` already adjusted to
    ``q/√(1 + q²/(n−1))`` (hard masks only). ``sign``: −1 for the forget side (the update must
    oppose ``μ``), +1 for the retain side."""

    means: Sequence[Tensor]
    m2s: Sequence[Tensor]
    n: int
    q: float
    sign: int


class Direction(NamedTuple):
    """The statistics direction ``retain_weight·μ_r − forget_weight·μ_f`` (a missing side: its term
    is left out), used in place of gradients."""

    forget_means: Sequence[Tensor] | None
    retain_means: Sequence[Tensor] | None
    forget_weight: float = 1.0
    retain_weight: float = 1.0


class StepSums(NamedTuple):
    """Per-tensor sums of one fused step, 0-dim float64 tensors on the parameter's device.

    ``kept``: ``Σ m`` (exact for a hard mask; a soft mask's weights summed); ``u_sq``: ``‖u‖²`` and
    ``d_sq``: ``‖m⊙u‖²`` (only when a length is set: ``rescale`` or ``deltas``; else ``None``)."""

    kept: Tensor
    u_sq: Tensor | None = None
    d_sq: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# the scalars: one small tensor per step, so that no number is a compile-time constant
# --------------------------------------------------------------------------------------------------
_COMMON = ("lr", "wd", "msign", "fw", "rw", "how", "max_scale",
           "sg_f", "sgb_f", "coeff_f", "flip_f", "q_f", "nn_f", "sg_r", "sgb_r", "coeff_r", "flip_r", "q_r", "nn_r")
_SGD = _COMMON + ("momentum", "buf_momentum", "buf_damp1", "nesterov")
_ADAM = _COMMON + ("w1", "beta2", "omb2", "eps", "bc1", "bc2s", "wdd")
_I = {name: i for i, name in enumerate(_SGD)}
_I.update({name: i for i, name in enumerate(_ADAM)})
_F, _R = "_f", "_r"


def _side_scalars(side: Side | None, tag: str) -> dict[str, float]:
    if side is None:
        return {}
    q, n = float(side.q), int(side.n)
    strict = q >= 0
    return {
        "sg" + tag: float(side.sign),
        # the hard test as one comparison: (sgb·u·μ > 0 and μ² > coeff·S) XOR flip (see _mask)
        "sgb" + tag: float(side.sign) * (1.0 if strict else -1.0),
        "coeff" + tag: _coeff_of(q, n) if q != 0.0 else -1.0,  # q = 0: no significance test (μ² > −S)
        "flip" + tag: 0.0 if strict else 1.0,
        "q" + tag: q,
        "nn" + tag: float(n * (n - 1)) if n >= 2 else math.inf,
    }


def _scalars(layout: tuple[str, ...], values: dict[str, float], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor([float(values.get(k, 0.0)) for k in layout], dtype=dtype, device=device)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# the kernels: pure tensor functions, compiled by inductor (or run as they are)
# --------------------------------------------------------------------------------------------------
def _direction(g: Tensor | None, dmf: Tensor | None, dmr: Tensor | None, sc: Tensor, cd: torch.dtype) -> Tensor:
    if g is not None:
        return g.to(cd)
    if dmr is not None and dmf is not None:
        return sc[_I["rw"]] * dmr.to(cd) - sc[_I["fw"]] * dmf.to(cd)
    if dmr is not None:
        return dmr.to(cd) * sc[_I["rw"]]
    assert dmf is not None
    return -(dmf.to(cd) * sc[_I["fw"]])


def _mask(u: Tensor, mf: Tensor | None, sf: Tensor | None, mr: Tensor | None, sr: Tensor | None, sc: Tensor,
          soft: bool) -> Tensor:
    """Hard mask (bool) or soft weights (compute dtype) of ``u``; see the module docstring.

    Each hard test is one expression for either sign of ``q``: with ``sig = μ² > coeff·S``,
    ``q ≥ 0`` keeps where ``sign·u·μ > 0 and sig`` and ``q < 0`` drops where ``sign·u·μ < 0 and sig``,
    i.e. keeps where ``not (−sign·u·μ > 0 and sig)``: ``(sgb·u·μ > 0 and sig) XOR flip`` with
    ``sgb = ±sign`` and ``flip`` read from the scalars. ``q = 0`` has ``coeff = −1`` (``sig`` always
    holds). ``|u| > 0`` is required: 0 and NaN are never kept."""
    cd = u.dtype
    nz = torch.abs(u) > 0
    if soft:
        w = nz.to(cd)
        for m, s, tag in ((mf, sf, _F), (mr, sr, _R)):
            if m is None or s is None:
                continue
            s_mu = torch.sign(u) * m.to(cd) * sc[_I["sg" + tag]]
            se = torch.sqrt(torch.clamp_min(s.to(cd), 0) / sc[_I["nn" + tag]])
            z = torch.where(s_mu == 0, torch.zeros_like(s_mu), s_mu / se)
            w = w * torch.special.ndtr(z - sc[_I["q" + tag]])
        return w
    keep = nz
    for m, s, tag in ((mf, sf, _F), (mr, sr, _R)):
        if m is None or s is None:
            continue
        m = m.to(cd)
        passed = (u * m * sc[_I["sgb" + tag]] > 0) & (m * m > sc[_I["coeff" + tag]] * s.to(cd))
        keep = keep & (passed != (sc[_I["flip" + tag]] > 0.5))
    return keep


def _scale(sums: Tensor, numel: Any, sc: Tensor) -> Tensor:
    """The step-length factor of :func:`masked_optim.mask.step_scale` from ``[kept, ‖u‖², ‖m⊙u‖²]``."""
    cap = sc[_I["max_scale"]].to(torch.float64)
    ratio = torch.nan_to_num(sums[1] / sums[2], nan=1.0, posinf=1.0)
    by_norm = torch.minimum(torch.clamp_min(torch.sqrt(ratio), 1.0), cap)
    total = sums[0] * 0 + numel  # a float64 tensor of the element count
    by_count = total / torch.maximum(sums[0], total / cap)
    return torch.where(sc[_I["how"]] > 0.5, by_norm, by_count)


def _finish(p: Tensor, u: Tensor, mk: Tensor, sc: Tensor, soft: bool, mode: str, delta: Tensor | None,
            mask_out: Tensor | None, sums_in: Tensor | None) -> Tensor:
    """The masked update of ``p`` (or its deferred form) and the sums the mode returns."""
    cd = u.dtype
    moved = (mk != 0) if soft else mk
    d = torch.where(moved, u * mk if soft else u, torch.zeros_like(u))  # m⊙u, 0 where masked out
    # an integer count is exact and nearly free (int32 below 2**31 elements: a guard, so a larger
    # tensor compiles an int64 graph); a float64 accumulation costs as much as the rest of the pass on
    # CPU (inductor does not vectorise the conversion well); float sums use cascade summation
    count = torch.int32 if u.numel() < 2**31 else torch.int64
    kept = (mk.sum() if soft else mk.sum(dtype=count)).to(torch.float64)
    if mask_out is not None:
        mask_out.copy_(mk.to(mask_out.dtype))
    if mode in ("defer", "sums"):
        if delta is not None:
            delta.copy_(d.to(delta.dtype))
        return torch.stack([kept, (u * u).sum().to(torch.float64), (d * d).sum().to(torch.float64)])
    step = sc[_I["lr"]] * u
    if mode == "apply":
        step = step * mk if soft else step
    else:  # "apply_rescaled"
        s = _scale(sums_in, u.numel(), sc).to(cd)  # type: ignore[arg-type]
        step = step * (mk * s) if soft else step * s
    p32 = p.to(cd)
    p.copy_(torch.where(moved, p32 - step, p32).to(p.dtype))
    return kept


def _sgd_kernel(p: Tensor, g: Tensor | None, buf: Tensor | None, mf: Tensor | None, sf: Tensor | None,
                mr: Tensor | None, sr: Tensor | None, dmf: Tensor | None, dmr: Tensor | None, sc: Tensor,
                delta: Tensor | None, mask_out: Tensor | None, sums_in: Tensor | None, soft: bool,
                mode: str) -> Tensor:
    """One tensor's masked SGD step (``mode``: "apply", "apply_rescaled" with the sums of a "sums"
    pass, "defer": state and ``delta = m⊙u`` but not ``p``, "sums": nothing written)."""
    cd = sc.dtype
    p32 = p.to(cd)
    gg = _direction(g, dmf, dmr, sc, cd) * sc[_I["msign"]] + sc[_I["wd"]] * p32
    if buf is not None:
        # the first step (a zeroed buffer) has buf_momentum = 0 and buf_damp1 = 1: buf = g
        b = buf.to(cd) * sc[_I["buf_momentum"]] + sc[_I["buf_damp1"]] * gg
        u = torch.where(sc[_I["nesterov"]] > 0.5, gg + sc[_I["momentum"]] * b, b)
        if mode != "sums":
            buf.copy_(b.to(buf.dtype))
    else:
        u = gg
    return _finish(p, u, _mask(u, mf, sf, mr, sr, sc, soft), sc, soft, mode, delta, mask_out, sums_in)


def _adam_kernel(p: Tensor, g: Tensor | None, m1: Tensor, m2: Tensor, vmax: Tensor | None, mf: Tensor | None,
                 sf: Tensor | None, mr: Tensor | None, sr: Tensor | None, dmf: Tensor | None, dmr: Tensor | None,
                 sc: Tensor, delta: Tensor | None, mask_out: Tensor | None, sums_in: Tensor | None, soft: bool,
                 mode: str) -> Tensor:
    """One tensor's masked Adam/AdamW step (the modes of :func:`_sgd_kernel`)."""
    cd = sc.dtype
    p32 = p.to(cd)
    gg = _direction(g, dmf, dmr, sc, cd) * sc[_I["msign"]] + sc[_I["wd"]] * p32
    w1 = sc[_I["w1"]]
    a = m1.to(cd)
    # torch.lerp's two formulas (exact at weight 0 and 1)
    e = torch.where(w1 < 0.5, a + w1 * (gg - a), gg - (gg - a) * (1 - w1))
    v = m2.to(cd) * sc[_I["beta2"]] + sc[_I["omb2"]] * gg * gg
    vv = v
    if vmax is not None:
        vv = torch.maximum(vmax.to(cd), v)
        if mode != "sums":
            vmax.copy_(vv.to(vmax.dtype))
    if mode != "sums":
        m1.copy_(e.to(m1.dtype))
        m2.copy_(v.to(m2.dtype))
    denom = torch.sqrt(vv) / sc[_I["bc2s"]] + sc[_I["eps"]]
    u = e / denom / sc[_I["bc1"]] + sc[_I["wdd"]] * p32
    return _finish(p, u, _mask(u, mf, sf, mr, sr, sc, soft), sc, soft, mode, delta, mask_out, sums_in)


def _apply_kernel(p: Tensor, d: Tensor, sums: Tensor, sc: Tensor) -> Tensor:
    """``p ← p − lr·s·d`` with ``s`` from the sums of a "defer" pass (the second rescale pass)."""
    cd = sc.dtype
    s = _scale(sums, d.numel(), sc).to(cd)
    p.copy_((p.to(cd) - sc[_I["lr"]] * d.to(cd) * s).to(p.dtype))
    return s


def _move_kernel(p: Tensor, d: Tensor, s: Tensor, a: Tensor | float) -> None:
    """``θ ← θ + a·(s·d)`` with the rounding of ``d.mul_(s)`` followed by ``θ.add_(d, alpha=a)``: the
    product rounded once, then a fused multiply-add (what ATen's add with an alpha computes), so the
    compiled pass moves ``θ`` exactly as those two eager kernels do, without writing ``s·d``."""
    if _compiling():
        p.copy_(_fma(d * s, a, p))
    else:  # the eager fallback: the two kernels themselves (``a``: a 0-dim tensor or a float)
        p.add_(d * s, alpha=float(a))


_KERNELS = {"sgd": _sgd_kernel, "adam": _adam_kernel, "apply": _apply_kernel, "move": _move_kernel}


# --------------------------------------------------------------------------------------------------
# compilation, availability, the fused= policy
# --------------------------------------------------------------------------------------------------
_BROKEN: dict[str, str] = {}  # device type -> why compilation failed (then: eager)
_COMPILED: dict[tuple, Any] = {}


def _has_cxx() -> bool:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx.split()[0]):
        return True
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@functools.lru_cache(maxsize=None)
def _static_available(device_type: str) -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile is missing (torch < 2.0)"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python/platform"
    except Exception as err:  # noqa: BLE001 - any import failure means no compiler
        return f"torch._dynamo unavailable: {err}"
    if device_type == "cpu":
        if not _has_cxx():
            return "no C++ compiler on PATH (inductor's CPU backend needs one)"
    elif device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch.utils._triton is missing"
        if not has_triton():
            return "Triton is not installed or does not support this GPU"
    else:
        return f"no fused kernels for device type {device_type!r}"
    return None


def available(device: str | torch.device = "cpu") -> bool:
    """Whether the compiled kernels can run on ``device`` (type): ``torch.compile`` works here, with a
    C++ compiler on CPU and Triton on CUDA, and no earlier compilation failed."""
    dt = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _static_available(dt) is None and dt not in _BROKEN


def why_unavailable(device: str | torch.device = "cpu") -> str | None:
    """The reason :func:`available` is False (``None`` when it is True)."""
    dt = torch.device(device).type
    return _static_available(dt) or _BROKEN.get(dt)


def use_fused(fused: bool | None, tensor: Tensor) -> bool:
    """The ``fused=`` policy for one parameter tensor: ``True`` (compiled; an error when unavailable),
    ``False`` (not compiled), ``None`` (compiled where it pays off: CUDA, or CPU tensors of at least
    :data:`CPU_MIN_NUMEL` elements, when available)."""
    if fused is None:
        device = tensor.device
        if device.type != "cuda" and tensor.numel() < CPU_MIN_NUMEL:
            return False
        return available(device)
    if fused and not available(tensor.device):
        raise RuntimeError(f"fused=True, but the fused kernels cannot run on {tensor.device}: "
                           f"{why_unavailable(tensor.device)}")
    return bool(fused)


def _grouped(name: str, cols: tuple, kwargs: dict[str, Any]) -> list[Tensor]:
    """One kernel over a chunk of tensors: ``cols`` holds, per argument, the list of the chunk's
    tensors (or ``None``). Compiled as one graph, so the tensors' kernels run back to back in one
    call: the per-call overhead (dynamo's guards and wrappers, Python, waking OpenMP's threads) is paid
    once per chunk, not per tensor."""
    kernel = _KERNELS[name]
    return [kernel(*(None if c is None else c[i] for c in cols), **kwargs) for i in range(len(cols[0]))]


def _compiled(key: tuple) -> Any:
    """The compiled :func:`_grouped` for one structure ``key`` (kernel, chunk length, the None-pattern,
    dtypes and devices of the arguments, the flags). Each gets a code object of its own, so that
    dynamo's per-function cache holds one graph each: no cache limit to raise, one guard set to check."""
    fn = _COMPILED.get(key)
    if fn is None:
        code = _grouped.__code__.replace(co_name=f"_grouped_{key[0]}_{len(_COMPILED)}")
        clone = types.FunctionType(code, _grouped.__globals__, code.co_name)
        fn = _COMPILED[key] = torch.compile(clone, dynamic=True, fullgraph=True)
    return fn


def _key(name: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
    # the first argument's device (the parameter's: the others must share it, or the kernel fails as
    # the eager one would) and every dtype; a tensor's .device builds a new object on each read
    return (name, args[0].device, *(None if a is None else a.dtype for a in args), *kwargs.values())


def _no_duck_shapes() -> Any:
    """Every size its own symbol while a chunk compiles: tensors of equal sizes would otherwise share
    one, and a chunk with another pattern of equal sizes would recompile."""
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # pragma: no cover - older torch: duck shapes it is
        import contextlib

        return contextlib.nullcontext()


_SEEN: set[tuple] = set()  # chunk structures compiled (and run) once


def _call_chunk(name: str, compiled: bool, chunk: list[tuple], kwargs: dict[str, Any],
                broken: str | None = None) -> list[Tensor]:
    """``name``'s kernel on each argument tuple of ``chunk`` (all of one structure): one compiled call,
    or eagerly, tensor by tensor. A compilation failure is recorded under ``broken`` (default: the
    device type, which turns every fused kernel off there)."""
    if compiled:
        dt = chunk[0][0].device.type
        broken = broken or dt
        if dt not in _BROKEN and broken not in _BROKEN:
            cols = tuple(None if chunk[0][j] is None else [args[j] for args in chunk] for j in range(len(chunk[0])))
            key = (name, len(chunk), *_key(name, chunk[0], kwargs)[1:])
            try:
                if key in _SEEN:
                    return _compiled(key)(name, cols, kwargs)
                with _no_duck_shapes():
                    out = _compiled(key)(name, cols, kwargs)
                _SEEN.add(key)
                return out
            except Exception as err:  # noqa: BLE001 - a backend failure: run eagerly from now on
                if not _is_compile_error(err):
                    raise
                _BROKEN[broken] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"masked_optim.fused: compiling the fused kernel {name!r} failed on {dt} "
                              f"({_BROKEN[broken]}); running it eagerly from now on", RuntimeWarning, stacklevel=3)
    return [_KERNELS[name](*args, **kwargs) for args in chunk]


def _is_compile_error(err: Exception) -> bool:
    """A failure of dynamo or inductor (no C++ compiler, a tracing limitation of this torch version):
    the eager run that follows reports any error of the inputs themselves."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover
        return True
    return isinstance(err, TorchDynamoException) or type(err).__name__ in ("CppCompileError", "InvalidCxxCompiler")


# --------------------------------------------------------------------------------------------------
# the public, list-level functions
# --------------------------------------------------------------------------------------------------
def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.view(-1)  # under no_grad: the view does not require grad


def _contiguous(*ts: Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


#: tensors per compiled call (a chunk): the first call of each chunk length compiles a graph with
#: that many kernels (~0.5-1 s each, cold, on CPU). Measured at 10^7 parameters in 16 tensors, 2
#: threads, side by side in one process (masked SGD / torch's fused step): 2.88x with 1 tensor a
#: call, 2.45x with 4, 2.41x with 8, 2.38x with 16 — past 8 the longer compilation buys little
GROUP_SIZE = 8


class _Job(NamedTuple):
    p: Tensor
    tensors: tuple  # the kernel's arguments between p and the scalars
    sc: Tensor
    delta: Tensor | None
    mask_out: Tensor | None
    compiled: bool


def _job(p: Tensor, tensors: tuple, sc: Tensor, delta: Tensor | None, mask_out: Tensor | None,
         compiled: bool) -> _Job:
    if _contiguous(p, *tensors, delta, mask_out):  # flat views: any shapes of the same size
        return _Job(_flat(p), tuple(_flat(t) for t in tensors), sc, _flat(delta), _flat(mask_out), compiled)
    return _Job(p, tensors, sc, delta, mask_out, False)  # a non-contiguous layout runs eagerly, as it is


def _chunks(jobs: Sequence[Any], key: Any) -> list[list[int]]:
    """Indices of ``jobs`` in runs of one structure (``key(job)``), at most GROUP_SIZE long."""
    out: list[list[int]] = []
    last = None
    for i, job in enumerate(jobs):
        k = key(job)
        if out and k == last and len(out[-1]) < GROUP_SIZE:
            out[-1].append(i)
        else:
            out.append([i])
        last = k
    return out


def _run_all(name: str, jobs: list[_Job], soft: bool, rescale: str | None) -> list[StepSums]:
    """Every tensor's pass (or two passes), compiled ones in chunks."""
    out: list[StepSums | None] = [None] * len(jobs)
    deferred = jobs[0].delta is not None if jobs else False

    def run(mode: str, idx: list[int], extra: Any = None, sums: list | None = None) -> list[Tensor]:
        chunk = []
        for j, i in enumerate(idx):
            job = jobs[i]
            d = job.delta if mode == "defer" and extra is None else (None if extra is None else extra[j])
            chunk.append((job.p, *job.tensors, job.sc, d, job.mask_out if mode != "sums" else None,
                          None if sums is None else sums[j]))
        return _call_chunk(name, jobs[idx[0]].compiled, chunk, {"soft": soft, "mode": mode})

    def structure(job: _Job) -> tuple:
        return (job.compiled, *_key(name, (job.p, *job.tensors, job.sc, job.delta, job.mask_out), {}))

    for idx in _chunks(jobs, structure):
        compiled = jobs[idx[0]].compiled
        if deferred:  # the caller sets the length and applies
            res = run("defer", idx)
            for i, s in zip(idx, res):
                out[i] = StepSums(s[0], s[1], s[2])
        elif rescale is None:
            for i, k in zip(idx, run("apply", idx)):
                out[i] = StepSums(k)
        elif RESCALE_PASSES == "recompute" or not compiled:
            res = run("sums", idx)
            run("apply_rescaled", idx, sums=res)
            for i, s in zip(idx, res):
                out[i] = StepSums(s[0], s[1], s[2])
        else:  # m⊙u to a scratch buffer with the sums, then the scaled apply
            job0 = jobs[idx[0]]
            sizes = [jobs[i].p.numel() for i in idx]
            # the optimizer's step workspace lends it (and takes it back for the next chunk)
            flat = workspace.empty((sum(sizes),), dtype=job0.sc.dtype, device=job0.p.device)
            ds = list(flat.split(sizes))
            res = run("defer", idx, extra=ds)
            _call_chunk("apply", compiled, [(jobs[i].p, d, s, jobs[i].sc) for i, d, s in zip(idx, ds, res)], {})
            workspace.give_back(flat)
            for i, s in zip(idx, res):
                out[i] = StepSums(s[0], s[1], s[2])
    return out  # type: ignore[return-value]


def _check_lists(name: str, params: Sequence[Tensor], **lists: Sequence[Any] | None) -> None:
    for key, lst in lists.items():
        if lst is not None and len(lst) != len(params):
            raise ValueError(f"{name}: {key} has {len(lst)} entries for {len(params)} parameters")


def _common_values(forget: Side | None, retain: Side | None, direction: Direction | None, *, lr: float,
                   maximize: bool, rescale: str | None, max_scale: float) -> dict[str, float]:
    if rescale not in (None, "norm", "count"):
        raise ValueError(f"rescale must be None, 'count' or 'norm', got {rescale!r}")
    if not 1.0 <= max_scale < math.inf:
        raise ValueError(f"max_scale must be a finite number >= 1, got {max_scale!r}")
    values = {"lr": float(lr), "msign": -1.0 if maximize else 1.0,
              "how": 1.0 if rescale == "norm" else 0.0, "max_scale": float(max_scale)}
    if direction is not None:
        values.update(fw=float(direction.forget_weight), rw=float(direction.retain_weight))
    values.update(_side_scalars(forget, _F))
    values.update(_side_scalars(retain, _R))
    return values


def _stats_inputs(i: int, forget: Side | None, retain: Side | None, direction: Direction | None,
                  grads: Sequence[Tensor] | None) -> tuple:
    if grads is None:
        if direction is None or (direction.forget_means is None and direction.retain_means is None):
            raise ValueError("grads=None needs a direction with forget and/or retain means")
    f = (forget.means[i], forget.m2s[i]) if forget is not None else (None, None)
    r = (retain.means[i], retain.m2s[i]) if retain is not None else (None, None)
    dmf = dmr = None
    if grads is None:
        assert direction is not None
        dmf = None if direction.forget_means is None else direction.forget_means[i]
        dmr = None if direction.retain_means is None else direction.retain_means[i]
    return (*f, *r, dmf, dmr)


@torch.no_grad()
def masked_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None,
    momentum_buffers: list[Tensor | None],
    forget: Side | None,
    retain: Side | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    soft: bool = False,
    rescale: str | None = None,
    max_scale: float = 100.0,
    direction: Direction | None = None,
    deltas: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    fused: bool | None = None,
) -> list[StepSums]:
    """Masked SGD, one fused pass per tensor: ``buf ← momentum·buf + (1 − dampening)·g`` (``g`` with
    ``maximize`` and the coupled weight decay), ``u`` = buf (or Nesterov's ``g + momentum·buf``, or
    ``g`` without momentum), ``θ ← θ − lr·s·m⊙u``, exactly as ``ProbablyAlignedSGD``'s step.

    Args:
        params: the parameters (updated in place).
        grads: the direction per parameter; ``None``: ``direction``'s statistics direction.
        momentum_buffers: per parameter, the buffer or ``None`` (the first step: created from ``g`` and
            written back into the list, as torch.optim's functional SGD does); ignored when
            ``momentum == 0``.
        forget, retain: each side's test (``None``: not tested). Neither: only ``u ≠ 0`` is required.
        soft: the focus weights ``Π Φ(z − q)`` instead of 0/1 (the sides' ``m2s`` must be M2).
        rescale, max_scale: the step length per tensor (``"norm"``, ``"count"`` or ``None``), as
            :func:`masked_optim.mask.step_scale`; ignored with ``deltas``.
        direction: the statistics direction's means and weights (``grads=None``).
        deltas: deferred step: write ``m⊙u`` (unscaled) here, advance the state, leave ``params`` as
            they are and return the sums :func:`scale_from_sums` needs; apply with :func:`apply_deltas_`.
        masks: optional outputs for each tensor's mask (0/1, or the soft weights).
        fused: ``True``/``False``/``None`` (auto), see :func:`use_fused`.

    Returns: a :class:`StepSums` per parameter (``kept`` always; the norms with ``rescale``/``deltas``).
    """
    _check_lists("masked_sgd_", params, grads=grads, deltas=deltas, masks=masks)
    if momentum != 0.0:
        _check_lists("masked_sgd_", params, momentum_buffers=momentum_buffers)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    values = _common_values(forget, retain, direction, lr=lr, maximize=maximize, rescale=rescale,
                            max_scale=max_scale)
    values.update(wd=float(weight_decay), momentum=float(momentum), buf_momentum=float(momentum),
                  buf_damp1=1.0 - float(dampening), nesterov=1.0 if nesterov else 0.0)
    compiled = [use_fused(fused, p) for p in params]  # fused=True and unavailable: an error before any change
    jobs: list[_Job] = []
    scalars: dict[tuple, Tensor] = {}
    for i, p in enumerate(params):
        g = grads[i] if grads is not None else None
        stats = _stats_inputs(i, forget, retain, direction, grads)
        buf = None
        first = False
        if momentum != 0.0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                first = True
        cd = _compute_dtype(p, *stats)
        key = (p.device, cd, first)
        if key not in scalars:
            bufv = {"buf_momentum": 0.0, "buf_damp1": 1.0} if first else {}
            scalars[key] = _scalars(_SGD, {**values, **bufv}, p.device, cd)
        jobs.append(_job(p, (g, buf, *stats), scalars[key], deltas[i] if deltas is not None else None,
                         masks[i] if masks is not None else None, compiled[i]))
    return _run_all("sgd", jobs, soft, rescale)


@torch.no_grad()
def masked_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None,
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    state_steps: Sequence[Tensor],
    forget: Side | None,
    retain: Side | None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    soft: bool = False,
    rescale: str | None = None,
    max_scale: float = 100.0,
    direction: Direction | None = None,
    deltas: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    fused: bool | None = None,
) -> list[StepSums]:
    """Masked Adam / AdamW (``decoupled_weight_decay``), one fused pass per tensor, exactly as
    ``ProbablyAlignedAdam``'s step: each ``state_steps[i]`` (a 0-dim tensor, torch's ``state["step"]``)
    is incremented, the moments advance as torch.optim.Adam's, ``u = m̂/(√v̂ + ε)`` (AMSGrad: the
    running maximum of ``v``; AdamW: ``+ λ·θ``) and ``θ ← θ − lr·s·m⊙u``. Other arguments as
    :func:`masked_sgd_`; ``max_exp_avg_sqs`` is needed with ``amsgrad`` only."""
    _check_lists("masked_adam_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 state_steps=state_steps, deltas=deltas, masks=masks)
    if amsgrad:
        _check_lists("masked_adam_", params, max_exp_avg_sqs=max_exp_avg_sqs)
        if max_exp_avg_sqs is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    values = _common_values(forget, retain, direction, lr=lr, maximize=maximize, rescale=rescale,
                            max_scale=max_scale)
    values.update(w1=1.0 - float(beta1), beta2=float(beta2), omb2=1.0 - float(beta2), eps=float(eps))
    values["wdd" if decoupled_weight_decay else "wd"] = float(weight_decay)
    compiled = [use_fused(fused, p) for p in params]
    jobs: list[_Job] = []
    scalars: dict[tuple, Tensor] = {}
    for i, p in enumerate(params):
        g = grads[i] if grads is not None else None
        stats = _stats_inputs(i, forget, retain, direction, grads)
        step_t = state_steps[i]
        step_t += 1
        step = float(step_t)
        cd = _compute_dtype(p, *stats)
        key = (p.device, cd, step)
        if key not in scalars:
            scalars[key] = _scalars(_ADAM, {**values, "bc1": 1 - beta1 ** step, "bc2s": (1 - beta2 ** step) ** 0.5},
                                    p.device, cd)
        vmax = max_exp_avg_sqs[i] if amsgrad else None  # type: ignore[index]
        jobs.append(_job(p, (g, exp_avgs[i], exp_avg_sqs[i], vmax, *stats), scalars[key],
                         deltas[i] if deltas is not None else None, masks[i] if masks is not None else None,
                         compiled[i]))
    return _run_all("adam", jobs, soft, rescale)


def _movable(p: Tensor, d: Tensor, s: Tensor) -> bool:
    """Whether ``θ ← θ + a·(s·d)`` can take the compiled move: float32/float64 tensors of one dtype
    and layout (flat views), where the fused kernels run and inductor has a fused multiply-add."""
    global _FMA
    if not (p.dtype == d.dtype == s.dtype and p.dtype in (torch.float32, torch.float64)
            and p.is_contiguous() and d.is_contiguous() and s.dim() == 0 and s.device == p.device == d.device):
        return False
    key = p.device.type + ":move"
    if key in _BROKEN or not available(p.device):
        return False
    if _FMA is None:
        try:
            from torch._inductor import inductor_prims
            _FMA = inductor_prims.fma
        except (ImportError, AttributeError):  # pragma: no cover - a torch without it: eager moves
            _BROKEN[key] = "torch._inductor.inductor_prims.fma is missing"
            return False
    return True


@torch.no_grad()
def add_scaled_(params: Sequence[Tensor], deltas: Sequence[Tensor], scales: Sequence[Tensor],
                alphas: Sequence[float]) -> None:
    """``θ ← θ + a·(s·d)`` per tensor (``s``: a 0-dim tensor of ``d``'s dtype), with the rounding of
    ``d.mul_(s)`` then ``θ.add_(d, alpha=a)`` and ``d`` left as it is: the retain guard's moves of
    deferred fused steps, which it applies and backs off several times. Compiled in chunks where
    :func:`_movable` (12 B/param against the eager 20 B and a kernel less); eager otherwise."""
    _check_lists("add_scaled_", params, deltas=deltas, scales=scales, alphas=alphas)
    moves: list[tuple] = []
    for p, d, s, a in zip(params, deltas, scales, alphas):
        if not _movable(p, d, s):
            _move_kernel(p, d, s.to(d.dtype), a)  # not compiling here: its eager branch
            continue
        moves.append((p.view(-1), d.view(-1), s, a))
    for idx in _chunks(moves, lambda mv: (mv[0].device, mv[0].dtype)):
        p0 = moves[idx[0]][0]
        # each a a 0-dim view of one tensor (one host-to-device copy), never one object for two moves:
        # dynamo guards on repeated inputs, so another pattern of equal learning rates would recompile
        coeffs = torch.tensor([moves[i][3] for i in idx], dtype=p0.dtype).to(p0.device).unbind()
        _call_chunk("move", True, [(*moves[i][:3], c) for i, c in zip(idx, coeffs)], {},
                    broken=p0.device.type + ":move")


def scale_from_sums(how: str, sums: Sequence[StepSums], numels: Sequence[int], max_scale: float) -> Tensor:
    """The step-length factor of the pooled tensors (a group's, or every group's), from the sums of
    deferred passes: :func:`masked_optim.mask.step_scale` without the masks. 0-dim, float64."""
    check_step_length(how, max_scale, len(sums))
    dev = sums[0].kept.device

    def total(key: int) -> Tensor:
        vals = [s[key] for s in sums]
        if any(v is None for v in vals):
            raise ValueError("the norms are missing: pass deltas= (or rescale) to get them")
        return torch.stack([v.to(dev) for v in vals]).sum()

    if how == "count":
        return length_factor(how, max_scale, float(sum(numels)), kept=total(0))
    return length_factor(how, max_scale, 0.0, full_sq=total(1), part_sq=total(2))


def apply_deltas_(params: Sequence[Tensor], deltas: Sequence[Tensor], lr: float,
                  scales: Sequence[Tensor | float | None] | None = None) -> None:
    """``θ ← θ − lr·s·d`` for deferred steps (``s``: a 0-dim tensor, a number or ``None`` for 1)."""
    for i, (p, d) in enumerate(zip(params, deltas)):
        s = None if scales is None else scales[i]
        if s is None:
            p.add_(d, alpha=-lr)
        elif isinstance(s, Tensor):
            p.addcmul_(d, s.to(device=p.device, dtype=d.dtype), value=-lr)
        else:
            p.add_(d, alpha=-lr * float(s))
