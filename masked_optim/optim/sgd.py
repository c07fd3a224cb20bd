"""ProbablyAlignedSGD: torch.optim.SGD whose final update is masked to the probably-aligned coordinates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..stats import StatsEngine
from .. import fused as fused_kernels
from .. import workspace
from .base import ProbablyAlignedOptimizer, use_foreach
from .options import DEFAULT, MaskOptions

__all__ = ["ProbablyAlignedSGD", "sgd_updates"]


class ProbablyAlignedSGD(ProbablyAlignedOptimizer):
    r"""SGD (momentum, dampening, Nesterov, coupled weight decay) with the feasibility mask.

    The momentum buffer evolves exactly as in :class:`torch.optim.SGD`; only the parameter change
    ``lr · u`` (``u`` = buffer, Nesterov look-ahead and weight decay included) is masked, so frozen
    coordinates never move.  With ``confidence=None`` (and no per-side confidence) the trajectory is
    that of :class:`torch.optim.SGD`.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as torch.optim.SGD.
        model: the module whose parameters are optimised (per-sample statistics run through it).
        loss_fn: the per-sample loss: ``None`` (chosen from the batch: classification, or the
            causal-LM / token loss for ``[n, L]`` labels, see :mod:`masked_optim.losses`), a built-in
            name, or ``loss_fn(outputs, targets)`` applied one sample at a time.
        confidence: confidence ``c`` of both tests; ``None`` disables the mask. Not given: 0.95 for
            the forget test and 0.05 for the retain test (the defaults study's choice, see
            ``benchmarks/results/defaults_study/``): a coordinate moves when its update probably raises
            the forget loss and does not probably raise the retain loss.
        forget_confidence, retain_confidence: override ``confidence`` for one test.
        quantile: ``"normal"`` (default) or ``"t"`` (Student-t, ``n − 1`` degrees of freedom).
        soft: weight coordinates by ``Φ(z_r − q_r)·Φ(z_f − q_f)`` instead of 0/1.
        chunk_size: samples per chunk of the statistics engine (``None``: whole batch for the hook
            engine, memory-bounded for the vmap engine).
        engine: ``"auto"`` (default: :class:`~masked_optim.HookEngine` for supported layers, the vmap
            reference for the rest), ``"hooks"`` (hooks only; error on unsupported layers), ``"vmap"``
            (the reference for everything) or a custom :class:`~masked_optim.StatsEngine`.
        forget_weight, retain_weight: weights of the default direction
            ``retain_weight·μ_r − forget_weight·μ_f`` used when no parameter has a gradient.
        certify: confidence of the whole-update test (:mod:`masked_optim.certify`): the masked step
            must, by a one-sided test on per-sample directional derivatives, not raise the retain
            loss and raise the forget loss. ``None`` (default) disables it.
        certify_policy: when the test fails, ``"tighten"`` raises every threshold (doubling, then
            bisection, at most ``certify_tries`` evaluations; an empty step if none passes) or
            ``"skip"`` undoes the step, state included. ``diagnostics.certificate`` says which.
        rescale: the masked step's length, independent of how many coordinates the mask keeps:
            ``"count"`` multiplies ``m⊙u`` by ``1/mean(m)``, ``"norm"`` by ``‖u‖/‖m⊙u‖``, both capped at
            ``max_scale``; ``None`` leaves ``lr·m⊙u`` as it is (see :func:`~masked_optim.step_scale`).
            Default ``"norm"``.
            The sign of the step's first-order effect on either loss does not depend on it.
        rescale_scope: ``"tensor"`` (each parameter's length), ``"group"`` (one factor per param
            group) or ``"global"`` (one factor for all groups that ask for it).
        max_scale: the largest factor (``"count"``: the kept fraction is floored at ``1/max_scale``).
        fused: the masked step's elementwise part as one compiled pass per tensor
            (:mod:`masked_optim.fused`): ``None`` where it pays off (CUDA, CPU tensors of at least
            ``fused.CPU_MIN_NUMEL`` elements), ``True`` always, ``False`` never. Same masks as the
            eager path; parameters and state to float tolerance.
        reuse_buffers: lend the step's large temporaries (the layer statistics, the guard's deferred
            moves) from a workspace kept between steps (:mod:`masked_optim.workspace`): ``None``
            (default) when the parameters are on CPU, where a fresh large tensor costs page faults,
            ``True`` always, ``False`` never. Between steps the workspace (``optimizer.workspace``:
            its ``nbytes``; ``clear()`` frees it) holds what the last step used: the large layers'
            statistics (a mean and a ``Σg²`` per side) and, behind the guard, the fused moves.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        confidence: float | None = DEFAULT,
        forget_confidence: float | None = None,
        retain_confidence: float | None = DEFAULT,
        quantile: str = "normal",
        soft: bool = False,
        chunk_size: int | None = None,
        engine: StatsEngine | str | None = None,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        certify: float | None = None,
        certify_policy: str = "tighten",
        certify_tries: int = 8,
        retain_guard: float | None = 0.05,
        rescale: str | None = "norm",
        rescale_scope: str = "tensor",
        max_scale: float = 100.0,
        reuse_buffers: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) or lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (a non-negative float is required)")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults, MaskOptions.collect(locals()))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    _fuses = True

    def _fused_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], forget: Any, retain: Any,
                      **kwargs: Any) -> list[Any]:
        bufs = self._init_group(group, params)
        sums = fused_kernels.masked_sgd_(
            params, grads, bufs, forget, retain, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], fused=group.get("fused"), **kwargs,
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
        return sums

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor | None]:
        if group["momentum"] == 0:
            return []
        return [self.state[p].get("momentum_buffer") for p in params]

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], apply: bool, grads_owned: bool = False,
    ) -> list[Tensor] | None:
        bufs = self._init_group(group, params)
        us = sgd_updates(
            params,
            grads,
            bufs,
            apply=apply,
            grads_owned=grads_owned,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            foreach=use_foreach(group, params),
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
        return us


def sgd_updates(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool,
    apply: bool = True,
    grads_owned: bool = False,
) -> list[Tensor] | None:
    """Functional SGD: advances the momentum buffers exactly as :class:`torch.optim.SGD`. With
    ``apply`` it also moves the parameters, ``θ ← θ − lr·u`` (torch.optim.SGD's step, bit for bit);
    without, it returns each parameter's final update ``u`` (momentum, Nesterov and weight decay
    included) and leaves ``θ`` to the caller's mask — ``u`` may be a momentum buffer: read it only.

    ``grads_owned``: the gradients are scratch tensors of the caller (the statistics direction), which
    may be modified in place and become momentum buffers — on CPU each large allocation avoided is a
    pass over memory saved."""
    if foreach:
        return _multi_tensor_sgd(
            params, grads, momentum_buffer_list, lr=lr, weight_decay=weight_decay, momentum=momentum,
            dampening=dampening, nesterov=nesterov, maximize=maximize, apply=apply,
        )
    return _single_tensor_sgd(
        params, grads, momentum_buffer_list, lr=lr, weight_decay=weight_decay, momentum=momentum,
        dampening=dampening, nesterov=nesterov, maximize=maximize, apply=apply, grads_owned=grads_owned,
    )


def _single_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    apply: bool,
    grads_owned: bool = False,
) -> list[Tensor] | None:
    out = []
    for i, param in enumerate(params):
        grad, fresh = grads[i], grads_owned
        if maximize:
            grad, fresh = (grad.neg_() if fresh else -grad), True
        if weight_decay != 0:
            grad, fresh = (grad.add_(param, alpha=weight_decay) if fresh else grad.add(param, alpha=weight_decay)), True
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                # a scratch direction becomes the buffer, unless it is a workspace buffer (reused next step)
                buf = grad.detach() if fresh and not workspace.is_lent(grad) else grad.detach().clone()
                momentum_buffer_list[i] = buf
            else:
                # torch.optim.SGD's two roundings (m·buf, then + (1 − d)·g): a fused m·buf + g rounds
                # once and drifts from it in the last bit
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        if apply:
            param.add_(grad, alpha=-lr)
        else:
            out.append(grad)
    return None if apply else out


def _multi_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    apply: bool,
) -> list[Tensor] | None:
    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    if not params:
        return None if apply else out
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffer_list], with_indices=True  # type: ignore[list-item]
    )
    for (dev_params, dev_grads, dev_bufs), indices in grouped.values():
        if maximize:
            dev_grads = torch._foreach_neg(dev_grads)
        if weight_decay != 0:
            if maximize:
                torch._foreach_add_(dev_grads, dev_params, alpha=weight_decay)
            else:
                dev_grads = torch._foreach_add(dev_grads, dev_params, alpha=weight_decay)
        if momentum != 0:
            bufs = []
            if all(b is not None for b in dev_bufs):
                bufs = list(dev_bufs)
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, dev_grads, alpha=1 - dampening)
            else:
                for j, b in enumerate(dev_bufs):
                    if b is None:
                        b = dev_bufs[j] = momentum_buffer_list[indices[j]] = dev_grads[j].detach().clone()
                    else:
                        b.mul_(momentum).add_(dev_grads[j], alpha=1 - dampening)
                    bufs.append(b)
            # out of place: dev_grads may still be the caller's p.grad
            dev_grads = torch._foreach_add(dev_grads, bufs, alpha=momentum) if nesterov else bufs
        if apply:
            torch._foreach_add_(dev_params, dev_grads, alpha=-lr)
        else:
            for j, i in enumerate(indices):
                out[i] = dev_grads[j]
    return None if apply else out
