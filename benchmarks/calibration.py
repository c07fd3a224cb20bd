#!/usr/bin/env python
"""Calibration study of the feasibility mask and of the whole-update certificate (issue #6).

Measures, against the nominal levels, on problems where the truth is known exactly:

(a) per-coordinate test (docs/design.md §3): how often a coordinate that is truly *misaligned*
    (``sign(u_i)·G_i ≤ 0`` for the retain constraint, ``−sign(u_i)·G_i ≤ 0`` for the forget one, with
    ``G`` the true full-data mean gradient: the null hypothesis of the one-sided test) is kept by the
    mask, for c in {0.5, 0.8, 0.9, 0.95, 0.99}, with the normal and the Student-t quantile:
      (i)  synthetic per-sample gradients with chosen means (a third exactly 0) — Gaussian, and a
           skewed (centred exponential) variant — and a multinomial logistic regression on a large
           finite data set whose full-data gradient is computed exactly, at θ = 0 and at the
           full-data optimum (where every coordinate sits on the boundary G ≈ 0);
      (ii) the digits data (sklearn), a small MLP trained a few epochs, forget = a random 10 % of the
           training set; truth = the gradient of the full retain (forget) set, the mask from
           mini-batches; the direction u either independent of the test batches or the optimizer's
           own same-batch direction ``μ_r − μ_f``.
(b) whole-update certificate (``certify=c``): on the digits, how often a certified step truly raises
    the full retain loss, with an independent check batch and reusing the mask's retain batch;
    reported as P(certified | truly raises) (the test's guarantee: ≤ 1 − c) and
    P(truly raises | certified); plus how often a step the "tighten" policy applied raises it.
(c) kept fraction and unlearning speed vs confidence on the digits (random-sample and one-class
    forgetting): forget-loss increase, forget-accuracy drop, retain-loss change after K masked steps.

Writes ``calibration.json``, ``calibration.md`` and ``calibration_{a,b,c}.png`` into ``--out``.
``--quick`` is a seconds-long smoke run (used by tests/test_calibration.py).

Usage::

    python benchmarks/calibration.py            # full study (a few minutes on 2 CPU cores)
    python benchmarks/calibration.py --quick --out /tmp/cal
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402  (benchmarks/ is not a package)

import masked_optim  # noqa: E402
from masked_optim import (  # noqa: E402
    Constraint,
    ProbablyAlignedSGD,
    directional_derivatives,
    feasibility_mask,
    per_sample_grad_stats,
    quantile,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
CONFIDENCES = (0.5, 0.8, 0.9, 0.95, 0.99)
KINDS = ("normal", "t")

FULL = dict(
    synth_P=30_000, synth_n=(5, 10, 30, 100), synth_trials=8,
    lr_N=20_000, lr_d=20, lr_K=4, lr_n=(5, 10, 30, 100), lr_trials=150,
    digits_epochs=5, digits_scenarios=("random", "class"), digits_n=(8, 32), digits_trials=60,
    cert_trials=500, cert_n=32, cert_lr=0.05, cert_mask_conf=0.5,
    unlearn_seeds=(0, 1, 2, 3, 4), unlearn_scenarios=("random", "class"), unlearn_steps=40, unlearn_lr=0.2,
    unlearn_nf=32, unlearn_nr=64,
)
QUICK = dict(
    synth_P=6_000, synth_n=(5, 100), synth_trials=2,
    lr_N=2_000, lr_d=10, lr_K=3, lr_n=(10,), lr_trials=10,
    digits_epochs=3, digits_scenarios=("random",), digits_n=(16,), digits_trials=6,
    cert_trials=10, cert_n=32, cert_lr=0.05, cert_mask_conf=0.5,
    unlearn_seeds=(0,), unlearn_scenarios=("random",), unlearn_steps=4, unlearn_lr=0.2,
    unlearn_nf=32, unlearn_nr=64,
)


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------
def lscpu_fields() -> dict[str, str]:
    keep = ("Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Thread(s) per core", "Hypervisor vendor",
            "L2 cache", "L3 cache")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in keep:
            fields[key.strip()] = val.strip()
    return fields


def machine() -> dict[str, Any]:
    return dict(
        cpu_model=cpu_model(), lscpu=lscpu_fields(), cpu_count=os.cpu_count(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), python=platform.python_version(),
        masked_optim=masked_optim.__version__, platform=platform.platform(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def binom_slack(p: float, m: int, k: float = 3.0) -> float:
    """k binomial standard errors of a rate p estimated from m independent Bernoulli draws."""
    return k * math.sqrt(max(p * (1 - p), 1e-12) / max(m, 1))


class Counter:
    """Accumulates (hits, total) pooled over trials, and the per-trial rates."""

    def __init__(self) -> None:
        self.hits, self.total, self.per_trial = 0, 0, []

    def add(self, hits: int, total: int) -> None:
        self.hits += int(hits)
        self.total += int(total)
        if total:
            self.per_trial.append(hits / total)

    def summary(self) -> dict[str, Any]:
        rate = self.hits / self.total if self.total else None
        pt = self.per_trial
        se = None
        if len(pt) > 1:
            m = sum(pt) / len(pt)
            se = math.sqrt(sum((r - m) ** 2 for r in pt) / (len(pt) - 1) / len(pt))
        return dict(rate=rate, hits=self.hits, total=self.total, trials=len(pt), se_across_trials=se)


def mask_from(u: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, n: int, c: float, kind: str, sign: int):
    """The package's mask of one constraint (public API), as bool."""
    con = Constraint(mean, m2, n, quantile(c, n, kind), sign)
    if sign > 0:
        return feasibility_mask(u, retain=con).bool()
    return feasibility_mask(u, forget=con).bool()


# ------------------------------------------------------------------------------------------------
# (a)(i) synthetic per-sample gradients with known means
# ------------------------------------------------------------------------------------------------
def synthetic(cfg: dict, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    P = cfg["synth_P"]
    third = P // 3
    sigma = 0.5 + torch.rand(P, generator=gen, dtype=torch.float64)
    sgn = torch.where(torch.rand(P, generator=gen) < 0.5, -1.0, 1.0).double()
    eff = torch.cat([
        torch.zeros(third, dtype=torch.float64),                               # exactly 0: the boundary
        0.2 * torch.rand(third, generator=gen, dtype=torch.float64),           # small |effect| ≤ 0.2 σ
        0.2 + 1.3 * torch.rand(P - 2 * third, generator=gen, dtype=torch.float64),  # large
    ])
    mu = sgn * eff * sigma
    zero = mu == 0
    out: dict[str, Any] = dict(
        P=P, trials=cfg["synth_trials"], design=(
            "P coordinates, per-sample g = mu + sigma*e, sigma ~ U(0.5, 1.5); a third of the means exactly 0, "
            "a third with |mu|/sigma ~ U(0, 0.2), a third with |mu|/sigma ~ U(0.2, 1.5), random signs. "
            "e ~ N(0,1) ('gaussian') or Exp(1) - 1 ('skewed', skewness 2). u = +1 and u = -1 (both tails); "
            "misaligned: sign(u)*mu <= 0."),
        cells=[],
    )
    for dist in ("gaussian", "skewed"):
        for n in cfg["synth_n"]:
            acc = {(k, c, t): (Counter(), Counter()) for k in KINDS for c in CONFIDENCES for t in (1, -1)}
            for _ in range(cfg["synth_trials"]):
                if dist == "gaussian":
                    e = torch.randn(n, P, generator=gen, dtype=torch.float64)
                else:
                    e = -torch.log(torch.rand(n, P, generator=gen, dtype=torch.float64)) - 1.0
                g = mu + sigma * e
                mean = g.mean(0)
                m2 = ((g - mean) ** 2).sum(0)
                for t in (1, -1):
                    u = torch.full((P,), float(t), dtype=torch.float64)
                    mis = t * mu <= 0
                    for kind in KINDS:
                        for c in CONFIDENCES:
                            keep = mask_from(u, mean, m2, n, c, kind, +1)
                            a_mis, a_zero = acc[(kind, c, t)]
                            a_mis.add((keep & mis).sum().item(), mis.sum().item())
                            a_zero.add((keep & zero).sum().item(), zero.sum().item())
            for kind in KINDS:
                for c in CONFIDENCES:
                    tails = {t: acc[(kind, c, t)] for t in (1, -1)}
                    hits = sum(tails[t][0].hits for t in tails)
                    tot = sum(tails[t][0].total for t in tails)
                    hz = sum(tails[t][1].hits for t in tails)
                    tz = sum(tails[t][1].total for t in tails)
                    out["cells"].append(dict(
                        dist=dist, n=n, kind=kind, c=c, nominal=1 - c,
                        misaligned_kept_rate=hits / tot, misaligned_count=tot,
                        zero_mean_kept_rate=hz / tz, zero_count=tz,
                        per_tail_misaligned_kept_rate={("u=+1" if t > 0 else "u=-1"): tails[t][0].summary()["rate"]
                                                       for t in tails},
                        per_tail_zero_kept_rate={("u=+1" if t > 0 else "u=-1"): tails[t][1].summary()["rate"]
                                                 for t in tails},
                        slack_3se=binom_slack(1 - c, tot),
                    ))
    return out


# ------------------------------------------------------------------------------------------------
# (a)(i) logistic regression on a large finite data set, exact full-data gradient
# ------------------------------------------------------------------------------------------------
def logistic(cfg: dict, seed: int = 1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    N, d, K = cfg["lr_N"], cfg["lr_d"], cfg["lr_K"]
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, K, generator=gen, dtype=torch.float64)
    w[d // 2:] = 0.0  # half the features are pure noise
    probs = torch.softmax(x @ w, 1)
    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    model = nn.Linear(d, K).double()
    params = list(model.parameters())

    def full_grad() -> torch.Tensor:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return flat([p.grad for p in params]).detach().clone()

    thetas = {}
    with torch.no_grad():
        for p in params:
            p.zero_()
    thetas["theta=0"] = copy.deepcopy(model.state_dict())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    thetas["optimum"] = copy.deepcopy(model.state_dict())
    out: dict[str, Any] = dict(
        N=N, d=d, K=K, trials=cfg["lr_trials"], design=(
            "multinomial logistic regression, x ~ N(0, I), labels sampled from the model with half the "
            "features' true weights 0; theta = 0 and theta = the full-data optimum (L-BFGS, float64). "
            "Truth: the exact full-data gradient G. Each trial: a batch of n drawn without replacement, "
            "u = random signs (independent of the batch); misaligned: sign(u)*G <= 0."),
        thetas={}, cells=[],
    )
    for name, sd in thetas.items():
        model.load_state_dict(sd)
        G = full_grad()
        out["thetas"][name] = dict(max_abs_full_grad=G.abs().max().item(),
                                   median_abs_full_grad=G.abs().median().item())
        for n in cfg["lr_n"]:
            acc = {(k, c): Counter() for k in KINDS for c in CONFIDENCES}
            for _ in range(cfg["lr_trials"]):
                idx = torch.randperm(N, generator=gen)[:n]
                st = per_sample_grad_stats(model, (x[idx], y[idx]))
                mean, m2 = flat(st.mean), flat(st.m2)
                u = torch.where(torch.rand(G.numel(), generator=gen) < 0.5, -1.0, 1.0).double()
                mis = torch.sign(u) * G <= 0
                for kind in KINDS:
                    for c in CONFIDENCES:
                        keep = mask_from(u, mean, m2, n, c, kind, +1)
                        acc[(kind, c)].add((keep & mis).sum().item(), mis.sum().item())
            for (kind, c), a in acc.items():
                s = a.summary()
                out["cells"].append(dict(theta=name, n=n, kind=kind, c=c, nominal=1 - c,
                                         misaligned_kept_rate=s["rate"], misaligned_count=s["total"],
                                         se_across_trials=s["se_across_trials"]))
    return out


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------
_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        _DIGITS = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    return _DIGITS


def digits_problem(seed: int, scenario: str, epochs: int) -> dict[str, Any]:
    """Train a 64-32-10 ReLU MLP for a few epochs (Adam); split test 20 %, forget = a random 10 % of the
    training set ('random') or every training sample of class 0 ('class'). Returned in float64."""
    X, y = digits_data()
    gen = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=gen)
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    if scenario == "random":
        n_f = len(train) // 10
        forget, retain = train[:n_f], train[n_f:]
    elif scenario == "class":
        forget, retain = train[y[train] == 0], train[y[train] != 0]
    else:
        raise ValueError(scenario)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(X[b]), y[b]).backward()
            opt.step()
    model = model.double()
    Xd = X.double()
    return dict(model=model, Xf=Xd[forget], yf=y[forget], Xr=Xd[retain], yr=y[retain], Xt=Xd[test], yt=y[test],
                scenario=scenario, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(X)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()


def sample(gen: torch.Generator, X: torch.Tensor, y: torch.Tensor, n: int, exclude: torch.Tensor | None = None):
    idx = torch.randperm(len(y), generator=gen)
    if exclude is not None:
        idx = idx[~torch.isin(idx, exclude)]
    idx = idx[:n]
    return (X[idx], y[idx]), idx


def digits_mask(cfg: dict, probs: dict[str, dict], seed: int = 2) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = dict(
        trials=cfg["digits_trials"], design=(
            "64-32-10 ReLU MLP trained a few epochs; forget = a random 10 % of the training set ('random') or "
            "all training samples of class 0 ('class'). Truth: G_r, G_f = mean gradients of the full retain / "
            "forget sets. Each trial: retain and forget batches of n (without replacement). u = mu_r' - mu_f' "
            "from independent batches ('independent') or u = mu_r - mu_f from the test batches themselves "
            "('same batch': the optimizer's own direction when no p.grad is given). Retain-misaligned: u != 0 "
            "and sign(u)*G_r <= 0; forget-misaligned: u != 0 and -sign(u)*G_f <= 0 (coordinates identically 0 "
            "over the full set excluded). joint: both tests pass, among coordinates misaligned on either side. "
            "fdp_*: share of the coordinates kept by the joint mask that are misaligned (retain side, forget "
            "side, either)."),
        scenarios={}, cells=[],
    )
    for scen, prob in probs.items():
        model = prob["model"]
        params = list(model.parameters())
        full_r = per_sample_grad_stats(model, (prob["Xr"], prob["yr"]))
        full_f = per_sample_grad_stats(model, (prob["Xf"], prob["yf"]))
        Gr, Gf = flat(full_r.mean), flat(full_f.mean)
        live_r = ~((Gr == 0) & (flat(full_r.m2) == 0))  # not identically 0 over the whole retain set
        live_f = ~((Gf == 0) & (flat(full_f.m2) == 0))
        both = live_r & live_f
        out["scenarios"][scen] = dict(
            P=Gr.numel(), n_retain_set=len(prob["yr"]), n_forget_set=len(prob["yf"]),
            identically_zero_retain=int((~live_r).sum()), identically_zero_forget=int((~live_f).sum()),
            # with u = G_r - G_f (the full-data direction): how many coordinates are aligned on both sides
            full_data_feasible_fraction=((torch.sign(Gr - Gf) * Gr > 0) & (torch.sign(Gr - Gf) * Gf < 0)
                                         & both).double().mean().item(),
        )
        sides = ("retain", "forget", "joint", "fdp_retain", "fdp_forget", "fdp_joint")
        for n in cfg["digits_n"]:
            acc = {(um, side, k, c): Counter() for um in ("independent", "same batch")
                   for side in sides for k in KINDS for c in CONFIDENCES}
            for _ in range(cfg["digits_trials"]):
                rb, _ = sample(gen, prob["Xr"], prob["yr"], n)
                fb, _ = sample(gen, prob["Xf"], prob["yf"], n)
                sr, sf = per_sample_grad_stats(model, rb, params), per_sample_grad_stats(model, fb, params)
                mr, m2r, mf, m2f = flat(sr.mean), flat(sr.m2), flat(sf.mean), flat(sf.m2)
                rb2, _ = sample(gen, prob["Xr"], prob["yr"], n)
                fb2, _ = sample(gen, prob["Xf"], prob["yf"], n)
                u_ind = (flat(per_sample_grad_stats(model, rb2, params).mean)
                         - flat(per_sample_grad_stats(model, fb2, params).mean))
                for um, u in (("independent", u_ind), ("same batch", mr - mf)):
                    nz = u != 0
                    mis_r = nz & live_r & (torch.sign(u) * Gr <= 0)
                    mis_f = nz & live_f & (-torch.sign(u) * Gf <= 0)
                    mis_any = mis_r | mis_f
                    for kind in KINDS:
                        for c in CONFIDENCES:
                            kr = mask_from(u, mr, m2r, n, c, kind, +1)
                            kf = mask_from(u, mf, m2f, n, c, kind, -1)
                            kj = kr & kf
                            nk = kj.sum().item()
                            a = lambda side: acc[(um, side, kind, c)]  # noqa: E731
                            a("retain").add((kr & mis_r).sum().item(), mis_r.sum().item())
                            a("forget").add((kf & mis_f).sum().item(), mis_f.sum().item())
                            a("joint").add((kj & mis_any).sum().item(), mis_any.sum().item())
                            a("fdp_retain").add((kj & mis_r).sum().item(), nk)
                            a("fdp_forget").add((kj & mis_f).sum().item(), nk)
                            a("fdp_joint").add((kj & mis_any).sum().item(), nk)
            for (um, side, kind, c), a in acc.items():
                s = a.summary()
                out["cells"].append(dict(scenario=scen, u=um, side=side, n=n, kind=kind, c=c, nominal=1 - c,
                                         rate=s["rate"], hits=s["hits"], total=s["total"],
                                         se_across_trials=s["se_across_trials"]))
    return out


# ------------------------------------------------------------------------------------------------
# (b) the whole-update certificate
# ------------------------------------------------------------------------------------------------
CERT_DESIGNS = {
    # the mask tests both sides on the forget / retain batches: the step is selected on the retain batch
    "retain-tested mask": lambda mc: dict(confidence=mc),
    # control: the mask tests the forget side only, so the step is not selected on the retain batch
    "forget-only mask": lambda mc: dict(confidence=None, forget_confidence=mc),
}


def certification(cfg: dict, prob: dict, seed: int = 3) -> dict[str, Any]:
    model = prob["model"]
    theta0 = copy.deepcopy(model.state_dict())
    p0 = [p.detach().clone() for p in model.parameters()]
    Xr, yr = prob["Xr"], prob["yr"]
    L0 = evaluate(model, Xr, yr)[0]
    n, lr, mc = cfg["cert_n"], cfg["cert_lr"], cfg["cert_mask_conf"]

    def run(mask_kw, certify, check, fb, rb):
        model.load_state_dict(theta0)
        opt = ProbablyAlignedSGD(model.parameters(), lr=lr, model=model, retain_weight=0.0, certify=certify,
                                 certify_policy="tighten", **mask_kw)
        opt.step(forget=fb, retain=rb, check_retain=check)
        d = opt.diagnostics
        tangent = [(a - p.detach()) / lr for a, p in zip(p0, model.parameters())]
        dL = evaluate(model, Xr, yr)[0] - L0
        return d, tangent, dL

    out: dict[str, Any] = dict(
        trials=cfg["cert_trials"], n_forget=n, n_retain=n, n_check=n, lr=lr, mask_confidence=mc,
        full_retain_loss=L0, design=(
            "digits MLP (random-10 % forget). Step: ProbablyAlignedSGD, no momentum, direction u = -mu_f "
            f"(forget ascent, retain_weight=0), mask confidence {mc} on both sides ('retain-tested mask') or on "
            "the forget side only ('forget-only mask', the control: the step is not selected on the retain "
            "batch); certify=c, policy 'tighten'. Truth: does the uncertified masked step raise the full "
            "retain loss (float64)? 'certified' = action 'accepted' (the step as masked passed the test). "
            "Check batch: an independent retain batch, or the mask's own retain batch (the default "
            "check_retain for a retain-tested mask). The forget side is always tested on the forget batch."),
        designs={}, cells=[],
    )
    modes = ("independent check batch", "same batch")
    for dname, make_kw in CERT_DESIGNS.items():
        mask_kw = make_kw(mc)
        gen = torch.Generator().manual_seed(seed)  # the same batches for both designs
        recs: dict = {(m, c): [] for m in modes for c in CONFIDENCES}
        base = []
        mismatch = 0
        for _ in range(cfg["cert_trials"]):
            fb, _ = sample(gen, prob["Xf"], prob["yf"], n)
            rb, ridx = sample(gen, Xr, yr, n)
            cb, _ = sample(gen, Xr, yr, n, exclude=ridx)
            d0, tangent, dL = run(mask_kw, None, None, fb, rb)
            model.load_state_dict(theta0)
            dd = directional_derivatives(model, list(model.parameters()), tangent, (Xr, yr)).double().mean().item()
            raises, raises_fo = dL > 0, dd < 0  # the step is θ − lr·τ: first-order change −lr·⟨τ, ∇L_r⟩
            base.append(dict(raises=raises, raises_first_order=raises_fo, kept=d0.kept_fraction))
            for mode in modes:
                check = cb if mode.startswith("independent") else rb
                for c in CONFIDENCES:
                    d, tang_c, dL_c = run(mask_kw, c, check, fb, rb)
                    action = d.certificate.action
                    diff = max((a - b).abs().max().item() for a, b in zip(tang_c, tangent))
                    if action == "accepted" and diff > 1e-9:
                        mismatch += 1
                    recs[(mode, c)].append(dict(action=action, raises=raises, raises_fo=raises_fo,
                                                applied_raises=dL_c > 0, kept=d.kept_fraction))
        out["designs"][dname] = dict(
            mask_kwargs={k: v for k, v in mask_kw.items()},
            accepted_step_mismatches=mismatch,
            base_rate_raises=sum(b["raises"] for b in base) / len(base),
            first_order_agreement=sum(b["raises"] == b["raises_first_order"] for b in base) / len(base),
            mean_kept_fraction=sum(b["kept"] for b in base) / len(base),
        )
        for (mode, c), rs in recs.items():
            n_raise = sum(r["raises"] for r in rs)
            n_raise_fo = sum(r["raises_fo"] for r in rs)
            cert = [r for r in rs if r["action"] == "accepted"]
            cert_raise = sum(r["raises"] for r in cert)
            tight = [r for r in rs if r["action"] == "tightened"]
            applied = [r for r in rs if r["action"] in ("accepted", "tightened")]
            actions = {a: sum(r["action"] == a for r in rs) for a in ("accepted", "tightened", "emptied", "skipped")}
            frac = lambda rows, key: (sum(r[key] for r in rows) / len(rows)) if rows else None  # noqa: E731
            out["cells"].append(dict(
                mask=dname, check=mode, c=c, nominal=1 - c, trials=len(rs), truly_raising=n_raise,
                certified=len(cert), certified_and_raising=cert_raise,
                p_certified_given_raises=cert_raise / n_raise if n_raise else None,
                p_raises_given_certified=cert_raise / len(cert) if cert else None,
                # the same with the first-order truth ⟨m⊙u, ∇L_r⟩ < 0 (what the test estimates)
                truly_raising_first_order=n_raise_fo,
                p_certified_given_raises_first_order=(
                    sum(r["raises_fo"] for r in cert) / n_raise_fo if n_raise_fo else None),
                p_certified=len(cert) / len(rs),
                slack_3se=binom_slack(1 - c, n_raise) if n_raise else None,
                actions=actions,
                # among the trials whose step had to be tightened: did the uncertified step raise, and the applied one?
                p_uncertified_raises_when_tightened=frac(tight, "raises"),
                p_tightened_step_raises=frac(tight, "applied_raises"),
                p_applied_step_raises=frac(applied, "applied_raises"),
                mean_kept_fraction=sum(r["kept"] for r in rs) / len(rs),
            ))
    out["accepted_step_mismatches"] = sum(d["accepted_step_mismatches"] for d in out["designs"].values())
    return out


# ------------------------------------------------------------------------------------------------
# (c) kept fraction and unlearning speed vs confidence
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    L = [
        "# Calibration study (issue #6)", "",
        f"Generated by `{res['command']}` on {m['cpu_model']} ({m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['torch_threads']} thread(s)), {m['date']}, mode `{res['mode']}`, {res['wall_s']:.0f} s.", "",
        "Nominal level of every per-coordinate test and of the certificate: 1 − c. A rate is the fraction of "
        "truly misaligned coordinates (null hypothesis sign(u)·G ≤ 0) that the mask kept, pooled over trials.",
        "",
    ]
    header = "| " + " | ".join(f"c={c} (1−c={1 - c:.2f})" for c in CONFIDENCES) + " |"
    sep = "|" + "---|" * len(CONFIDENCES)

    s = res["a_synthetic"]
    L += ["## (a)(i) Synthetic per-sample gradients (known means)", "", s["design"], "",
          "Misaligned-kept rate (all misaligned coordinates / exactly-zero means only):", "",
          "| distribution | n | quantile " + header, "|---|---|---" + sep]
    for dist in ("gaussian", "skewed"):
        for n in sorted({c["n"] for c in s["cells"]}):
            for kind in KINDS:
                cells = {c["c"]: c for c in s["cells"] if c["dist"] == dist and c["n"] == n and c["kind"] == kind}
                L.append(f"| {dist} | {n} | {kind} | " + " | ".join(
                    f"{cells[c]['misaligned_kept_rate']:.3f} / {cells[c]['zero_mean_kept_rate']:.3f}"
                    for c in CONFIDENCES) + " |")
    sk = [c for c in s["cells"] if c["dist"] == "skewed"]
    if sk:
        L += ["", "Skewed, zero-mean coordinates, per tail (u=+1 / u=−1) at c = 0.95:", "",
              "| n | quantile | u=+1 | u=−1 |", "|---|---|---|---|"]
        for c in sk:
            if c["c"] == 0.95:
                t = c["per_tail_zero_kept_rate"]
                L.append(f"| {c['n']} | {c['kind']} | {t['u=+1']:.3f} | {t['u=-1']:.3f} |")

    lr_ = res["a_logistic"]
    L += ["", "## (a)(i) Logistic regression, exact full-data gradient", "", lr_["design"], "",
          "Full-data gradient: " + "; ".join(f"{k}: max |G| = {v['max_abs_full_grad']:.2e}, median |G| = "
                                             f"{v['median_abs_full_grad']:.2e}" for k, v in lr_["thetas"].items()),
          "", "| θ | n | quantile " + header, "|---|---|---" + sep]
    for th in lr_["thetas"]:
        for n in sorted({c["n"] for c in lr_["cells"]}):
            for kind in KINDS:
                cells = {c["c"]: c for c in lr_["cells"] if c["theta"] == th and c["n"] == n and c["kind"] == kind}
                L.append(f"| {th} | {n} | {kind} | " + " | ".join(
                    f"{cells[c]['misaligned_kept_rate']:.3f}" for c in CONFIDENCES) + " |")

    if "a_digits" in res:
        dg = res["a_digits"]
        L += ["", "## (a)(ii) Digits MLP, truth = full retain / forget set gradient", "", dg["design"], ""]
        for scen, dm in res.get("digits_models", {}).items():
            L.append(f"- model for '{scen}' after {dm['epochs']} epochs: loss / accuracy on forget "
                     f"{dm['forget_loss_acc'][0]:.3f} / {dm['forget_loss_acc'][1]:.3f}, retain "
                     f"{dm['retain_loss_acc'][0]:.3f} / {dm['retain_loss_acc'][1]:.3f}, test "
                     f"{dm['test_loss_acc'][0]:.3f} / {dm['test_loss_acc'][1]:.3f}.")
        for scen, info in dg["scenarios"].items():
            L.append(f"- {scen}: {info['P']} parameters, retain set {info['n_retain_set']}, forget set "
                     f"{info['n_forget_set']}; identically-zero coordinates excluded: {info['identically_zero_retain']} "
                     f"(retain), {info['identically_zero_forget']} (forget); with the full-data direction "
                     f"u = G_r − G_f, {info['full_data_feasible_fraction']:.3f} of the coordinates are aligned on both sides.")
        L += ["", "Entries: retain-side / forget-side / joint misaligned-kept rate.", "",
              "| forget set | u | n | quantile " + header, "|---|---|---|---" + sep]

        def get(scen, um, n, kind, side, c):
            return next(x["rate"] for x in dg["cells"] if x["scenario"] == scen and x["u"] == um and x["n"] == n
                        and x["kind"] == kind and x["c"] == c and x["side"] == side)

        ns = sorted({c["n"] for c in dg["cells"]})
        for scen in dg["scenarios"]:
            for um in ("independent", "same batch"):
                for n in ns:
                    for kind in KINDS:
                        L.append(f"| {scen} | {um} | {n} | {kind} | " + " | ".join(
                            f"{fmt(get(scen, um, n, kind, 'retain', c))} / {fmt(get(scen, um, n, kind, 'forget', c))} / "
                            f"{fmt(get(scen, um, n, kind, 'joint', c))}" for c in CONFIDENCES) + " |")
        L += ["", "Share of the coordinates kept by the joint mask that are misaligned, retain side / forget side / "
              "either (a false-discovery proportion: *not* bounded by 1 − c, it depends on how many coordinates are "
              "truly aligned), u independent, normal quantile:", "",
              "| forget set | n " + header, "|---|---" + sep]
        for scen in dg["scenarios"]:
            for n in ns:
                L.append(f"| {scen} | {n} | " + " | ".join(
                    " / ".join(fmt(get(scen, "independent", n, "normal", side, c), 2)
                               for side in ("fdp_retain", "fdp_forget", "fdp_joint")) for c in CONFIDENCES) + " |")

    if "b_certification" in res:
        ce = res["b_certification"]
        L += ["", "## (b) Whole-update certificate (certify=c) vs the full retain loss", "", ce["design"], "",
              f"{ce['trials']} trials per mask; batches n_f = n_r = n_check = {ce['n_check']}, lr = {ce['lr']}; "
              f"accepted steps differing from the uncertified step: {ce['accepted_step_mismatches']}."]
        for dname, info in ce["designs"].items():
            L.append(f"- {dname}: uncertified steps that raise the full retain loss: {info['base_rate_raises']:.3f}; "
                     f"mean kept fraction {info['mean_kept_fraction']:.3f}; the first-order sign agrees with the "
                     f"finite step in {info['first_order_agreement']:.3f} of the trials.")
        L += ["", "P(cert ∣ raises): share of the truly-raising steps that were certified (the test's guarantee: "
              "≤ 1 − c); '1st order': the same with the truth ⟨m⊙u, ∇L_r⟩ < 0 that the test estimates. "
              "P(raises ∣ cert): share of the certified steps that truly raise. Tightened: P(the "
              "uncertified step raised) → P(the tightened step raises), over the trials that were tightened.", "",
              "| mask | check batch | c | 1−c | raising / certified | P(cert ∣ raises) | P(cert ∣ raises), 1st order "
              "| P(raises ∣ cert) | accepted / tightened / emptied | tightened: raised → raises | P(applied step raises) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in ce["cells"]:
            a = x["actions"]
            L.append(f"| {x['mask']} | {x['check']} | {x['c']} | {x['nominal']:.2f} | {x['truly_raising']} / "
                     f"{x['certified']} | {fmt(x['p_certified_given_raises'])} | {fmt(x['p_certified_given_raises_first_order'])} | "
                     f"{fmt(x['p_raises_given_certified'])} | "
                     f"{a['accepted']} / {a['tightened']} / {a['emptied']} | "
                     f"{fmt(x['p_uncertified_raises_when_tightened'], 2)} → {fmt(x['p_tightened_step_raises'], 2)} | "
                     f"{fmt(x['p_applied_step_raises'])} |")

    if "c_unlearning" in res:
        ul = res["c_unlearning"]
        L += ["", "## (c) Kept fraction and unlearning speed vs confidence (digits)", "", ul["design"], "",
              f"K = {ul['steps']} steps, lr = {ul['lr']}, n_f = {ul['n_forget']}, n_r = {ul['n_retain']}, "
              f"seeds {ul['seeds']} (mean ± sd). Before unlearning (mean over seeds): " + "; ".join(
                  f"'{r['scenario']}' forget acc {r['forget_acc_before']:.3f}, test acc {r['test_acc_before']:.3f}"
                  for r in ul["summary"] if r["c"] is None) + ".", "",
              "| forget set | c | kept fraction | Δ forget loss | forget acc drop | Δ retain loss | Δ retain acc | Δ test acc |",
              "|---|---|---|---|---|---|---|---|"]
        for r in ul["summary"]:
            pm = lambda k, nd=3: f"{r[k]:.{nd}f} ± {r[k + '_sd']:.{nd}f}"  # noqa: E731
            L.append(f"| {r['scenario']} | {'unmasked' if r['c'] is None else r['c']} | {pm('mean_kept_fraction')} | "
                     f"{pm('forget_loss_change')} | {pm('forget_acc_drop')} | {pm('retain_loss_change', 4)} | "
                     f"{pm('retain_acc_change')} | {pm('test_acc_change')} |")
    if res.get("skipped"):
        L += ["", "Skipped: " + "; ".join(res["skipped"])]
    if res.get("plots"):
        L += ["", "Plots: " + ", ".join(f"`{p}`" for p in res["plots"]) + " (a: per-coordinate rate vs 1 − c; "
              "b: the certificate; c: kept fraction and loss changes vs c)."]
    L.append("")
    return "\n".join(L)


def plots(res: dict[str, Any], out: Path, dpi: int = 110) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nominal = [1 - c for c in CONFIDENCES]
    lo, hi = 0.004, 1.0

    def diag(ax):
        ax.plot([lo, 0.6], [lo, 0.6], "k--", lw=1, label="nominal 1−c")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 0.7)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("nominal 1 − c")
        ax.grid(alpha=0.3, which="both")

    def clip(v):
        return max(v, lo * 1.05) if v is not None else float("nan")

    from matplotlib.lines import Line2D

    def proxies(ax, colors: dict, markers: dict, styles: dict, loc="lower right"):
        h = [Line2D([], [], color=c, lw=2, label=k) for k, c in colors.items()]
        h += [Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()]
        h += [Line2D([], [], color="gray", ls=ls, label=k) for k, ls in styles.items()]
        h.append(Line2D([], [], color="k", ls="--", lw=1, label="nominal 1−c"))
        ax.legend(handles=h, fontsize=7, ncol=2, loc=loc)

    files = []
    npanel = 4 if "a_digits" in res else 2
    fig, axes = plt.subplots(1, npanel, figsize=(5 * npanel, 4.8))
    s = res["a_synthetic"]
    ax = axes[0]
    ns = sorted({c["n"] for c in s["cells"]})
    ncol = {f"n={n}": f"C{i}" for i, n in enumerate(ns)}
    for dist, ls in (("gaussian", "-"), ("skewed", ":")):
        for n in ns:
            for kind, mk in (("normal", "o"), ("t", "s")):
                ys = [clip(max(next(c["per_tail_zero_kept_rate"] for c in s["cells"] if c["dist"] == dist
                                    and c["n"] == n and c["kind"] == kind and c["c"] == cc).values()))
                      for cc in CONFIDENCES]
                ax.plot(nominal, ys, ls, color=ncol[f"n={n}"], marker=mk, ms=4)
    diag(ax)
    ax.set_title("synthetic, zero-mean coordinates kept (worse of u=±1)", fontsize=10)
    ax.set_ylabel("misaligned-kept rate")
    proxies(ax, ncol, {"normal q": "o", "Student-t q": "s"}, {"gaussian": "-", "skewed": ":"})
    lr_ = res["a_logistic"]
    ax = axes[1]
    ns = sorted({c["n"] for c in lr_["cells"]})
    ncol = {f"n={n}": f"C{i}" for i, n in enumerate(ns)}
    for th, ls in zip(lr_["thetas"], ("-", "--")):
        for n in ns:
            for kind, mk in (("normal", "o"), ("t", "s")):
                ys = [clip(next(c["misaligned_kept_rate"] for c in lr_["cells"] if c["theta"] == th and c["n"] == n
                                and c["kind"] == kind and c["c"] == cc)) for cc in CONFIDENCES]
                ax.plot(nominal, ys, ls, color=ncol[f"n={n}"], marker=mk, ms=4)
    diag(ax)
    ax.set_title("logistic regression, exact full-data G", fontsize=10)
    proxies(ax, ncol, {"normal q": "o", "Student-t q": "s"}, dict(zip(lr_["thetas"], ("-", "--"))))
    if "a_digits" in res:
        dg = res["a_digits"]
        for ax, um in zip(axes[2:], ("independent", "same batch")):
            for scen, col in zip(dg["scenarios"], ("C0", "C3")):
                for n, mk in zip(sorted({c["n"] for c in dg["cells"]}), ("o", "^", "s")):
                    for side, ls in (("retain", "-"), ("forget", "--")):
                        ys = [clip(next(x["rate"] for x in dg["cells"] if x["scenario"] == scen and x["u"] == um
                                        and x["n"] == n and x["side"] == side and x["kind"] == "normal" and x["c"] == cc))
                              for cc in CONFIDENCES]
                        ax.plot(nominal, ys, ls, color=col, marker=mk, ms=4, alpha=0.85)
            diag(ax)
            ax.set_title(f"digits MLP, u {um} (normal quantile)", fontsize=10)
            proxies(ax, {f"forget set: {k}": c for k, c in zip(dg["scenarios"], ("C0", "C3"))},
                    {f"n={n}": m for n, m in zip(sorted({c["n"] for c in dg["cells"]}), ("o", "^", "s"))},
                    {"retain side": "-", "forget side": "--"})
    fig.tight_layout()
    p = out / "calibration_a.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    files.append(p.name)

    if "b_certification" in res:
        ce = res["b_certification"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for dname, col in zip(ce["designs"], ("C0", "C2")):
            for mode, mk, ls in (("independent check batch", "o", "-"), ("same batch", "s", "--")):
                cells = [x for x in ce["cells"] if x["check"] == mode and x["mask"] == dname]
                axes[0].plot(nominal, [clip(x["p_certified_given_raises"]) for x in cells], ls, color=col, marker=mk,
                             label=f"{dname}, {mode}")
                axes[1].plot(nominal, [clip(x["p_raises_given_certified"]) for x in cells], ls, color=col, marker=mk,
                             label=f"{dname}, {mode}")
            axes[1].axhline(ce["designs"][dname]["base_rate_raises"], color=col, lw=1, ls=":",
                            label=f"{dname}: uncertified steps")
        diag(axes[0])
        axes[0].set_title("P(certified | step truly raises the full retain loss)", fontsize=10)
        axes[0].set_ylabel("rate")
        axes[0].legend(fontsize=7)
        diag(axes[1])
        axes[1].set_title("P(step truly raises | certified)", fontsize=10)
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("nominal 1 − c   (rates of 0 are drawn at the bottom edge)")
        fig.tight_layout()
        p = out / "calibration_b.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(p.name)

    if "c_unlearning" in res:
        ul = res["c_unlearning"]
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        panels = (("mean_kept_fraction", "mean kept fraction"),
                  ("forget_loss_change", "Δ forget loss (full forget set)"),
                  ("forget_acc_drop", "forget accuracy drop"),
                  ("retain_loss_change", "Δ retain loss (full retain set)"))
        for scen, mk, col in (("random", "o", "C0"), ("class", "s", "C1")):
            rows = [r for r in ul["summary"] if r["scenario"] == scen and r["c"] is not None]
            if not rows:
                continue
            unm = next(r for r in ul["summary"] if r["scenario"] == scen and r["c"] is None)
            cs = [r["c"] for r in rows]
            for ax, (key, title) in zip(axes, panels):
                ax.errorbar(cs, [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows], marker=mk, color=col,
                            capsize=3, label=f"forget set '{scen}' (unmasked: {unm[key]:+.3g})")
                ax.set_title(title, fontsize=10)
                ax.set_xlabel("confidence c")
                ax.grid(alpha=0.3)
        for ax in axes[1:]:
            ax.axhline(0.0, color="k", lw=0.8)
        axes[0].set_yscale("log")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(f"digits: {ul['steps']} steps of ProbablyAlignedSGD, lr {ul['lr']}, mean ± sd over "
                     f"{len(ul['seeds'])} seed(s); unmasked values (same lr) in the legends", fontsize=10)
        fig.tight_layout()
        p = out / "calibration_c.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(p.name)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are tiny)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    res: dict[str, Any] = dict(
        machine=machine(), mode="quick" if args.quick else "full",
        command="python benchmarks/calibration.py" + (" --quick" if args.quick else "")
        + (f" --out {args.out}" if args.out != DEFAULT_OUT else ""),
        config=cfg, confidences=list(CONFIDENCES), timings_s={},
    )

    def part(name, fn, *a):
        t = time.perf_counter()
        res[name] = fn(*a)
        res["timings_s"][name] = round(time.perf_counter() - t, 2)
        print(f"[calibration] {name}: {res['timings_s'][name]:.1f} s", flush=True)

    part("a_synthetic", synthetic, cfg)
    part("a_logistic", logistic, cfg)
    res["skipped"] = []
    try:
        import sklearn  # noqa: F401  (the digits data ship with scikit-learn)
    except ImportError:
        res["skipped"].append("(a)(ii), (b), (c): scikit-learn is not installed (the digits data)")
    else:
        probs = {scen: digits_problem(0, scen, cfg["digits_epochs"]) for scen in cfg["digits_scenarios"]}
        res["digits_models"] = {scen: dict(
            epochs=cfg["digits_epochs"], forget=len(p["yf"]), retain=len(p["yr"]), test=len(p["yt"]),
            **{f"{name}_loss_acc": evaluate(p["model"], p[f"X{k}"], p[f"y{k}"])
               for k, name in (("f", "forget"), ("r", "retain"), ("t", "test"))})
            for scen, p in probs.items()}
        part("a_digits", digits_mask, cfg, probs)
        part("b_certification", certification, cfg, probs["random"])
        part("c_unlearning", unlearning, cfg)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        res["plots"] = []
        res["skipped"].append("plots: matplotlib is not installed")
    else:
        res["plots"] = plots(res, args.out, dpi=60 if args.quick else 110)
    (args.out / "calibration.json").write_text(json.dumps(res, indent=1))
    (args.out / "calibration.md").write_text(markdown(res))
    for note in res["skipped"]:
        print(f"[calibration] skipped {note}", flush=True)
    written = ", ".join(["calibration.json", "calibration.md", *res["plots"]])
    print(f"[calibration] wrote {written} into {args.out} ({res['wall_s']:.1f} s of study) on "
          f"{res['machine']['cpu_model']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
