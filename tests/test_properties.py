"""Property-based checks (hypothesis) of the pure functions against their definitions."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masked_optim import Constraint, GradStats, chan_merge, feasibility_mask, feasibility_masks

from .helpers import reference_z

# values with exact zeros, ties and a wide dynamic range, as gradients have
values = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False).filter(
    lambda v: v == 0.0 or abs(v) > 1e-6))


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.lists(values, min_size=4, max_size=4), min_size=2, max_size=12),
    u=st.lists(values, min_size=4, max_size=4),
    q_f=st.sampled_from([0.0, 0.5, 1.64, 2.33, -0.8]),
    q_r=st.sampled_from([0.0, 0.25, 1.28, -0.3]),
)
def test_mask_equals_definition(rows, u, q_f, q_r):
    g = torch.tensor(rows, dtype=torch.float64)
    n = g.shape[0]
    half = n // 2 if n >= 4 else n
    gf, gr = g[:half], g[n - half:]

    def moments(x):
        m = x.mean(0)
        return m, ((x - m) ** 2).sum(0)

    (mf, qf), (mr, qr) = moments(gf), moments(gr)
    cf, cr = Constraint(mf, qf, gf.shape[0], q_f, -1), Constraint(mr, qr, gr.shape[0], q_r, +1)
    # an arbitrary update, and the NegGrad+ direction (aligned by construction, so that the
    # significance thresholds decide)
    for ut in (torch.tensor(u, dtype=torch.float64), mr - mf):
        zf = reference_z(-torch.sign(ut), mf, qf, gf.shape[0])
        zr = reference_z(torch.sign(ut), mr, qr, gr.shape[0])
        expected = ((ut != 0) & (zf > q_f) & (zr > q_r)).double()
        # a coordinate sitting exactly on a threshold may go either way in floating point
        on_edge = ((zf - q_f).abs() < 1e-9) | ((zr - q_r).abs() < 1e-9)
        for got in (feasibility_mask(ut, cf, cr), feasibility_masks([ut], [cf], [cr])[0]):
            assert torch.equal(got[~on_edge], expected[~on_edge]), (got, expected)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=2, max_size=30),
    cuts=st.lists(st.integers(1, 29), max_size=4),
)
def test_chan_merge_of_any_split_equals_whole_batch(rows, cuts):
    x = torch.tensor(rows, dtype=torch.float64).unsqueeze(1)
    bounds = sorted({c for c in cuts if c < len(rows)} | {0, len(rows)})

    def stats(part):
        m = part.mean(0)
        return GradStats(part.shape[0], [m], [((part - m) ** 2).sum(0)], part.sum() / part.shape[0])

    merged = None
    for a, b in zip(bounds, bounds[1:]):
        s = stats(x[a:b])
        merged = s if merged is None else chan_merge(merged, s)
    whole = stats(x)
    scale = max(1.0, float(x.abs().max()))
    assert merged.n == whole.n
    assert math.isclose(merged.mean[0].item(), whole.mean[0].item(), rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(merged.m2[0].item(), whole.m2[0].item(), rel_tol=1e-7, abs_tol=1e-7 * scale**2)
