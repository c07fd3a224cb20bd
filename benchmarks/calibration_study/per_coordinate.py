"""Part (a): how often the per-coordinate test keeps a truly misaligned coordinate, against 1 − c.

(a)(i) synthetic per-sample gradients with known means and a logistic regression with the exact
full-data gradient; (a)(ii) the digits MLP, truth = the full retain / forget set gradient."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import per_sample_grad_stats

from .core import CONFIDENCES, KINDS, Counter, binom_slack, flat, mask_from
from .digits import sample


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
# (a)(ii) digits MLP, truth = the full retain / forget set gradient
# ------------------------------------------------------------------------------------------------
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
