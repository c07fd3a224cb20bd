"""Part (b): the whole-update certificate (``certify=c``) against the full retain loss."""

from __future__ import annotations

import copy
from typing import Any

import torch

from masked_optim import ProbablyAlignedSGD, directional_derivatives

from .core import CONFIDENCES, binom_slack
from .digits import evaluate, sample

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
