"""The step-length option (``rescale``) against hand computations: p_new = p − lr·s·m⊙u with u from
torch.optim, m a known (or per-sample-loop) mask and s computed here from its definition."""

import copy
import math

import pytest
import torch

from masked_optim import (
    ProbablyAlignedAdam,
    ProbablyAlignedAdamW,
    ProbablyAlignedSGD,
    normal_quantile,
    step_scale,
)

from .helpers import FixedEngine, loop_moments, random_batches, reference_z, tiny_mlp


_mlp, _batches = tiny_mlp, random_batches


def _hand_scale(ms, us, how, cap):
    """s from the definition, in float64 with Python arithmetic."""
    if how == "count":
        frac = sum(float(m.double().sum()) for m in ms) / sum(m.numel() for m in ms)
        return 1.0 / max(frac, 1.0 / cap)
    full = math.sqrt(sum(float((u.double() ** 2).sum()) for u in us))
    part = math.sqrt(sum(float(((m.double() * u.double()) ** 2).sum()) for m, u in zip(ms, us)))
    return 1.0 if part == 0 else min(full / part, cap)


KINDS = {
    "sgd": (ProbablyAlignedSGD, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05),
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05), "momentum_buffer"),
    "adam": (ProbablyAlignedAdam, lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05, amsgrad=True),
             dict(lr=0.01, weight_decay=0.05, amsgrad=True), "exp_avg"),
    "adamw": (ProbablyAlignedAdamW, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
              dict(lr=0.01, weight_decay=0.05), "exp_avg_sq"),
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "group", "global"])
@pytest.mark.parametrize("how, cap", [("count", 100.0), ("count", 1.5), ("norm", 100.0), ("norm", 1.2)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_rescaled_step_equals_hand_computation(kind, how, cap, scope, foreach):
    cls, make_ref, cfg, state_key = KINDS[kind]
    model = _mlp()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    # each tensor keeps a different share, so per-tensor, per-group and global factors all differ
    shares = [0.05, 0.3, 0.6, 0.9]
    frozen = [torch.rand(p.shape, generator=gen) >= s for p, s in zip(model.parameters(), shares)]
    params, tparams = list(model.parameters()), list(twin.parameters())
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], model=model, engine=FixedEngine(frozen),
              confidence=0.3, rescale=how, rescale_scope=scope, max_scale=cap, foreach=foreach, retain_guard=None, **cfg)
    ref = make_ref([{"params": tparams[:2]}, {"params": tparams[2:]}])
    fb, rb = _batches(0)
    ms = [(~f).float() for f in frozen]
    for _ in range(6):  # several steps: the moments/momentum evolve as torch.optim's
        with torch.no_grad():
            for t, p in zip(tparams, params):
                t.copy_(p)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, t, g in zip(params, tparams, grads):
            p.grad, t.grad = g.clone(), g.clone()
        old = [p.detach().clone() for p in params]
        ref.step()
        opt.step(forget=fb, retain=rb)
        lr = cfg["lr"]
        us = [(o - t.detach()) / lr for o, t in zip(old, tparams)]  # torch.optim's own update
        if scope == "tensor":
            scales = [_hand_scale([m], [u], how, cap) for m, u in zip(ms, us)]
        elif scope == "group":
            s1, s2 = _hand_scale(ms[:2], us[:2], how, cap), _hand_scale(ms[2:], us[2:], how, cap)
            scales = [s1, s1, s2, s2]
        else:
            scales = [_hand_scale(ms, us, how, cap)] * 4
        assert all(1.0 <= s <= cap for s in scales)
        for p, o, u, m, s in zip(params, old, us, ms, scales):
            expected = o.double() - lr * s * m.double() * u.double()
            torch.testing.assert_close(p.double(), expected, atol=1e-6 * cap, rtol=1e-5)
        for p, t in zip(params, tparams):
            torch.testing.assert_close(opt.state[p][state_key], ref.state[t][state_key])
    kept = sum(float(m.sum()) for m in ms) / sum(m.numel() for m in ms)
    assert opt.diagnostics.kept_fraction == pytest.approx(kept)  # the mask's share, not the scaled one


def test_cap_binds_and_scale_is_one_without_kept_coordinates():
    m = torch.zeros(1000)
    m[:3] = 1.0
    u = torch.randn(1000)
    assert float(step_scale([m], [u], "count", 100.0)) == pytest.approx(100.0)  # 0.3 % kept, floor 1 %
    assert float(step_scale([m], [u], "count", 1000.0)) == pytest.approx(1000 / 3, rel=1e-6)
    zero = torch.zeros(1000)
    assert float(step_scale([zero], [u], "norm", 100.0)) == 1.0
    assert float(step_scale([torch.ones(10)], [torch.randn(10)], "norm", 100.0)) == pytest.approx(1.0)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_scale"):
            step_scale([m], [u], "count", bad)
    with pytest.raises(ValueError, match="rescale"):
        step_scale([m], [u], "length", 10.0)


@pytest.mark.parametrize("foreach", [False, True])
def test_default_step_is_rescaled_hard_mask_of_per_sample_tests(foreach):
    """The optimizer as constructed with no mask option: p_new = p − lr·s·m⊙u with m from
    per-sample-loop z-scores (forget z_f > Φ⁻¹(0.95), retain z_r > Φ⁻¹(0.05)) and
    s = min(‖u‖/‖m⊙u‖, 100) per tensor; u is torch.optim.SGD's."""
    model = _mlp(1)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, foreach=foreach)
    g = opt.param_groups[0]
    assert (g["rescale"], g["rescale_scope"], g["max_scale"]) == ("norm", "tensor", 100.0)
    assert (opt._effective(g, "forget"), opt._effective(g, "retain")) == (0.95, 0.05)
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    params, tparams = list(model.parameters()), list(twin.parameters())
    qf, qr = normal_quantile(0.95), normal_quantile(0.05)
    mismatched = kept = total = 0
    for step in range(4):
        fb, rb = _batches(20 + step, n_f=24, n_r=32)
        with torch.no_grad():
            for t, p in zip(tparams, params):
                t.copy_(p)
        for m_, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (torch.nn.functional.cross_entropy(m_(rb[0]), rb[1])
             - torch.nn.functional.cross_entropy(m_(fb[0]), fb[1])).backward()
        old = [p.detach().clone() for p in params]
        ref.step()
        _, mf, m2f = loop_moments(model, params, *fb)
        _, mr, m2r = loop_moments(model, params, *rb)
        opt.step(forget=fb, retain=rb)
        for i, p in enumerate(params):
            lr_u = (old[i] - tparams[i].detach()).double()
            s = torch.sign(lr_u)
            m = (s != 0) & (reference_z(-s, mf[i], m2f[i], 24) > qf) & (reference_z(s, mr[i], m2r[i], 32) > qr)
            md = m.double()
            part = (md * lr_u).norm().item()
            scale = 1.0 if part == 0 else min(lr_u.norm().item() / part, 100.0)
            expected = old[i].double() - scale * md * lr_u
            mismatched += ((p.double() - expected).abs() > 1e-6 * scale).sum().item()
            kept += m.sum().item()
            total += m.numel()
    assert 0.0 < kept / total < 0.95, kept / total
    assert mismatched <= 2, mismatched  # float32 vs float64 statistics at the threshold


def test_confidence_given_applies_to_both_tests():
    """``confidence`` given (also None) sets both tests, as before the retain default existed; a side
    given its own confidence keeps it; a param group's own confidence applies to both of its tests."""
    model = _mlp()
    cases = [({}, (0.95, 0.05)), (dict(confidence=0.9), (0.9, 0.9)), (dict(confidence=None), (None, None)),
             (dict(confidence=0.9, retain_confidence=0.2), (0.9, 0.2)), (dict(retain_confidence=0.3), (0.95, 0.3)),
             (dict(retain_confidence=None), (0.95, 0.95))]  # None: as `confidence`
    for kw, expected in cases:
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, **kw)
        g = opt.param_groups[0]
        assert (opt._effective(g, "forget"), opt._effective(g, "retain")) == expected, kw
    opt = ProbablyAlignedSGD([{"params": model[0].parameters(), "confidence": None}, {"params": model[2].parameters()}],
                             lr=0.1, model=model)
    g0, g1 = opt.param_groups
    assert (opt._effective(g0, "forget"), opt._effective(g0, "retain")) == (None, None)
    assert (opt._effective(g1, "forget"), opt._effective(g1, "retain")) == (0.95, 0.05)


@pytest.mark.parametrize("how", ["count", "norm"])
def test_soft_mask_rescaled(how):
    """Soft weights w = Φ(z_r − q)·Φ(z_f − q) from per-sample-loop z-scores; p_new = p − lr·s·w⊙u."""
    model = _mlp(2)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, model=model, confidence=0.8, soft=True, rescale=how,
                             max_scale=50.0)
    fb, rb = _batches(3)
    params = list(model.parameters())
    old = [p.detach().clone() for p in params]
    opt.zero_grad()
    (torch.nn.functional.cross_entropy(model(rb[0]), rb[1])
     - torch.nn.functional.cross_entropy(model(fb[0]), fb[1])).backward()
    _, mf, m2f = loop_moments(model, params, *fb)
    _, mr, m2r = loop_moments(model, params, *rb)
    opt.step(forget=fb, retain=rb)
    q = normal_quantile(0.8)
    for i, (p, o) in enumerate(zip(params, old)):
        u = p.grad.double()  # no momentum: u is the gradient
        sg = torch.sign(u)
        w = (sg != 0).double() * torch.special.ndtr(reference_z(sg, mr[i], m2r[i], 16) - q) \
            * torch.special.ndtr(reference_z(-sg, mf[i], m2f[i], 10) - q)
        s = _hand_scale([w], [u], how, 50.0)
        assert s > 1.0
        torch.testing.assert_close(p.double(), o.double() - 0.05 * s * w * u, atol=1e-6, rtol=1e-5)


def test_certify_tests_the_rescaled_step():
    """With certify, the directions whose derivatives are tested are the rescaled per-tensor steps
    s_t·m_t⊙u_t (a per-tensor factor changes the whole step's direction, so it must be in them), and
    an accepted step applies exactly those."""
    model = _mlp(3)
    gen = torch.Generator().manual_seed(7)
    frozen = [torch.rand(p.shape, generator=gen) >= s for p, s in zip(model.parameters(), (0.05, 0.3, 0.6, 0.9))]
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, model=model, engine=FixedEngine(frozen), confidence=0.3,
                             rescale="norm", max_scale=20.0, certify=0.5 + 1e-9)
    seen = []
    real = opt._directional
    opt._directional = lambda params, tangents, batch: (seen.append([t.clone() for t in tangents]),
                                                         real(params, tangents, batch))[1]
    fb, rb = _batches(4, n_f=32, n_r=32)
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    old = [p.detach().clone() for p in model.parameters()]
    opt.step(forget=fb, retain=rb, check_retain=rb)
    ms = [(~f).float() for f in frozen]
    expected = [_hand_scale([m], [g], "norm", 20.0) * m * g for m, g in zip(ms, grads)]
    for t, e in zip(seen[0], expected):  # the first evaluation: the untightened mask
        torch.testing.assert_close(t.double(), e.double(), atol=1e-6, rtol=1e-5)
    if opt.diagnostics.certificate.action == "accepted":
        for p, o, e in zip(model.parameters(), old, expected):
            torch.testing.assert_close(p.double(), o.double() - 0.05 * e.double(), atol=1e-6, rtol=1e-5)


def test_rescale_options_validated_and_restored_from_state_dict():
    model = _mlp()
    for bad in (dict(rescale="length"), dict(rescale_scope="layer"), dict(max_scale=0.5), dict(max_scale=True),
                dict(max_scale=float("inf"))):
        with pytest.raises(ValueError):
            ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, **bad)
    # a torch.optim.SGD state dict has none of the mask keys: this optimizer's own settings, and the
    # next step runs (it raised KeyError: 'confidence')
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ours = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, rescale="count")
    ours.load_state_dict(plain.state_dict())
    g = ours.param_groups[0]
    assert (g["rescale"], g["rescale_scope"], g["max_scale"]) == ("count", "tensor", 100.0)
    assert (ours._effective(g, "forget"), ours._effective(g, "retain")) == (0.95, 0.05)
    fb, rb = _batches(1)
    ours.step(forget=fb, retain=rb)
    assert ours.diagnostics.direction == "stats" and 0 < ours.diagnostics.kept_fraction < 1
    # a state saved before the step-length option existed keeps the unscaled step it was taking
    old = ours.state_dict()
    for group in old["param_groups"]:
        for key in ("rescale", "rescale_scope", "max_scale"):
            del group[key]
    again = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    again.load_state_dict(old)
    assert again.param_groups[0]["rescale"] is None


def test_default_marker_survives_copies_and_pickles():
    import pickle

    from masked_optim.optim import DEFAULT

    assert copy.deepcopy(DEFAULT) is DEFAULT and pickle.loads(pickle.dumps(DEFAULT)) is DEFAULT
    model = _mlp()
    kwargs = copy.deepcopy({"confidence": DEFAULT, "retain_confidence": DEFAULT})
    g = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, **kwargs).param_groups[0]
    assert (g["confidence"], g["retain_confidence"]) == (0.95, 0.05)


def test_retain_guard_backs_off_the_step_until_the_retain_loss_is_within_the_guard():
    """retain_guard: the applied step is f·Δ, Δ the unguarded step, f the largest of 1, 1/2, …, 1/16
    whose retain-batch loss stays within the guard (0: undone), computed here by evaluating each
    candidate on a copy of the model; the optimizer state is the unguarded one."""
    fb, rb = _batches(9, n_f=32, n_r=32)
    seen = set()
    for lr, guard in ((5.0, 0.05), (0.5, 0.05), (50.0, 0.0)):
        model = _mlp(4)
        free = copy.deepcopy(model)  # the same step without the guard gives Δ
        kw = dict(lr=lr, momentum=0.9, confidence=0.6)
        opt = ProbablyAlignedSGD(model.parameters(), model=model, retain_guard=guard, **kw)
        ref = ProbablyAlignedSGD(free.parameters(), model=free, retain_guard=None, **kw)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            loss0 = torch.nn.functional.cross_entropy(model(rb[0]), rb[1]).item()
        opt.step(forget=fb, retain=rb)
        ref.step(forget=fb, retain=rb)
        deltas = [q.detach() - b for q, b in zip(free.parameters(), before)]
        expected = 0.0
        for f in (1.0, 0.5, 0.25, 0.125, 0.0625):
            probe = copy.deepcopy(free)
            with torch.no_grad():
                for p, b, d in zip(probe.parameters(), before, deltas):
                    p.copy_(b + f * d)
                if torch.nn.functional.cross_entropy(probe(rb[0]), rb[1]).item() <= loss0 + guard:
                    expected = f
                    break
        assert opt.diagnostics.step_fraction == expected, (lr, guard)
        seen.add(expected)
        for p, b, d in zip(model.parameters(), before, deltas):
            torch.testing.assert_close(p.detach(), b + expected * d, atol=1e-6, rtol=1e-5)
        for p, q in zip(model.parameters(), free.parameters()):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert 1.0 in seen and len(seen) >= 2, seen  # a full step and a backed-off one were both exercised
    model = _mlp()
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="retain_guard"):
            ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, retain_guard=bad)


@pytest.mark.parametrize("how, cap", [("norm", 100.0), ("norm", 1.5), ("count", 100.0), ("count", 2.0)])
def test_each_tensors_length_at_once_equals_one_at_a_time(how, cap):
    """mask.step_scale_each (the factors of several tensors in one elementwise pass) is step_scale of
    each tensor alone, bit for bit, in every dtype mix, with nothing kept, with u = 0, near the float
    range; and its factor is the definition's (_hand_scale)."""
    from masked_optim.mask import step_scale_each, step_scale_parts

    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        ms, us = [], []
        for j in range(1 + trial % 6):
            n = int(torch.randint(1, 3000, (1,), generator=g))
            dt = (torch.float32, torch.float64, torch.bfloat16)[(trial + j) % 3]
            u = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (trial % 9 * 4 - 16)).to(dt)
            m = (torch.rand(n, generator=g) < (j + 1) / 7).to(dt)
            if trial % 5 == 0:
                m.zero_()
            if trial % 7 == 0:
                u.zero_()
            ms.append(m)
            us.append(u)
        got = step_scale_each(ms, us, how, cap)
        for m, u, s in zip(ms, us, got):
            want = step_scale([m], [u], how, cap)
            assert s.dtype == want.dtype and s.shape == want.shape == ()
            assert torch.equal(s, want)
            if u.dtype != torch.bfloat16:
                assert float(s) == pytest.approx(_hand_scale([m], [u], how, cap), rel=1e-5)
        # what step_scale_parts hands on besides: the same factors, each ‖u‖² once (norm only) and the
        # m⊙u products only when asked for
        parts = step_scale_parts(ms, us, how, cap, keep_products=True)
        assert all(torch.equal(a, b) for a, b in zip(parts.scales, got))
        seen = sorted(j for pos, _ in parts.u_sq for j in pos)
        assert seen == (list(range(len(us))) if how == "norm" else [])
        for pos, full in parts.u_sq:
            for j, f in zip(pos, full.tolist()):
                ref = float(us[j].double().square().sum())
                assert f == pytest.approx(ref, rel=1e-5) or (math.isinf(f) and ref > 3e38)
        for m, u, mu in zip(ms, us, parts.products):
            assert (mu is not None and torch.equal(mu, m * u)) if how == "norm" else mu is None
        assert step_scale_parts(ms, us, how, cap).products == [None] * len(us)


def test_kept_counts_of_binary_masks_are_exact_sums():
    from masked_optim.optim.diagnostics import counts

    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(n, generator=g) < 0.3).to(dt) for n, dt in
             [(5, torch.float32), (70_000, torch.bfloat16), (1, torch.float64), (0, torch.float32)]]
    for binary in (False, True):
        got = counts(masks, binary)
        assert [int(c) for c in got] == [int(m.double().sum()) for m in masks]


def test_known_finite_marks_only_updates_whose_entries_are_all_finite():
    """step_lengths' known_finite: True only where every entry of u is finite (a NaN, an inf, or a
    square that overflows leaves it False), and the moves and plain updates it lets skip
    mask.finite — and the moves scaled from the step lengths' own m⊙u — are bit for bit those
    without it."""
    from masked_optim.mask import finite
    from masked_optim.optim.masking import GroupTests, Side, StepLengths, Update, apply_updates, moves_of, step_lengths

    g = torch.Generator().manual_seed(3)
    n, sizes = 16, [50, 40, 30, 20, 60]
    means = [torch.randn(k, generator=g) for k in sizes]
    m2s = [torch.rand(k, generator=g) * n for k in sizes]
    tests = GroupTests(Side(means, m2s, n, 0.5, -1), Side(means, m2s, n, -0.5, 1), False,
                       rescale=("norm", "tensor", 100.0))
    us = [torch.randn(k, generator=g) for k in sizes]
    us[1][3] = float("nan")
    us[2][0] = float("inf")
    us[3][:] = 3e30  # finite, but its squared norm overflows float32: not known
    params = [torch.randn(k, generator=g) for k in sizes]
    updates = [Update(tests, i, p, u, 0.1) for i, (p, u) in enumerate(zip(params, us))]
    ms = [tests.mask(i, u) for i, u in enumerate(us)]
    lengths = step_lengths(updates, ms)
    known = lengths.known_finite
    assert known == [True, False, False, False, True]
    assert all(bool(us[j].isfinite().all()) for j in range(len(us)) if known[j])
    assert lengths.products == [None] * len(updates)  # not asked for: freed
    # the same lengths with nothing known: every move goes through mask.finite
    plain = StepLengths(lengths.scales, [False] * len(updates), [None] * len(updates))
    for (_, d_known, _, _), (_, d_plain, _, _) in zip(moves_of(updates, ms, lengths), moves_of(updates, ms, plain)):
        assert torch.equal(d_known, d_plain)
    # the moves built from the step lengths' own m⊙u, scaled in place, are the same numbers — signed
    # zeros included (a dropped negative u gives −0 either way)
    kept = step_lengths(updates, ms, keep_products=True)
    assert kept.known_finite == known and all(p is not None for p in kept.products)
    reused = moves_of(updates, ms, kept)
    assert [d is p for (_, d, _, _), p in zip(reused, kept.products)] == known  # scaled in place where known
    for (_, d_reused, _, _), (_, d_plain, _, _) in zip(reused, moves_of(updates, ms, plain)):
        assert torch.equal(d_reused, d_plain)
        assert torch.equal(torch.signbit(d_reused[d_reused == 0]), torch.signbit(d_plain[d_plain == 0]))
    assert any(bool(torch.signbit(d[d == 0]).any()) for _, d, _, _ in moves_of(updates, ms, plain))
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    apply_updates([Update(tests, i, p, u, 0.1) for i, (p, u) in enumerate(zip(a, us))], ms, lengths)
    apply_updates([Update(tests, i, p, u, 0.1) for i, (p, u) in enumerate(zip(b, us))], ms, plain)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the reference of what the skip relies on: finite() returns a finite u unchanged
    assert torch.equal(finite(us[0]), us[0])
