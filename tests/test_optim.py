"""ProbablyAlignedSGD / ProbablyAlignedAdam against torch.optim and per-sample references."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import (
    HookEngine,
    ProbablyAlignedAdam,
    ProbablyAlignedAdamW,
    ProbablyAlignedSGD,
    normal_quantile,
)

from .helpers import FixedEngine, loop_moments, random_batches, reference_z, tiny_mlp


_mlp, _batches = tiny_mlp, random_batches


def _neggrad_backward(model, fb, rb):
    (F.cross_entropy(model(rb[0]), rb[1]) - F.cross_entropy(model(fb[0]), fb[1])).backward()


SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(momentum=0.5, weight_decay=0.01, maximize=True),
]
ADAM_CONFIGS = [
    dict(),
    dict(weight_decay=0.05),
    dict(amsgrad=True, betas=(0.8, 0.99)),
    dict(weight_decay=0.05, decoupled_weight_decay=True),
    dict(weight_decay=0.05, amsgrad=True, maximize=True),
]


def _torch_twin(kind, params, cfg, foreach):
    cfg = dict(cfg)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, foreach=foreach, **cfg)
    if cfg.pop("decoupled_weight_decay", False):
        return torch.optim.AdamW(params, lr=0.01, foreach=foreach, **cfg)
    return torch.optim.Adam(params, lr=0.01, foreach=foreach, **cfg)


def _ours(kind, model, cfg, foreach, **kw):
    cls, lr = (ProbablyAlignedSGD, 0.05) if kind == "sgd" else (ProbablyAlignedAdam, 0.01)
    return cls(model.parameters(), lr=lr, model=model, foreach=foreach, **cfg, **kw)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kind, cfg", [("sgd", c) for c in SGD_CONFIGS] + [("adam", c) for c in ADAM_CONFIGS]
)
def test_unmasked_follows_torch_optim(kind, cfg, foreach):
    ours_model, ref_model = _mlp(), _mlp()
    ours = _ours(kind, ours_model, cfg, foreach, confidence=None)
    ref = _torch_twin(kind, ref_model.parameters(), cfg, foreach)
    for step in range(60):
        fb, rb = _batches(step)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            _neggrad_backward(model, fb, rb)
        ours.step(forget=fb, retain=rb)
        ref.step()
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert ours.diagnostics.kept_fraction == 1.0
    # the state is torch.optim's: same keys, same values
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        s, t = ours.state[p], ref.state[q]
        assert set(s) == set(t)
        for k in s:
            torch.testing.assert_close(s[k], t[k], atol=1e-6, rtol=0)


def test_adamw_class_follows_torch_adamw():
    a, b = _mlp(), _mlp()
    ours = ProbablyAlignedAdamW(a.parameters(), lr=0.01, model=a, confidence=None)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01)
    for step in range(30):
        fb, rb = _batches(step)
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kind, cfg",
    [("sgd", dict(momentum=0.9, weight_decay=0.1)), ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
     ("adam", dict(weight_decay=0.1)), ("adam", dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True))],
)
def test_frozen_coordinates_never_move(kind, cfg, foreach):
    model, ref_model = _mlp(), _mlp()
    gen = torch.Generator().manual_seed(3)
    frozen = [torch.rand(p.shape, generator=gen) < 0.5 for p in model.parameters()]
    # the unscaled step lr·m⊙u (the step-length option has its own tests in test_rescale.py)
    # (FixedEngine reports no losses: no retain guard)
    opt = _ours(kind, model, cfg, foreach, confidence=0.3, engine=FixedEngine(frozen), rescale=None, retain_guard=None)
    ref = _torch_twin(kind, ref_model.parameters(), cfg, foreach)
    start = [p.detach().clone() for p in model.parameters()]
    fb, rb = _batches(0)
    for _ in range(25):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), ref_model.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(forget=fb, retain=rb)
        ref.step()
    kept = sum((~f).sum().item() for f in frozen) / sum(f.numel() for f in frozen)
    assert opt.diagnostics.kept_fraction == pytest.approx(kept)
    for p, p0, q, f in zip(model.parameters(), start, ref_model.parameters(), frozen):
        assert torch.equal(p[f], p0[f]), "a masked-out coordinate moved"
        # the free coordinates follow torch.optim exactly: the state evolved as the base optimizer's
        torch.testing.assert_close(p[~f], q[~f], atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [0.5, 0.8])
@pytest.mark.parametrize("foreach", [False, True])
def test_masked_sgd_step_equals_independent_composition(c, foreach):
    """p_new = p − lr·m⊙u with u from torch.optim.SGD and m from per-sample-loop z-scores."""
    model = _mlp(1)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True,
                             model=model, confidence=c, foreach=foreach, rescale=None)
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    params, tparams = list(model.parameters()), list(twin.parameters())
    q = normal_quantile(c)
    mismatched = kept = total = 0
    for step in range(4):
        fb, rb = _batches(10 + step)
        with torch.no_grad():
            for t, p in zip(tparams, params):
                t.copy_(p)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
        old = [p.detach().clone() for p in params]
        ref.step()  # twin moves by −lr·u with the same momentum history
        _, mf, qf = loop_moments(model, params, *fb)
        _, mr, qr = loop_moments(model, params, *rb)
        opt.step(forget=fb, retain=rb)
        for i, p in enumerate(params):
            lr_u = (old[i] - tparams[i].detach()).double()
            s = torch.sign(lr_u)
            m = (s != 0) & (reference_z(-s, mf[i], qf[i], 10) > q) & (reference_z(s, mr[i], qr[i], 16) > q)
            expected = old[i].double() - m.double() * lr_u
            mismatched += ((p.double() - expected).abs() > 1e-6).sum().item()
            kept += m.sum().item()
            total += m.numel()
        for p, t in zip(params, tparams):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[t]["momentum_buffer"])
    assert 0.02 < kept / total < 0.9, kept / total
    assert mismatched <= 2, mismatched  # float32 vs float64 statistics at the threshold


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_foreach_equals_single_tensor_masked(kind):
    cfg = dict(momentum=0.9, weight_decay=0.01) if kind == "sgd" else dict(weight_decay=0.01, amsgrad=True)
    models = [_mlp(), _mlp()]
    opts = [_ours(kind, m, cfg, fe, confidence=0.6) for m, fe in zip(models, (False, True))]
    for step in range(5):
        fb, rb = _batches(step)
        for m, o in zip(models, opts):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
            o.step(forget=fb, retain=rb)
    assert opts[0].diagnostics.kept_fraction == pytest.approx(opts[1].diagnostics.kept_fraction)
    assert 0 < opts[0].diagnostics.kept_fraction < 1
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_default_direction_is_neggrad_of_batch_means():
    model = _mlp(2)
    fb, rb = _batches(7)
    params = list(model.parameters())
    _, mf, _ = loop_moments(model, params, *fb)
    _, mr, _ = loop_moments(model, params, *rb)
    old = [p.detach().clone() for p in params]
    opt = ProbablyAlignedSGD(params, lr=0.5, model=model, confidence=None)
    opt.step(forget=fb, retain=rb)
    assert opt.diagnostics.direction == "stats"
    for p, p0, a, b in zip(params, old, mr, mf):
        torch.testing.assert_close(p.double(), p0.double() - 0.5 * (a - b), atol=1e-6, rtol=0)
    # GA: retain_weight = 0
    model2 = _mlp(2)
    opt2 = ProbablyAlignedSGD(model2.parameters(), lr=0.5, model=model2, confidence=None, retain_weight=0.0)
    opt2.step(forget=fb, retain=rb)
    for p, p0, b in zip(model2.parameters(), old, mf):
        torch.testing.assert_close(p.double(), p0.double() + 0.5 * b, atol=1e-6, rtol=0)
    # the mean gradient of a mean-reduced loss is the ordinary batch gradient
    model.zero_grad()
    F.cross_entropy(_mlp(2)(fb[0]), fb[1])  # no effect on model
    assert all(p.grad is None for p in model.parameters())


def test_diagnostics_kept_fraction_losses_and_not_in_state_dict():
    model = _mlp()
    fb, rb = _batches(1)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, confidence=0.5)
    assert opt.diagnostics is None
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(forget=fb, retain=rb)
    d = opt.diagnostics
    moved = sum((p != b).sum().item() for p, b in zip(model.parameters(), before))
    total = sum(p.numel() for p in model.parameters())
    assert d.kept_fraction == pytest.approx(moved / total, abs=2 / total)  # a kept u may round to 0 move
    assert d.n_forget == 10 and d.n_retain == 16 and not d.skipped
    model.eval()
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
        assert d.forget_loss == pytest.approx(F.cross_entropy(model(fb[0]), fb[1]).item(), rel=1e-5)
        assert d.retain_loss == pytest.approx(F.cross_entropy(model(rb[0]), rb[1]).item(), rel=1e-5)
    sd = opt.state_dict()
    assert "diagnostics" not in str(sd.keys()) and all("kept" not in k for g in sd["param_groups"] for k in g)
    torch.save(sd, __import__("io").BytesIO())  # serialisable: no model/loss_fn inside


def test_param_groups_with_own_confidence():
    model = _mlp()
    fb, rb = _batches(2)
    opt = ProbablyAlignedSGD(
        [{"params": model[0].parameters(), "confidence": None}, {"params": model[2].parameters()}],
        lr=0.1, model=model, confidence=0.5,
    )
    opt.step(forget=fb, retain=rb)
    per = opt.diagnostics.kept_fraction_per_group
    assert per[0] == 1.0 and 0 < per[1] < 1


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_dict_round_trip_and_torch_compatibility(kind):
    cfg = dict(momentum=0.9) if kind == "sgd" else dict(amsgrad=True)
    a = _mlp()
    opt = _ours(kind, a, cfg, False, confidence=0.6)
    for step in range(3):
        fb, rb = _batches(step)
        opt.zero_grad()
        _neggrad_backward(a, fb, rb)
        opt.step(forget=fb, retain=rb)
    b = copy.deepcopy(a)
    opt_b = _ours(kind, b, cfg, False, confidence=0.6)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        fb, rb = _batches(step)
        for m, o in ((a, opt), (b, opt_b)):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
            o.step(forget=fb, retain=rb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # a torch.optim state_dict loads into ours (and vice versa) and the runs continue identically
    c, d = _mlp(), _mlp()
    ref = _torch_twin(kind, c.parameters(), cfg, False)
    for step in range(3):
        fb, rb = _batches(step)
        ref.zero_grad()
        _neggrad_backward(c, fb, rb)
        ref.step()
    d.load_state_dict(c.state_dict())
    ours = _ours(kind, d, cfg, False, confidence=None)
    sd = copy.deepcopy(ref.state_dict())  # load_state_dict would share the tensors
    sd["param_groups"] = [dict(g, **{k: ours.param_groups[0][k] for k in ours.param_groups[0] if k not in g})
                          for g in sd["param_groups"]]
    ours.load_state_dict(sd)
    back = _torch_twin(kind, _mlp().parameters(), cfg, False)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # extra keys are carried along harmlessly
    for step in range(3, 8):
        fb, rb = _batches(step)
        for m, o in ((c, ref), (d, ours)):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
            o.step()
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_lr_scheduler_drives_lr():
    a, b = _mlp(), _mlp()
    ours = ProbablyAlignedSGD(a.parameters(), lr=0.1, momentum=0.9, model=a, confidence=None)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    for step in range(10):
        fb, rb = _batches(step)
        for m, o, s in ((a, ours, s1), (b, ref, s2)):
            o.zero_grad()
            _neggrad_backward(m, fb, rb)
            o.step()
            s.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_stage_and_closure_only_trainer():
    model = _mlp()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, confidence=0.5)
    fb, rb = _batches(4)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = -F.cross_entropy(model(fb[0]), fb[1])
        loss.backward()
        return loss

    opt.stage(forget=fb, retain=rb)
    loss = opt.step(closure)
    assert calls and torch.is_tensor(loss)
    d = opt.diagnostics
    assert d.direction == "grad" and d.n_forget == 10 and d.n_retain == 16 and d.kept_fraction < 1
    with pytest.warns(UserWarning, match="not masked"):
        opt.step(closure)  # staged batches are used once
    assert opt.diagnostics.n_forget == 0 and opt.diagnostics.kept_fraction == 1.0


# ---------------------------------------------------------------------------------------------- bad input
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_untouched(model, opt, snap):
    params, sd = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for kk, v in sd["state"][k].items():
            assert torch.equal(now["state"][k][kk], v)


def _stepped_opt(kind="sgd"):
    model = _mlp()
    opt = _ours(kind, model, dict(momentum=0.9) if kind == "sgd" else {}, False)
    fb, rb = _batches(0)
    opt.zero_grad()
    _neggrad_backward(model, fb, rb)
    opt.step(forget=fb, retain=rb)
    opt.zero_grad()
    _neggrad_backward(model, fb, rb)
    return model, opt, fb, rb


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize(
    "forget, retain, err, msg",
    [
        ((torch.randn(5, 6), torch.zeros(4, dtype=torch.long)), None, ValueError, "batch size"),
        ((torch.randn(0, 6), torch.zeros(0, dtype=torch.long)), None, ValueError, "empty"),
        (None, (torch.randn(1, 6), torch.zeros(1, dtype=torch.long)), ValueError, "1 sample"),
        ((torch.randn(5, 6),), None, TypeError, "pair"),
        (None, (torch.randn(4, 7), torch.zeros(4, dtype=torch.long)), RuntimeError, "vmap|shape"),
    ],
)
def test_bad_batches_leave_everything_untouched(kind, forget, retain, err, msg):
    model, opt, fb, rb = _stepped_opt(kind)
    snap = _snapshot(model, opt)
    with pytest.raises(err, match=msg):
        opt.step(forget=forget if forget is not None else fb, retain=retain if retain is not None else rb)
    _assert_untouched(model, opt, snap)


def test_single_sample_allowed_at_half_confidence():
    model = _mlp()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, confidence=0.5)
    fb, rb = _batches(0, n_f=1, n_r=1)
    opt.step(forget=fb, retain=rb)
    assert not opt.diagnostics.skipped and opt.diagnostics.n_forget == 1


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.2, -0.5, True, "0.9"])
def test_confidence_validation(bad):
    model = _mlp()
    for key in ("confidence", "forget_confidence", "retain_confidence"):
        with pytest.raises(ValueError, match=key):
            ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, **{key: bad})
    opt = ProbablyAlignedSGD(model[0].parameters(), lr=0.1, model=model)
    with pytest.raises(ValueError, match="confidence"):
        opt.add_param_group({"params": model[2].parameters(), "confidence": bad})


def test_constructor_validation():
    model = _mlp()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        ProbablyAlignedSGD(itertools.chain(model.parameters(), other.parameters()), lr=0.1, model=model)
    with pytest.raises(TypeError, match="nn.Module"):
        ProbablyAlignedAdam(model.parameters(), model="model")
    with pytest.raises(ValueError, match="learning rate"):
        ProbablyAlignedSGD(model.parameters(), lr=-1.0, model=model)
    with pytest.raises(ValueError, match="Nesterov"):
        ProbablyAlignedSGD(model.parameters(), lr=0.1, nesterov=True, model=model)
    with pytest.raises(ValueError, match="beta"):
        ProbablyAlignedAdam(model.parameters(), betas=(1.0, 0.9), model=model)
    with pytest.raises(ValueError, match="quantile"):
        ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, quantile="cauchy")
    with pytest.raises(ValueError, match="fused"):
        ProbablyAlignedAdam(model.parameters(), model=model, fused="yes")


def test_sparse_gradients_rejected():
    emb = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    opt = ProbablyAlignedSGD(emb.parameters(), lr=0.1, model=emb)
    x, y = torch.randint(0, 10, (4, 2)), torch.randint(0, 2, (4,))
    F.cross_entropy(emb(x), y).backward()
    snap = _snapshot(emb, opt)
    with pytest.raises(ValueError, match="sparse"):
        opt.step(forget=(x, y), retain=(x, y))
    _assert_untouched(emb, opt, snap)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_skip_the_step(kind, bad):
    model, opt, fb, rb = _stepped_opt(kind)
    next(model.parameters()).grad[0, 0] = bad
    snap = _snapshot(model, opt)
    opt.step(forget=fb, retain=rb)
    _assert_untouched(model, opt, snap)
    d = opt.diagnostics
    assert d.skipped and "non-finite" in d.reason


def test_non_finite_statistics_skip_the_step():
    model, opt, fb, rb = _stepped_opt()
    bad_f = (fb[0].clone(), fb[1])
    bad_f[0][0, 0] = float("nan")
    snap = _snapshot(model, opt)
    opt.step(forget=bad_f, retain=rb)
    _assert_untouched(model, opt, snap)
    assert opt.diagnostics.skipped


def test_no_batches_no_grads_is_a_noop():
    model = _mlp()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.diagnostics.direction == "none"


@pytest.mark.parametrize("c", [0.5, 0.7, 0.8])
def test_masked_default_direction_matches_loop_reference(c):
    """The default step (statistics direction; the hook engine hands the mask Σg² in place of M2, read
    with an adjusted threshold) against float64 per-sample loops and SGD written out by hand."""
    model = _mlp(3)
    params = list(model.parameters())
    opt = ProbablyAlignedSGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, model=model, confidence=c,
                             rescale=None)
    q = normal_quantile(c)
    bufs = [None] * len(params)
    mismatched = kept = total = 0
    for step in range(3):
        fb, rb = _batches(40 + step)
        _, mf, qf = loop_moments(model, params, *fb)
        _, mr, qr = loop_moments(model, params, *rb)
        old = [p.detach().double().clone() for p in params]
        opt.step(forget=fb, retain=rb)
        for i, p in enumerate(params):
            g = mr[i] - mf[i] + 0.01 * old[i]
            bufs[i] = g if bufs[i] is None else 0.9 * bufs[i] + g
            s = torch.sign(bufs[i])
            m = (s != 0) & (reference_z(-s, mf[i], qf[i], 10) > q) & (reference_z(s, mr[i], qr[i], 16) > q)
            expected = old[i] - 0.1 * m.double() * bufs[i]
            mismatched += ((p.double() - expected).abs() > 1e-6).sum().item()
            kept += m.sum().item()
            total += m.numel()
    assert opt.diagnostics.direction == "stats"
    assert 0.02 < kept / total < 0.95, kept / total
    assert mismatched <= 2, mismatched  # float32 vs float64 statistics at the threshold


@pytest.mark.parametrize("options", [dict(confidence=0.9), dict(), dict(confidence=0.9, retain_confidence=0.2)])
def test_square_sums_path_equals_m2_path(options):
    """An engine without ``_pair_sq`` (M2 statistics) gives the same steps as the hook engine's Σg²,
    for thresholds q > 0 and q < 0 (the default retain test)."""

    class M2Only:
        def __init__(self):
            self.inner = HookEngine()

        def __call__(self, *args):
            return self.inner(*args)

        def pair(self, *args):
            return self.inner.pair(*args)

    models = [_mlp(5), _mlp(5)]
    opts = [ProbablyAlignedSGD(m.parameters(), lr=0.2, momentum=0.9, model=m, engine=e, **options)
            for m, e in zip(models, (None, M2Only()))]
    assert opts[0]._hard_tests_only()  # the hook engine hands Σg²
    for step in range(4):
        fb, rb = _batches(60 + step)
        for o in opts:
            o.step(forget=fb, retain=rb)
        assert opts[0].diagnostics.kept_fraction == pytest.approx(opts[1].diagnostics.kept_fraction, abs=2e-3)
    assert 0 < opts[0].diagnostics.kept_fraction < 1
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


def test_finite_check_confirms_overflowing_sums_exactly():
    """The guard sums each tensor; finite values whose sum overflows are confirmed finite entry by
    entry (the step goes on), a single NaN or ±Inf anywhere is caught."""
    from masked_optim.optim.base import all_finite as _all_finite

    big = torch.full((4,), 3e38)
    assert _all_finite([big, torch.ones(3)]) and _all_finite([]) and _all_finite([torch.empty(0)])
    assert _all_finite([big.double(), torch.ones(2)])  # mixed dtypes
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[2] = bad
        assert not _all_finite([torch.ones(3), t])
    assert not _all_finite([torch.tensor([float("inf"), -float("inf")])])  # inf − inf: NaN sum
