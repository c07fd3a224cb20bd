"""The feasibility mask against references written from the definition (docs/design.md §3)."""

import math

import pytest
import torch
from torch import nn

from masked_optim import (
    Constraint,
    feasibility_mask,
    feasibility_masks,
    normal_quantile,
    per_sample_grad_stats,
    quantile,
    soft_mask,
    student_t_quantile,
    z_scores,
)
from masked_optim.mask import student_t_cdf

from .helpers import loop_moments, reference_z

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("c", [0.01, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999])
def test_normal_quantile_matches_scipy(c):
    assert normal_quantile(c) == pytest.approx(scipy_stats.norm.ppf(c), abs=1e-10)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 31, 64, 255])
@pytest.mark.parametrize("c", [0.05, 0.5, 0.9, 0.95, 0.99])
def test_student_t_matches_scipy(df, c):
    assert student_t_quantile(c, df) == pytest.approx(scipy_stats.t.ppf(c, df), rel=1e-8, abs=1e-9)
    assert student_t_cdf(1.3, df) == pytest.approx(scipy_stats.t.cdf(1.3, df), abs=1e-12)


@pytest.mark.parametrize("c", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_confidence_outside_unit_interval(c):
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(c)


def test_quantile_kinds():
    assert quantile(0.95, 10, "t") == pytest.approx(scipy_stats.t.ppf(0.95, 9))
    assert quantile(0.5, 1, "t") == 0.0
    with pytest.raises(ValueError, match="n >= 2"):
        quantile(0.95, 1, "t")
    with pytest.raises(ValueError, match="unknown quantile"):
        quantile(0.95, 10, "laplace")


def _reference_mask(u, cons):
    """Keep iff u ≠ 0 and every z > q, with z from the reference definition."""
    keep = u != 0
    for mean, m2, n, q, sign in cons:
        z = reference_z(torch.sign(u) * sign, mean, m2, n)
        keep &= z > q
    return keep.to(u.dtype)


def _model_stats(n_f=12, n_r=20, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    xf, yf = torch.randn(n_f, 6), torch.randint(0, 4, (n_f,))
    xr, yr = torch.randn(n_r, 6), torch.randint(0, 4, (n_r,))
    params = list(model.parameters())
    return model, params, (xf, yf), (xr, yr)


@pytest.mark.parametrize("c_f, c_r", [(0.95, 0.95), (0.5, 0.5), (0.9, 0.99), (0.3, 0.2), (0.95, None), (None, 0.7)])
@pytest.mark.parametrize("kind", ["normal", "t"])
def test_mask_equals_reference_from_per_sample_loop(c_f, c_r, kind):
    model, params, fb, rb = _model_stats()
    # Our statistics feed our mask; the loop's float64 statistics feed the reference.
    sf = per_sample_grad_stats(model, fb, params)
    sr = per_sample_grad_stats(model, rb, params)
    _, lmf, lqf = loop_moments(model, params, *fb)
    _, lmr, lqr = loop_moments(model, params, *rb)
    torch.manual_seed(5)
    us = [torch.randn_like(p) for p in params]
    us[0].view(-1)[:5] = 0.0  # u = 0 is never kept
    qf = quantile(c_f, sf.n, kind) if c_f else None
    qr = quantile(c_r, sr.n, kind) if c_r else None
    cons_f = [Constraint(sf.mean[i], sf.m2[i], sf.n, qf, -1) for i in range(len(params))] if c_f else None
    cons_r = [Constraint(sr.mean[i], sr.m2[i], sr.n, qr, +1) for i in range(len(params))] if c_r else None
    many = feasibility_masks(us, cons_f, cons_r)
    total = 0
    for i, u in enumerate(us):
        ref_cons = []
        if c_f:
            ref_cons.append((lmf[i], lqf[i], 12, scipy_q(c_f, 12, kind), -1))
        if c_r:
            ref_cons.append((lmr[i], lqr[i], 20, scipy_q(c_r, 20, kind), +1))
        ref = _reference_mask(u, ref_cons)
        one = feasibility_mask(u, cons_f[i] if cons_f else None, cons_r[i] if cons_r else None)
        # float32 vs float64 statistics may flip a coordinate sitting exactly on the threshold
        assert (one != ref).sum() <= 1
        assert torch.equal(one, many[i])
        assert one.dtype == u.dtype
        assert not one.view(-1)[:5].any() or i != 0
        total += ref.sum().item()
    assert total > 0  # the test is not vacuous


def scipy_q(c, n, kind):
    return float(scipy_stats.norm.ppf(c) if kind == "normal" else scipy_stats.t.ppf(c, n - 1))


def test_degenerate_cases_never_nan():
    u = torch.tensor([1.0, 1.0, -1.0, 1.0, 0.0, 1.0])
    mean = torch.tensor([0.5, -0.5, 0.5, 0.0, 0.5, 0.0])
    m2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    z = z_scores(u, mean, m2, 5)
    assert torch.equal(z[:5], torch.tensor([math.inf, -math.inf, -math.inf, 0.0, 0.0]))
    assert z[5] == 0.0 and not z.isnan().any()
    for q in (1.64, 0.0, -1.0):
        con = Constraint(mean, m2, 5, q, +1)
        ref = _reference_mask(u, [(mean, m2, 5, q, 1)])
        assert torch.equal(feasibility_mask(u, retain=con), ref)
        assert torch.equal(feasibility_masks([u], retain=[con])[0], ref)
        assert not soft_mask(u, retain=con).isnan().any()
    # q < 0 keeps μ = 0 coordinates (z = 0 > q) but never u = 0
    assert feasibility_mask(u, retain=Constraint(mean, m2, 5, -1.0)).tolist() == [1, 0, 0, 1, 0, 1]


def test_single_sample_needs_half_confidence():
    u, mean, m2 = torch.ones(3), torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3)
    assert feasibility_mask(u, retain=Constraint(mean, m2, 1, 0.0)).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="n >= 2"):
        feasibility_mask(u, retain=Constraint(mean, m2, 1, 1.64))


def test_soft_mask_matches_normal_cdf():
    torch.manual_seed(0)
    u, mf, qf, mr, qr = (torch.randn(50) for _ in range(5))
    qf, qr = qf.abs(), qr.abs()
    cf, cr = Constraint(mf, qf, 8, 1.0, -1), Constraint(mr, qr, 10, 0.5, +1)
    w = soft_mask(u, cf, cr)
    zf = reference_z(-torch.sign(u), mf, qf, 8)
    zr = reference_z(torch.sign(u), mr, qr, 10)
    phi = lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731
    torch.testing.assert_close(w.double(), phi(zf - 1.0) * phi(zr - 0.5), rtol=1e-5, atol=1e-6)
    assert torch.equal(feasibility_mask(u, cf, cr, soft=True), w)
    assert torch.equal(feasibility_masks([u], [cf], [cr], soft=True)[0], w)


@pytest.mark.parametrize("c", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("kind, n", [("normal", 400), ("t", 8)])
def test_kept_but_misaligned_rate_is_at_most_one_minus_c(c, kind, n):
    """Synthetic Gaussian per-sample gradients with known true means.

    Coordinates with true mean exactly 0 (the worst case) or of the wrong sign are misaligned; the
    fraction of them that the mask keeps must not exceed 1 − c beyond binomial sampling error."""
    gen = torch.Generator().manual_seed(int(c * 1000) + n)
    P = 40_000
    true_r = torch.cat([torch.zeros(P // 2), -0.05 * torch.rand(P // 4, generator=gen), 0.3 * torch.rand(P // 4, generator=gen)])
    sigma = 0.5 + torch.rand(P, generator=gen)
    g = true_r + sigma * torch.randn(n, P, generator=gen, dtype=torch.float64).float()
    mean = g.mean(0)
    m2 = ((g - mean) ** 2).sum(0)
    u = torch.ones(P)  # the update moves along +1: aligned iff the true retain mean is > 0
    keep = feasibility_mask(u, retain=Constraint(mean, m2, n, quantile(c, n, kind), +1)).bool()
    misaligned = true_r <= 0
    rate = keep[misaligned].float().mean().item()
    m = misaligned.sum().item()
    bound = (1 - c) + 4 * math.sqrt(c * (1 - c) / m)
    assert rate <= bound, (rate, bound)
    # and the worst case (true mean 0) is near the nominal level, so the test has power
    rate0 = keep[: P // 2].float().mean().item()
    assert abs(rate0 - (1 - c)) <= 4 * math.sqrt(c * (1 - c) / (P // 2)) + 0.003
    # the same holds on the forget side with the sign flipped
    keep_f = feasibility_mask(-u, forget=Constraint(mean, m2, n, quantile(c, n, kind), -1)).bool()
    assert torch.equal(keep_f, keep)


@pytest.mark.parametrize("chunk", [7, 1 << 30])
@pytest.mark.parametrize("sides", ["both", "forget", "retain", "half"])
def test_masked_add_equals_addcmul_with_reference_mask(chunk, sides, monkeypatch):
    """The fused, chunked update equals θ + α·m⊙u with m from the reference z-scores, whatever the
    chunk size (7 does not divide the 5x9 tensor: a ragged last chunk)."""
    from masked_optim import mask as mask_mod

    monkeypatch.setattr(mask_mod, "_CPU_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    shape, n = (5, 9), 12
    u = torch.randn(shape, generator=g)
    u[0, :3] = 0.0
    ref_cons, cons = [], []
    for side, sign in (("forget", -1), ("retain", 1)):
        if sides not in ("both", "half", side):
            continue
        mean = torch.randn(shape, generator=g)
        mean[1, :2] = 0.0
        m2 = torch.rand(shape, generator=g) * 20
        q = 0.0 if sides == "half" else quantile(0.9, n)
        cons.append(Constraint(mean, m2, n, q, sign))
        ref_cons.append((mean, m2, n, q, sign))
    param = torch.randn(shape, generator=g)
    expected_mask = _reference_mask(u, ref_cons)
    expected = param.clone().addcmul_(u, expected_mask, value=-0.3)
    kept = mask_mod.masked_add_(param, u, cons, -0.3)
    torch.testing.assert_close(param, expected)
    assert float(kept) == float(expected_mask.sum())
    assert 0 < float(kept) < u.numel()  # the test has both kept and dropped coordinates
    with pytest.raises(ValueError, match="q >= 0"):
        mask_mod.masked_add_(param, u, [Constraint(cons[0].mean, cons[0].m2, n, -0.5, 1)], -0.3)
