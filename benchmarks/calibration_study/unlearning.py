"""Part (c): kept fraction and unlearning speed vs confidence on the digits."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from masked_optim import ProbablyAlignedSGD

from .core import CONFIDENCES
from .digits import digits_problem, evaluate, sample


def unlearning(cfg: dict) -> dict[str, Any]:
    levels: list[float | None] = [None, *CONFIDENCES]
    runs = []
    for scenario in cfg["unlearn_scenarios"]:
        for seed in cfg["unlearn_seeds"]:
            prob = digits_problem(seed, scenario, cfg["digits_epochs"])
            model = prob["model"]
            theta0 = copy.deepcopy(model.state_dict())
            before = {k: evaluate(model, prob[f"X{k}"], prob[f"y{k}"]) for k in ("f", "r", "t")}
            for c in levels:
                model.load_state_dict(theta0)
                gen = torch.Generator().manual_seed(500 + seed)  # the same batches for every confidence
                opt = ProbablyAlignedSGD(model.parameters(), lr=cfg["unlearn_lr"], model=model, confidence=c)
                kept = []
                for _ in range(cfg["unlearn_steps"]):
                    fb, _ = sample(gen, prob["Xf"], prob["yf"], cfg["unlearn_nf"])
                    rb, _ = sample(gen, prob["Xr"], prob["yr"], cfg["unlearn_nr"])
                    opt.step(forget=fb, retain=rb)
                    kept.append(opt.diagnostics.kept_fraction)
                after = {k: evaluate(model, prob[f"X{k}"], prob[f"y{k}"]) for k in ("f", "r", "t")}
                runs.append(dict(
                    scenario=scenario, seed=seed, c=c, mean_kept_fraction=sum(kept) / len(kept),
                    first_step_kept_fraction=kept[0],
                    forget_loss_before=before["f"][0], forget_loss_change=after["f"][0] - before["f"][0],
                    forget_acc_before=before["f"][1], forget_acc_drop=before["f"][1] - after["f"][1],
                    retain_loss_change=after["r"][0] - before["r"][0],
                    retain_acc_change=after["r"][1] - before["r"][1],
                    test_acc_before=before["t"][1], test_acc_change=after["t"][1] - before["t"][1],
                ))
    keys = ("mean_kept_fraction", "forget_loss_change", "forget_acc_drop", "retain_loss_change",
            "retain_acc_change", "test_acc_change", "forget_acc_before", "test_acc_before")
    summary = []
    for scenario in cfg["unlearn_scenarios"]:
        for c in levels:
            rs = [r for r in runs if r["scenario"] == scenario and r["c"] == c]
            row: dict[str, Any] = dict(scenario=scenario, c=c, seeds=len(rs))
            for k in keys:
                vals = [r[k] for r in rs]
                m = sum(vals) / len(vals)
                row[k] = m
                var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
                row[k + "_sd"] = math.sqrt(var)
            summary.append(row)
    return dict(
        steps=cfg["unlearn_steps"], lr=cfg["unlearn_lr"], n_forget=cfg["unlearn_nf"], n_retain=cfg["unlearn_nr"],
        seeds=list(cfg["unlearn_seeds"]), design=(
            "digits MLP trained a few epochs; K steps of ProbablyAlignedSGD (no momentum) with the default "
            "direction mu_r - mu_f from fresh forget/retain mini-batches, confidence c on both sides (None: "
            "unmasked); the same batch sequence for every c. Changes measured on the full forget / retain / "
            "test sets (for 'class' the test set includes the forgotten class)."),
        runs=runs, summary=summary,
    )
