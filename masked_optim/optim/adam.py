"""ProbablyAlignedAdam / ProbablyAlignedAdamW: Adam whose final update is masked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..stats import StatsEngine
from .. import fused as fused_kernels
from .base import ProbablyAlignedOptimizer, use_foreach
from .options import DEFAULT, MaskOptions

__all__ = ["ProbablyAlignedAdam", "ProbablyAlignedAdamW", "adam_updates"]


class ProbablyAlignedAdam(ProbablyAlignedOptimizer):
    r"""Adam / AdamW (AMSGrad optional) with the feasibility mask on the final update.

    ``u = m̂ / (√v̂ + ε)`` (plus ``λ·θ`` with ``decoupled_weight_decay=True``, i.e. AdamW); the
    moments and step count evolve exactly as in :class:`torch.optim.Adam`, and the state layout is
    the same, so ``state_dict`` s load across the two.  With ``confidence=None`` the trajectory is
    that of :class:`torch.optim.Adam` (or ``AdamW``).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as torch.optim.Adam.
        decoupled_weight_decay: AdamW's decoupled decay.
        model, loss_fn, confidence, forget_confidence, retain_confidence, quantile, soft, chunk_size,
        engine, forget_weight, retain_weight, certify, certify_policy, certify_tries, rescale,
        rescale_scope, max_scale, fused, reuse_buffers: see
        :class:`~masked_optim.ProbablyAlignedSGD`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor] | str | None = None,
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
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) or not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (a non-negative float is required)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError(f"{type(self).__name__} does not support capturable=True")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, MaskOptions.collect(locals()))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
        for s in self.state.values():
            # torch.optim.Adam stores a float32 CPU tensor; accept old float steps too
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps

    _fuses = True

    def _fused_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], forget: Any, retain: Any,
                      **kwargs: Any) -> list[Any]:
        for g in grads or ():  # None: the statistics direction, formed in the pass
            if torch.is_complex(g):
                raise ValueError(f"{type(self).__name__} does not support complex gradients")
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = self._init_group(group, params)
        beta1, beta2 = group["betas"]
        return fused_kernels.masked_adam_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if group["amsgrad"] else None, steps, forget, retain,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"], fused=group.get("fused"), **kwargs,
        )

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], apply: bool, grads_owned: bool = False,
    ) -> list[Tensor] | None:
        for g in grads:
            if torch.is_complex(g):
                raise ValueError(f"{type(self).__name__} does not support complex gradients")
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = self._init_group(group, params)
        beta1, beta2 = group["betas"]
        return adam_updates(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            apply=apply,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            foreach=use_foreach(group, params),
            grads_owned=grads_owned,
        )


class ProbablyAlignedAdamW(ProbablyAlignedAdam):
    """:class:`ProbablyAlignedAdam` with decoupled weight decay (``weight_decay=1e-2`` as torch's AdamW)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs: Any) -> None:
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("ProbablyAlignedAdamW always uses decoupled weight decay")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)


def adam_updates(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    foreach: bool,
    apply: bool = True,
    grads_owned: bool = False,
) -> list[Tensor] | None:
    """Functional Adam/AdamW: advances the moments and step counts exactly as :class:`torch.optim.Adam`.
    With ``apply`` it also moves the parameters (torch.optim's step, bit for bit); without, it returns
    each parameter's final update ``u = m̂/(√v̂+ε)`` (``+ λ·θ`` for AdamW, the pre-step ``θ``) and leaves
    ``θ ← θ − lr·m⊙u`` to the caller. ``grads_owned``: the gradients are the caller's scratch tensors
    and may be modified in place."""
    kwargs = dict(amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                  maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    if foreach:
        return _multi_tensor_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, apply=apply,
                                  **kwargs)
    return _single_tensor_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, apply=apply,
                               grads_owned=grads_owned, **kwargs)


def _single_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    apply: bool,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    grads_owned: bool = False,
) -> list[Tensor] | None:
    out = []
    for i, param in enumerate(params):
        grad, fresh = grads[i], grads_owned
        if maximize:
            grad, fresh = (grad.neg_() if fresh else -grad), True
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        decay_param = None
        if weight_decay != 0:
            if decoupled_weight_decay:
                if apply:
                    param.mul_(1 - lr * weight_decay)
                else:
                    decay_param = param.clone()  # u includes λ·θ of the pre-step parameter
            else:
                grad = grad.add_(param, alpha=weight_decay) if fresh else grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if apply:
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        else:
            u = torch.div(exp_avg, denom).div_(bias_correction1)
            if decay_param is not None:
                u.add_(decay_param, alpha=weight_decay)
            out.append(u)
    return None if apply else out


def _multi_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    apply: bool,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> list[Tensor] | None:
    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    if not params:
        return None if apply else out
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],  # type: ignore[list-item]
        with_indices=True,
    )
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_max, dev_steps), indices in grouped.values():
        if maximize:
            dev_grads = torch._foreach_neg(dev_grads)
        if dev_steps[0].is_cpu:
            torch._foreach_add_(dev_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(dev_steps, 1)
        decay_params = None
        if weight_decay != 0:
            if decoupled_weight_decay:
                if apply:
                    torch._foreach_mul_(dev_params, 1 - lr * weight_decay)
                else:
                    decay_params = torch._foreach_mul(dev_params, weight_decay)
            elif maximize:
                torch._foreach_add_(dev_grads, dev_params, alpha=weight_decay)
            else:
                dev_grads = torch._foreach_add(dev_grads, dev_params, alpha=weight_decay)
        torch._foreach_lerp_(dev_exp_avgs, dev_grads, 1 - beta1)
        torch._foreach_mul_(dev_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(dev_exp_avg_sqs, dev_grads, dev_grads, 1 - beta2)
        del dev_grads
        bias_correction1 = [1 - beta1 ** s.item() for s in dev_steps]
        bias_correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in dev_steps]
        if amsgrad:
            torch._foreach_maximum_(dev_max, dev_exp_avg_sqs)
            denom = torch._foreach_sqrt(dev_max)
        else:
            denom = torch._foreach_sqrt(dev_exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        if apply:
            step_size = [(lr / bc) * -1 for bc in bias_correction1]
            torch._foreach_addcdiv_(dev_params, dev_exp_avgs, denom, step_size)
        else:
            us = torch._foreach_div(dev_exp_avgs, denom)
            torch._foreach_div_(us, bias_correction1)
            if decay_params is not None:
                torch._foreach_add_(us, decay_params)
            for j, i in enumerate(indices):
                out[i] = us[j]
    return None if apply else out
