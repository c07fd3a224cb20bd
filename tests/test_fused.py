"""masked_optim.fused against eager references of the same mathematics.

The reference of each step is plain eager torch: the base update written out (docs/design.md §5, the
same order of operations as the optimizers' functionals), the mask from the package's own
``feasibility_mask`` (hard: ``_keep``/``_keep_mixed``; soft: ``soft_mask``) and the length from
``step_scale``. The masks must agree exactly; parameters and state within a tolerance derived from
the arithmetic (below). Compilation is slow on CPU, so the tests share a handful of graphs (one per
structure: which inputs are present, soft, the pass, the dtypes) and check with dynamo's counters
that learning-rate schedules, option values and new sizes add none.

Tolerances. In float32 the kernel performs the reference's operations in the same order, so most
values agree bitwise; what may differ is the last bit of a product or quotient that the compiler
reorders (never contracted: inductor builds with -ffp-contract=off), the float64 sums behind a
rescaled length (the reference's ``step_scale`` sums in float32: ~1e-7 relative on ``s``) and the soft
mask's normal CDF (erf-based when compiled: ~1e-7 absolute on a weight). Hence for a parameter
``|Δ| ≤ 8·eps·(|θ| + |lr·s·u|)`` (plus ``lr·s·|u|·1e-6`` for soft weights); for low-precision
parameters one unit in the last place of their dtype (both sides round the same float32 value,
which may straddle a rounding boundary). The statistics are drawn away from the test's boundary
``μ² = coeff·M2`` (a factor of at least 1.05 either side), where the package's ``M2 − μ²/coeff < 0``
and the kernel's ``μ² > coeff·M2`` could round differently.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from masked_optim import fused as F
from masked_optim.mask import Constraint, coeff as _coeff, feasibility_mask, normal_quantile, step_scale

COMPILED = F.available("cpu")
needs_compiler = pytest.mark.skipif(not COMPILED, reason=f"no fused kernels here: {F.why_unavailable('cpu')}")

LRS = [0.1, 0.05, 0.03, 0.01, 0.003, 0.001]  # a schedule: ≥ 5 learning rates, none recompiles
SIZES = [3000, 1000, 257]  # tensors of several sizes share one graph (symbolic sizes)
N_F, N_R = 32, 48  # samples behind the statistics


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def _conf_q(c: float) -> float:
    return normal_quantile(c)


def make_side(sizes, c, n, sign, gen, dtype=torch.float32) -> F.Side:
    """Statistics of one side at confidence ``c``: M2 drawn ≥ 5 % away from the boundary μ² = coeff·M2,
    on either side of it (about half the coordinates significant)."""
    q = _conf_q(c)
    coeff = _coeff(q, n) if q else 0.0
    means, m2s = [], []
    for k in sizes:
        mean = torch.randn(k, generator=gen, dtype=torch.float64)
        if coeff:
            ratio = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(0.05, 2.0, generator=gen))
            flip = torch.rand(k, generator=gen) < 0.5
            ratio = torch.where(flip, 1 / ratio, ratio)  # μ²/(coeff·M2) = ratio: > 1 significant
            m2 = mean * mean / (coeff * ratio)
        else:
            m2 = torch.rand(k, generator=gen, dtype=torch.float64) * n
        means.append(mean.to(dtype))
        m2s.append(m2.to(dtype))
    return F.Side(means, m2s, n, q, sign)


def sides(cf, cr, gen, sizes=SIZES):
    fs = None if cf is None else make_side(sizes, cf, N_F, -1, gen)
    rs = None if cr is None else make_side(sizes, cr, N_R, +1, gen)
    return fs, rs


def randn(sizes, gen, dtype=torch.float32, scale=1.0):
    return [(torch.randn(k, generator=gen) * scale).to(dtype) for k in sizes]


# --------------------------------------------------------------------------------------------------
# the reference: eager torch, the package's mask and step_scale
# --------------------------------------------------------------------------------------------------
def _cd(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def ref_direction(i, g, direction, cd):
    if g is not None:
        return g.to(cd)
    mf = None if direction.forget_means is None else direction.forget_means[i].to(cd)
    mr = None if direction.retain_means is None else direction.retain_means[i].to(cd)
    fw, rw = direction.forget_weight, direction.retain_weight
    if mf is not None and mr is not None:
        return rw * mr - fw * mf
    return mr * rw if mr is not None else -(mf * fw)


def ref_mask(i, u, fs, rs, soft):
    cd = u.dtype
    con = [None if s is None else Constraint(s.means[i].to(cd), s.m2s[i].to(cd), s.n, s.q, s.sign) for s in (fs, rs)]
    return feasibility_mask(u, con[0], con[1], soft=soft)


def ref_apply(p32, u, m, lr, rescale, max_scale):
    s = step_scale([m], [u], rescale, max_scale).to(u.dtype) if rescale else torch.ones((), dtype=u.dtype)
    moved = m != 0
    step = lr * u * (m * s)
    return torch.where(moved, p32 - step, p32), s


def ref_sgd(params, grads, bufs, fs, rs, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
            maximize=False, soft=False, rescale=None, max_scale=100.0, direction=None):
    """Returns new params, new buffers, masks, factors s and the updates u (no input is modified)."""
    out_p, out_b, masks, scales, us = [], [], [], [], []
    for i, p in enumerate(params):
        g = None if grads is None else grads[i]
        stats = [s.means[i] for s in (fs, rs) if s is not None]
        cd = _cd(p, *stats)
        p32 = p.to(cd)
        gg = ref_direction(i, g, direction, cd) * (-1.0 if maximize else 1.0) + weight_decay * p32
        b = None
        if momentum:
            buf = bufs[i]
            b = gg.clone() if buf is None else buf.to(cd) * momentum + (1 - dampening) * gg
            u = gg + momentum * b if nesterov else b
        else:
            u = gg
        m = ref_mask(i, u, fs, rs, soft)
        pn, s = ref_apply(p32, u, m, lr, rescale, max_scale)
        out_p.append(pn.to(p.dtype))
        out_b.append(None if b is None else b.to(p.dtype))
        masks.append(m)
        scales.append(s)
        us.append(u)
    return out_p, out_b, masks, scales, us


def ref_adam(params, grads, exp_avgs, exp_avg_sqs, maxs, step, fs, rs, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
             weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, soft=False, rescale=None,
             max_scale=100.0, direction=None):
    """``step``: the step number after the increment. Returns params, (m, v, vmax), masks, s, u."""
    bc1, bc2s = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    w1 = 1 - beta1
    out_p, out_state, masks, scales, us = [], [], [], [], []
    for i, p in enumerate(params):
        g = None if grads is None else grads[i]
        stats = [s.means[i] for s in (fs, rs) if s is not None]
        cd = _cd(p, *stats)
        p32 = p.to(cd)
        wd_c, wd_d = (0.0, weight_decay) if decoupled else (weight_decay, 0.0)
        gg = ref_direction(i, g, direction, cd) * (-1.0 if maximize else 1.0) + wd_c * p32
        a = exp_avgs[i].to(cd)
        e = a + w1 * (gg - a) if w1 < 0.5 else gg - (gg - a) * (1 - w1)
        v = exp_avg_sqs[i].to(cd) * beta2 + (1 - beta2) * gg * gg
        vv = torch.maximum(maxs[i].to(cd), v) if amsgrad else v
        u = e / (torch.sqrt(vv) / bc2s + eps) / bc1 + wd_d * p32
        m = ref_mask(i, u, fs, rs, soft)
        pn, s = ref_apply(p32, u, m, lr, rescale, max_scale)
        out_p.append(pn.to(p.dtype))
        out_state.append((e.to(p.dtype), v.to(p.dtype), vv.to(p.dtype) if amsgrad else None))
        masks.append(m)
        scales.append(s)
        us.append(u)
    return out_p, out_state, masks, scales, us


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------
def assert_masks_equal(got, want, soft):
    for g, w in zip(got, want):
        if soft:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=1e-6)
        else:
            bad = int((g != w.to(g.dtype)).sum())
            assert bad == 0, f"{bad} mask mismatches of {g.numel()}"


def assert_params_close(got, want, old, us, scales, lr, soft=False):
    for g, w, o, u, s in zip(got, want, old, us, scales):
        dt = g.dtype
        if dt in (torch.bfloat16, torch.float16):
            ulp = torch.finfo(dt).eps * w.float().abs().clamp_min(torch.finfo(dt).tiny)
            err = (g.float() - w.float()).abs()
            assert bool((err <= ulp * 1.0001).all()), f"{dt}: max error {float((err / ulp).max()):.2f} ulp"
            continue
        eps = torch.finfo(dt).eps
        step = (lr * float(s) * u.abs()).to(dt)
        tol = 8 * eps * (w.abs() + step) + torch.finfo(dt).tiny
        if soft:
            tol = tol + step * 1e-6
        err = (g - w).abs()
        assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}, at tol {float(tol[err.argmax()]):.3g}"


def assert_state_close(got, want):
    for g, w in zip(got, want):
        if g.dtype in (torch.bfloat16, torch.float16):
            ulp = torch.finfo(g.dtype).eps * w.float().abs().clamp_min(torch.finfo(g.dtype).tiny)
            assert bool(((g.float() - w.float()).abs() <= ulp * 1.0001).all())
        else:
            torch.testing.assert_close(g, w, rtol=8 * torch.finfo(g.dtype).eps, atol=torch.finfo(g.dtype).tiny)


# --------------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------------
SGD_OPTIONS = [  # every option, and thresholds of either sign on each side; one graph for all of them
    dict(momentum=0.9, cf=0.95, cr=0.05),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True, cf=0.95, cr=0.95),
    dict(momentum=0.8, nesterov=True, weight_decay=5e-4, cf=0.5, cr=0.05),
    dict(momentum=0.5, dampening=0.5, cf=0.05, cr=0.7),
    dict(momentum=0.9, nesterov=True, maximize=True, weight_decay=0.1, cf=0.99, cr=0.5),
]


def run_sgd_schedule(opts, gen, *, dtype=torch.float32, fused=True, sizes=SIZES, soft=False, rescale=None,
                     grads_from=None, max_scale=100.0, expect_graphs=None):
    """Five-plus steps of a learning-rate schedule, each checked against the reference. Returns the
    number of graphs compiled after the first step."""
    opts = dict(opts)
    cf, cr = opts.pop("cf"), opts.pop("cr")
    fs, rs = sides(cf, cr, gen, sizes)
    params = randn(sizes, gen, dtype)
    bufs = [None] * len(sizes)
    ref_bufs = [None] * len(sizes)
    after_first = None
    for t, lr in enumerate(LRS):
        grads = None if grads_from == "stats" else randn(sizes, gen, dtype)
        direction = None if grads is not None else F.Direction(fs.means if fs else None, rs.means if rs else None,
                                                               0.7, 1.3)
        masks = [torch.empty(k) for k in sizes]
        want_p, want_b, want_m, want_s, us = ref_sgd(params, grads, ref_bufs, fs, rs, lr=lr, soft=soft,
                                                     rescale=rescale, max_scale=max_scale, direction=direction,
                                                     **opts)
        old = [p.clone() for p in params]
        sums = F.masked_sgd_(params, grads, bufs, fs, rs, lr=lr, soft=soft, rescale=rescale, max_scale=max_scale,
                             direction=direction, masks=masks, fused=fused, **opts)
        assert_masks_equal(masks, want_m, soft)
        for s, m in zip(sums, want_m):
            if soft:
                assert math.isclose(float(s.kept), float(m.double().sum()), rel_tol=1e-5, abs_tol=1e-4)
            else:
                assert float(s.kept) == float(m.double().sum())  # exact count
            assert s.kept.dtype == torch.float64
        assert_params_close(params, want_p, old, us, want_s, lr, soft)
        if opts.get("momentum"):
            assert_state_close(bufs, want_b)
            ref_bufs = [b.clone() for b in bufs]
        if t == 0:
            after_first = graphs()
    return graphs() - after_first


@needs_compiler
def test_sgd_every_option_one_graph():
    gen = torch.Generator().manual_seed(0)
    before = graphs()
    new = [run_sgd_schedule(o, gen) for o in SGD_OPTIONS]
    assert new == [0] * len(SGD_OPTIONS)  # no recompilation after the first step of the first run
    assert graphs() - before <= 1  # and every option, threshold sign and size shared one graph


@pytest.mark.parametrize("soft, cf, cr", [(False, 0.95, None), (True, 0.9, 0.2)])
def test_sgd_stats_direction(soft, cf, cr):
    """u = 1.3·μ_r − 0.7·μ_f from the statistics (no gradient read); one side tested, or a soft mask."""
    gen = torch.Generator().manual_seed(1)
    fused = True if COMPILED else False
    new = run_sgd_schedule(dict(cf=cf, cr=cr, weight_decay=1e-3), gen, soft=soft, grads_from="stats", fused=fused)
    assert new == 0
    if cr is None:  # the direction reads μ_r even where the retain side is not tested
        fs, _ = sides(cf, None, gen)
        rs_means = randn(SIZES, gen)
        params = randn(SIZES, gen)
        want = [p.clone() for p in params]
        d = F.Direction(fs.means, rs_means, 1.0, 1.0)
        F.masked_sgd_(params, None, [], fs, None, lr=0.1, direction=d, fused=fused)
        for w, mr, mf, i in zip(want, rs_means, fs.means, range(3)):
            u = mr - mf
            m = ref_mask(i, u, fs, None, False)
            w.copy_(torch.where(m != 0, w - 0.1 * u, w))
        torch.testing.assert_close(params, want, rtol=1e-6, atol=1e-7)


@needs_compiler
@pytest.mark.parametrize("how", ["norm", "count"])
def test_sgd_rescale(how):
    gen = torch.Generator().manual_seed(2)
    new = run_sgd_schedule(dict(momentum=0.9, weight_decay=1e-2, cf=0.95, cr=0.05), gen, rescale=how, max_scale=7.0)
    assert new == 0


@needs_compiler
@pytest.mark.slow
def test_rescale_by_recomputing_the_step(monkeypatch):
    """The other two-pass design (a read-only pass for the sums, then the whole step again)."""
    monkeypatch.setattr(F, "RESCALE_PASSES", "recompute")
    gen = torch.Generator().manual_seed(16)
    assert run_sgd_schedule(dict(momentum=0.9, nesterov=True, cf=0.95, cr=0.05), gen, rescale="norm") == 0
    assert run_adam_schedule(dict(amsgrad=True, cf=0.95, cr=0.05), gen, rescale="count", max_scale=3.0) == 0


def test_eager_kernels_match_reference_everywhere():
    """The fallback (the same functions run eagerly) on every structure: options, soft, rescale,
    directions, low precision. No compilation."""
    gen = torch.Generator().manual_seed(3)
    for o in SGD_OPTIONS[:3]:
        run_sgd_schedule(o, gen, fused=False)
    run_sgd_schedule(dict(momentum=0.9, cf=0.9, cr=0.1), gen, fused=False, soft=True, rescale="norm")
    run_sgd_schedule(dict(cf=0.95, cr=0.05), gen, fused=False, rescale="count", grads_from="stats")
    run_sgd_schedule(dict(momentum=0.9, cf=0.95, cr=0.05), gen, fused=False, dtype=torch.bfloat16)
    run_adam_schedule(dict(amsgrad=True, weight_decay=1e-2, cf=0.95, cr=0.05), gen, fused=False, rescale="norm")
    run_adam_schedule(dict(decoupled=True, weight_decay=1e-2, cf=0.9, cr=0.2), gen, fused=False, soft=True,
                      grads_from="stats")


# --------------------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------------------
def run_adam_schedule(opts, gen, *, dtype=torch.float32, fused=True, sizes=SIZES, soft=False, rescale=None,
                      grads_from=None, max_scale=100.0):
    opts = dict(opts)
    cf, cr = opts.pop("cf"), opts.pop("cr")
    amsgrad = opts.get("amsgrad", False)
    fs, rs = sides(cf, cr, gen, sizes)
    params = randn(sizes, gen, dtype)
    m1 = [torch.zeros(k, dtype=dtype) for k in sizes]
    m2 = [torch.zeros(k, dtype=dtype) for k in sizes]
    mx = [torch.zeros(k, dtype=dtype) for k in sizes] if amsgrad else None
    steps = [torch.tensor(0.0) for _ in sizes]
    after_first = None
    for t, lr in enumerate(LRS):
        grads = None if grads_from == "stats" else randn(sizes, gen, dtype)
        direction = None if grads is not None else F.Direction(fs.means if fs else None, rs.means if rs else None,
                                                               1.0, 0.5)
        masks = [torch.empty(k) for k in sizes]
        want_p, want_st, want_m, want_s, us = ref_adam(params, grads, m1, m2, mx, t + 1, fs, rs, lr=lr, soft=soft,
                                                       rescale=rescale, max_scale=max_scale, direction=direction, **opts)
        old = [p.clone() for p in params]
        kw = dict(opts)
        kw["decoupled_weight_decay"] = kw.pop("decoupled", False)
        sums = F.masked_adam_(params, grads, m1, m2, mx, steps, fs, rs, lr=lr, soft=soft, rescale=rescale,
                              max_scale=max_scale, direction=direction, masks=masks, fused=fused, **kw)
        assert [float(s) for s in steps] == [t + 1.0] * len(sizes)
        assert_masks_equal(masks, want_m, soft)
        if not soft:
            assert [float(s.kept) for s in sums] == [float(m.double().sum()) for m in want_m]
        assert_params_close(params, want_p, old, us, want_s, lr, soft)
        assert_state_close(m1, [s[0] for s in want_st])
        assert_state_close(m2, [s[1] for s in want_st])
        if amsgrad:
            assert_state_close(mx, [s[2] for s in want_st])
        if t == 0:
            after_first = graphs()
    return graphs() - after_first


ADAM_OPTIONS = [  # AMSGrad; Adam's coupled and AdamW's decoupled decay; maximize; betas; either threshold sign
    dict(amsgrad=True, weight_decay=1e-2, cf=0.95, cr=0.05),
    dict(amsgrad=True, decoupled=True, weight_decay=5e-2, maximize=True, cf=0.95, cr=0.95),
    dict(amsgrad=True, beta1=0.8, beta2=0.99, eps=1e-6, cf=0.5, cr=0.05),
    dict(amsgrad=True, beta1=0.3, decoupled=True, weight_decay=1e-3, cf=0.05, cr=0.6),  # lerp's other formula
]


@needs_compiler
def test_adam_every_option_one_graph():
    gen = torch.Generator().manual_seed(4)
    before = graphs()
    new = [run_adam_schedule(o, gen) for o in ADAM_OPTIONS]
    assert new == [0] * len(ADAM_OPTIONS)
    assert graphs() - before <= 1


@needs_compiler
def test_adamw_stats_direction_soft_rescaled():
    gen = torch.Generator().manual_seed(5)
    assert run_adam_schedule(dict(decoupled=True, weight_decay=1e-2, cf=0.9, cr=0.2), gen, soft=True,
                             grads_from="stats", rescale="norm", max_scale=20.0) == 0


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_float32_statistics(dtype):
    """bf16/fp16 parameters and state, float32 statistics: float32 arithmetic, one rounding per store."""
    gen = torch.Generator().manual_seed(6)
    assert run_sgd_schedule(dict(momentum=0.9, weight_decay=1e-2, cf=0.95, cr=0.05), gen, dtype=dtype) == 0
    assert run_adam_schedule(dict(decoupled=True, weight_decay=1e-2, cf=0.95, cr=0.05), gen, dtype=dtype) == 0


# --------------------------------------------------------------------------------------------------
# the deferred route, the step length over several tensors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["norm", "count"])
def test_deltas_pooled_scale_equals_step_scale(how):
    """deltas=: the state advances, the parameters do not; m⊙u and the sums come back, and the factor
    pooled over the tensors (a group's) equals step_scale of their masks and updates."""
    gen = torch.Generator().manual_seed(7)
    fused = True if COMPILED else False
    fs, rs = sides(0.95, 0.05, gen)
    params = randn(SIZES, gen)
    grads = randn(SIZES, gen)
    bufs = [None] * 3
    old = [p.clone() for p in params]
    deltas = [torch.empty(k) for k in SIZES]
    masks = [torch.empty(k) for k in SIZES]
    want_p, want_b, want_m, _, us = ref_sgd(params, grads, [None] * 3, fs, rs, lr=0.1, momentum=0.9)
    sums = F.masked_sgd_(params, grads, bufs, fs, rs, lr=0.1, momentum=0.9, deltas=deltas, masks=masks, fused=fused)
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    assert_state_close(bufs, want_b)
    assert_masks_equal(masks, want_m, False)
    for d, m, u in zip(deltas, want_m, us):
        assert torch.equal(d, torch.where(m != 0, u, torch.zeros_like(u)))
    s = F.scale_from_sums(how, sums, SIZES, 7.0)
    want_s = step_scale(want_m, us, how, 7.0)
    assert math.isclose(float(s), float(want_s), rel_tol=1e-5)
    F.apply_deltas_(params, deltas, 0.1, [s] * 3)
    for p, o, d in zip(params, old, deltas):
        torch.testing.assert_close(p, o - 0.1 * float(s) * d, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# the package's own functionals (how the optimizers step today), float32
# --------------------------------------------------------------------------------------------------
def _eager_step(params, us, fs, rs, lr, rescale=None):
    """The optimizers' eager, unguarded masked step on the updates ``us``: each tensor's mask, its
    length, θ ← θ − lr·s·m⊙u (masked_optim.optim.masking); returns the kept counts."""
    from masked_optim.optim.masking import GroupTests, Side, Update, apply_updates, masks_of, step_lengths

    tests = GroupTests(*(Side(list(s.means), list(s.m2s), s.n, s.q, s.sign) for s in (fs, rs)), False,
                       rescale=None if rescale is None else (rescale, "tensor", 100.0))
    updates = [Update(tests, i, p, u, lr) for i, (p, u) in enumerate(zip(params, us))]
    ms = masks_of(updates)
    apply_updates(updates, ms, step_lengths(updates, ms))
    return [float(m.sum()) for m in ms]


@needs_compiler
@pytest.mark.parametrize("rescale", [None, "norm"])
def test_sgd_matches_the_optimizers_functional(rescale):
    """Same steps, same kept counts as sgd_updates(foreach=False) and the optimizers' eager mask."""
    from masked_optim.optim.sgd import sgd_updates

    gen = torch.Generator().manual_seed(8)
    fs, rs = sides(0.95, 0.05, gen)
    mine = randn(SIZES, gen)
    theirs = [p.clone() for p in mine]
    bufs_m, bufs_t = [None] * 3, [None] * 3
    kw = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
    for lr in LRS:
        grads = randn(SIZES, gen)
        us = sgd_updates(theirs, [g.clone() for g in grads], bufs_t, lr=lr, foreach=False, apply=False, **kw)
        kept = _eager_step(theirs, us, fs, rs, lr, rescale)
        sums = F.masked_sgd_(mine, grads, bufs_m, fs, rs, lr=lr, rescale=rescale, fused=True, **kw)
        assert [float(s.kept) for s in sums] == kept
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bufs_m, bufs_t, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_adam_matches_the_optimizers_functional():
    from masked_optim.optim.adam import adam_updates

    gen = torch.Generator().manual_seed(9)
    fs, rs = sides(0.95, 0.05, gen)
    mine = randn(SIZES, gen)
    theirs = [p.clone() for p in mine]
    st_m = [[torch.zeros(k) for k in SIZES] for _ in range(3)] + [[torch.tensor(0.0) for _ in SIZES]]
    st_t = [[t.clone() for t in lst] for lst in st_m]
    kw = dict(amsgrad=True, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, maximize=False,
              decoupled_weight_decay=True)
    for lr in LRS:
        grads = randn(SIZES, gen)
        us = adam_updates(theirs, [g.clone() for g in grads], *st_t, lr=lr, foreach=False, apply=False, **kw)
        kept = _eager_step(theirs, us, fs, rs, lr)
        sums = F.masked_adam_(mine, grads, *st_m, fs, rs, lr=lr, fused=True, **kw)
        assert [float(s.kept) for s in sums] == kept
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        for a, b in zip(st_m, st_t):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sum_of_squares_with_adjusted_threshold_is_the_same_mask():
    """The optimizers' Σg² trick: Σg² = M2 + nμ² with q' = q/√(1 + q²/(n−1)) gives the M2 test's mask,
    for thresholds of either sign."""
    gen = torch.Generator().manual_seed(10)
    fs, rs = sides(0.95, 0.05, gen)

    def sq(side):
        qa = side.q / math.sqrt(1 + side.q ** 2 / (side.n - 1))
        sums = [m2 + side.n * mu * mu for mu, m2 in zip(side.means, side.m2s)]
        return F.Side(side.means, sums, side.n, qa, side.sign)

    grads = randn(SIZES, gen)
    masks = [[torch.empty(k) for k in SIZES] for _ in range(2)]
    for (f, r), ms in zip(((fs, rs), (sq(fs), sq(rs))), masks):
        F.masked_sgd_(randn(SIZES, gen), grads, [], f, r, lr=0.1, masks=ms, fused=False)
    mismatches = sum(int((a != b).sum()) for a, b in zip(*masks))
    assert mismatches <= 2  # rounding of Σg² vs M2 at the boundary (the statistics keep 5 % away from it)


# --------------------------------------------------------------------------------------------------
# behaviour
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_compiler)])
def test_masked_out_coordinates_never_move_even_for_non_finite_updates(fused):
    gen = torch.Generator().manual_seed(11)
    fs, rs = sides(0.95, 0.95, gen, [4096])
    g = torch.randn(4096, generator=gen)
    g[::7] = math.inf
    g[3::7] = -math.inf
    g[5::7] = math.nan
    p = torch.randn(4096, generator=gen)
    old = p.clone()
    mask = torch.empty(4096)
    F.masked_sgd_([p], [g], [], fs, rs, lr=0.1, masks=[mask], fused=fused)
    frozen = mask == 0
    assert bool(frozen[5::7].all())  # NaN is never aligned
    assert torch.equal(p[frozen], old[frozen])  # no NaN from 0·inf: a select, not a product
    assert bool(torch.isfinite(p[frozen]).all())
    moved = ~frozen & torch.isfinite(g)
    assert bool(moved.any()) and bool((p[moved] != old[moved]).all())


@needs_compiler
def test_without_mask_output_same_step():
    """The production structure (no mask written) takes the same step as the tested one."""
    gen = torch.Generator().manual_seed(12)
    fs, rs = sides(0.95, 0.05, gen)
    a = randn(SIZES, gen)
    b = [p.clone() for p in a]
    grads = randn(SIZES, gen)
    bufs_a, bufs_b = [None] * 3, [None] * 3
    for lr in LRS[:2]:
        ka = F.masked_sgd_(a, grads, bufs_a, fs, rs, lr=lr, momentum=0.9, fused=True)
        kb = F.masked_sgd_(b, grads, bufs_b, fs, rs, lr=lr, momentum=0.9, fused=True,
                           masks=[torch.empty(k) for k in SIZES])
        assert [float(x.kept) for x in ka] == [float(x.kept) for x in kb]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_compiler)])
def test_chunks_of_mixed_structures(fused):
    """Tensors of several structures (dtype, layout, first momentum step or not) and more tensors than
    one chunk: each runs with its own kind, and the step is the reference's."""
    gen = torch.Generator().manual_seed(17)
    sizes = [300, 200, 100, 400, 500, 600, 700]
    fs, rs = sides(0.95, 0.05, gen, sizes)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32,
              torch.float32]
    params = [torch.randn(k, generator=gen).to(dt) for k, dt in zip(sizes, dtypes)]
    grads = [torch.randn(k, generator=gen).to(dt) for k, dt in zip(sizes, dtypes)]
    bufs = [None, None, torch.randn(100, generator=gen), None, None, None, None]
    want, want_b, want_m, _, _ = ref_sgd(params, grads, bufs, fs, rs, lr=0.1, momentum=0.9)
    masks = [torch.empty(k) for k in sizes]
    F.masked_sgd_(params, grads, bufs, fs, rs, lr=0.1, momentum=0.9, masks=masks, fused=fused)
    assert_masks_equal(masks, want_m, False)
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    for b, w in zip(bufs, want_b):
        torch.testing.assert_close(b, w, rtol=1e-2 if b.dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_non_contiguous_parameters_run_eagerly():
    gen = torch.Generator().manual_seed(13)
    p = torch.randn(64, 48, generator=gen).t()  # non-contiguous
    fs, rs = sides(0.95, 0.05, gen, [48 * 64])
    fs = F.Side([m.view(48, 64) for m in fs.means], [m.view(48, 64) for m in fs.m2s], fs.n, fs.q, fs.sign)
    rs = F.Side([m.view(48, 64) for m in rs.means], [m.view(48, 64) for m in rs.m2s], rs.n, rs.q, rs.sign)
    g = torch.randn(48, 64, generator=gen)
    want, _, wm, _, _ = ref_sgd([p.clone()], [g], [None], fs, rs, lr=0.1)
    mask = torch.empty(48, 64)
    F.masked_sgd_([p], [g], [], fs, rs, lr=0.1, masks=[mask], fused=True if COMPILED else False)
    assert torch.equal(mask, wm[0])
    torch.testing.assert_close(p, want[0], rtol=1e-6, atol=1e-7)


def test_fused_policy(monkeypatch):
    small, big = torch.zeros(10), torch.zeros(F.CPU_MIN_NUMEL)
    assert F.use_fused(False, big) is False
    if COMPILED:
        assert F.use_fused(None, small) is False and F.use_fused(None, big) is True
        assert F.use_fused(True, small) is True
    monkeypatch.setattr(F, "_BROKEN", {"cpu": "test"})
    assert not F.available("cpu") and F.why_unavailable("cpu") in ("test", F._static_available("cpu"))
    assert F.use_fused(None, big) is False
    with pytest.raises(RuntimeError, match="fused=True"):
        F.use_fused(True, big)


def test_no_cxx_compiler_means_unavailable(monkeypatch):
    F._static_available.cache_clear()
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    try:
        assert not F.available("cpu") and "C++" in F.why_unavailable("cpu")
    finally:
        monkeypatch.undo()
        F._static_available.cache_clear()


def _break_compilation(monkeypatch, kernels=None):
    """Compiling fails (a backend error) for the kernels named in ``kernels`` (``None``: every one);
    the others compile as usual. No compilation failure is on record before."""
    from torch._dynamo.exc import BackendCompilerFailed

    compiled = F._compiled

    def maybe_broken(key):
        if kernels is not None and key[0] not in kernels:
            return compiled(key)

        def fn(*args, **kwargs):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("no compiler"), None)
        return fn

    monkeypatch.setattr(F, "_compiled", maybe_broken)
    monkeypatch.setattr(F, "_BROKEN", {})
    monkeypatch.setattr(F, "_static_available", lambda dt: None)


def test_compile_failure_warns_once_and_runs_eagerly(monkeypatch):
    _break_compilation(monkeypatch)
    gen = torch.Generator().manual_seed(14)
    fs, rs = sides(0.95, 0.05, gen)
    params, grads = randn(SIZES, gen), randn(SIZES, gen)
    want, *_ = ref_sgd(params, grads, [None] * 3, fs, rs, lr=0.1)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        F.masked_sgd_(params, grads, [], fs, rs, lr=0.1, fused=True)
    torch.testing.assert_close(params, want, rtol=1e-6, atol=1e-7)
    assert not F.available("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.masked_sgd_(params, grads, [], fs, rs, lr=0.1, fused=None)  # eager now, silently


def _fma_reference(p, d, s, a):
    """``fl(fl(s·d)·a + θ)`` rounded once: the product ``s·d`` is rounded to the dtype, its product with
    ``a`` is exact in float64 and the sum is rounded there and then to float32 (a double rounding that
    differs from one rounding only at float32 ties the sum lands on, not met by these inputs)."""
    prod = d * s
    a32 = torch.tensor(a, dtype=d.dtype)
    return (prod.double() * a32.double() + p.double()).to(p.dtype)


@needs_compiler
def test_add_scaled_is_the_rounded_product_then_one_fused_multiply_add():
    gen = torch.Generator().manual_seed(16)
    sizes = [3000, 1000, 257, 5]
    params, deltas = randn(sizes, gen), randn(sizes, gen)
    scales = [1 + torch.rand((), generator=gen) for _ in sizes]
    alphas = [-0.3, -0.3, 0.7, 1.3]  # a·s·d of the order of θ, a no power of 2: a·(s·d) rounds
    want = [_fma_reference(p, d, s, a) for p, d, s, a in zip(params, deltas, scales, alphas)]
    eager = [p.clone().add_(d * s, alpha=a) for p, d, s, a in zip(params, deltas, scales, alphas)]
    before_d = [d.clone() for d in deltas]
    got = [p.clone() for p in params]
    F.add_scaled_(got, deltas, scales, list(alphas))
    assert all(torch.equal(d, b) for d, b in zip(deltas, before_d))  # d is read, never written
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # one rounding after the product: a plain multiply-add would differ
    plain = [(p + a * (d * s)) for p, d, s, a in zip(params, deltas, scales, alphas)]
    differ = sum(int((g != q).sum()) for g, q in zip(got, plain))
    assert differ > 0.05 * sum(sizes)  # the inputs tell the two apart
    for g, e, p, d, s, a in zip(got, eager, params, deltas, scales, alphas):
        # the two eager kernels (d·s, then add with alpha): ATen's add is a fused multiply-add where
        # vectorised, so equal here; one rounding of the sum apart on a build where it is not
        tol = torch.finfo(p.dtype).eps * (p.abs() + (a * s * d).abs())
        assert bool(((g - e).abs() <= tol).all())
    # a new learning rate or scale is a new value, not a new graph
    before = graphs()
    F.add_scaled_(got, deltas, [s * 0.5 for s in scales], [0.3, 0.2, -0.2, -0.1])
    assert graphs() == before


@needs_compiler
def test_add_scaled_more_moves_than_a_chunk_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(19)
    dtypes = [torch.float32] * 9 + [torch.float64, torch.float32]  # chunks of 8, 1, then 1 and 1
    params = [torch.randn(50 + k, generator=gen).to(dt) for k, dt in enumerate(dtypes)]
    deltas = [torch.randn(50 + k, generator=gen).to(dt) for k, dt in enumerate(dtypes)]
    scales = [(1 + torch.rand((), generator=gen)).to(dt) for dt in dtypes]
    alphas = [-0.3 - 0.01 * k for k in range(len(dtypes))]
    # float32: the float64 reference is exact; float64: the eager kernels, within one rounding of the sum
    want = [_fma_reference(p, d, s, a) if p.dtype == torch.float32 else p.clone().add_(d * s, alpha=a)
            for p, d, s, a in zip(params, deltas, scales, alphas)]
    tols = [torch.finfo(p.dtype).eps * (p.abs() + (a * s * d).abs())
            for p, d, s, a in zip(params, deltas, scales, alphas)]
    F.add_scaled_(params, deltas, scales, alphas)
    for k, (p, w, tol) in enumerate(zip(params, want, tols)):
        if p.dtype == torch.float32:
            assert torch.equal(p, w), k
        else:
            assert bool(((p - w).abs() <= tol).all()), k


def test_add_scaled_runs_eagerly_where_it_cannot_compile():
    gen = torch.Generator().manual_seed(17)
    p16 = torch.randn(300, generator=gen).to(torch.bfloat16)
    d16 = (torch.randn(300, generator=gen) * 1e-2).to(torch.bfloat16)
    pt = torch.randn(40, 30, generator=gen).t()  # not contiguous
    dt = torch.randn(40, 30, generator=gen).t()
    s16, s32 = torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(1.25)
    want = [p16.clone().add_(d16 * s16, alpha=-0.1), pt.clone().add_(dt * s32, alpha=0.2)]
    got = [p16.clone(), pt.clone()]
    F.add_scaled_(got, [d16, dt], [s16, s32], [-0.1, 0.2])
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # the same two eager kernels
    with pytest.raises(ValueError, match="scales has 1 entries"):
        F.add_scaled_(got, [d16, dt], [s16], [-0.1, 0.2])


def test_a_failed_move_compilation_leaves_the_other_kernels_on(monkeypatch):
    _break_compilation(monkeypatch, kernels={"move"})
    gen = torch.Generator().manual_seed(18)
    params, deltas = randn([400, 50], gen), randn([400, 50], gen, scale=1e-2)
    scales = [torch.tensor(2.0), torch.tensor(0.5)]
    want = [p.clone().add_(d * s, alpha=-0.1) for p, d, s in zip(params, deltas, scales)]
    with pytest.warns(RuntimeWarning, match="'move' failed"):
        F.add_scaled_(params, deltas, scales, [-0.1, -0.1])
    assert all(torch.equal(p, w) for p, w in zip(params, want))  # the eager kernels instead
    assert F.available("cpu") and "cpu:move" in F._BROKEN  # the step's own kernels stay compiled


def test_validation():
    gen = torch.Generator().manual_seed(15)
    fs, rs = sides(0.95, 0.05, gen)
    params, grads = randn(SIZES, gen), randn(SIZES, gen)
    with pytest.raises(ValueError, match="grads has 2 entries"):
        F.masked_sgd_(params, grads[:2], [], fs, rs, lr=0.1, fused=False)
    with pytest.raises(ValueError, match="Nesterov"):
        F.masked_sgd_(params, grads, [None] * 3, fs, rs, lr=0.1, nesterov=True, fused=False)
    with pytest.raises(ValueError, match="rescale"):
        F.masked_sgd_(params, grads, [], fs, rs, lr=0.1, rescale="length", fused=False)
    with pytest.raises(ValueError, match="max_scale"):
        F.masked_sgd_(params, grads, [], fs, rs, lr=0.1, rescale="norm", max_scale=0.5, fused=False)
    with pytest.raises(ValueError, match="direction"):
        F.masked_sgd_(params, None, [], fs, rs, lr=0.1, fused=False)
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        F.masked_adam_(params, grads, params, params, None, [torch.tensor(0.0)] * 3, fs, rs, lr=0.1, amsgrad=True,
                       fused=False)
    with pytest.raises(ValueError, match="norms are missing"):
        F.scale_from_sums("norm", [F.StepSums(torch.tensor(1.0))], [3], 10.0)
