"""The fused pass forms the statistics direction ``u = μ_r − μ_f`` itself (no eager pass writing u,
none reading it back for the finite check). The independent reference is the optimizers' eager
direction (``_stats_direction`` and the finite check on u), switched on by refusing the in-pass
direction: parameters, state and diagnostics must agree bit for bit, with fused and eager tensors
in one step, and a direction that would overflow must skip the step as the eager one does."""

import math

import pytest
import torch
from torch import nn

from masked_optim import ProbablyAlignedAdam, ProbablyAlignedSGD, fused
from masked_optim.optim import base
from masked_optim.stats import GradStats

from .helpers import random_batches

needs_compiler = pytest.mark.skipif(not fused.available("cpu"), reason=str(fused.why_unavailable("cpu")))


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _run(cls, kw, inside_allowed, monkeypatch, steps=4):
    model = _net()
    # the first layer compiled, the second eager: one step with both kinds of tensors
    groups = [{"params": model[0].parameters(), "fused": True}, {"params": model[2].parameters(), "fused": False}]
    opt = cls(groups, model=model, **kw)
    seen = []
    real = opt._direction_inside

    def spy(*args):
        out = real(*args) if inside_allowed else set()
        seen.append(len(out))
        return out
    monkeypatch.setattr(opt, "_direction_inside", spy)
    diags = []
    for s in range(steps):
        fb, rb = random_batches(s)
        opt.zero_grad()
        opt.step(forget=fb, retain=rb)
        d = opt.diagnostics
        diags.append((d.kept_fraction, d.kept_fraction_per_group, d.step_fraction, d.direction, d.skipped))
    return model, opt, diags, seen


@needs_compiler
@pytest.mark.parametrize("cls, kw", [
    (ProbablyAlignedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),  # the defaults: guard, rescale="norm"
    (ProbablyAlignedSGD, dict(lr=0.1, momentum=0.9, nesterov=True, retain_guard=None, rescale=None)),
    (ProbablyAlignedAdam, dict(lr=1e-2, amsgrad=True)),
])
def test_the_pass_forms_the_eager_direction_bit_for_bit(cls, kw, monkeypatch):
    m_in, o_in, d_in, seen_in = _run(cls, kw, True, monkeypatch)
    m_ref, o_ref, d_ref, seen_ref = _run(cls, kw, False, monkeypatch)
    assert all(n == 2 for n in seen_in)  # the fused layer's weight and bias took the in-pass direction
    assert all(n == 0 for n in seen_ref)
    assert d_in == d_ref
    for a, b in zip(m_in.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(m_in.parameters(), m_ref.parameters()):
        assert o_in.state[pa].keys() == o_ref.state[pb].keys()
        for key, va in o_in.state[pa].items():
            assert torch.equal(va, o_ref.state[pb][key]), key


def test_weights_other_than_one_keep_the_eager_direction():
    model = _net()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, forget_weight=0.5, fused=True)
    work = [(opt.param_groups[0], list(model.parameters()), None, [0, 1, 2, 3])]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    stats = GradStats(4, [torch.zeros_like(p) for p in model.parameters()],
                      [torch.zeros_like(p) for p in model.parameters()], torch.tensor(0.0))
    assert opt._direction_inside(work, index, stats, stats) == set()
    opt.forget_weight = 1.0
    assert opt._direction_inside(work, index, stats, stats) == {id(p) for p in model.parameters()}
    # statistics in another dtype than the parameter: the eager direction rounds to it first
    stats64 = GradStats(4, [m.double() for m in stats.mean], stats.m2, stats.loss)
    assert opt._direction_inside(work, index, stats64, stats) == set()


class _HugeMeans:
    """Finite means whose difference overflows float32: μ_f = −s, μ_r = +s."""

    def __init__(self, s, certified=None):
        self.s, self.certified = s, certified

    def __call__(self, model, params, batch, loss_fn=None):
        sign = 1.0 if bool(batch[0][0, 0] < 0) else -1.0  # retain inputs are negative
        means = [torch.full_like(p, sign * self.s) for p in params]
        finite = None if self.certified is None else [torch.tensor(self.certified) for _ in params]
        return GradStats(batch[0].shape[0], means, [torch.full_like(p, 1e-6) for p in params], torch.tensor(1.0),
                         finite=finite)


@needs_compiler
@pytest.mark.parametrize("s, skipped", [(2e38, True), (1e38, False), (3e37, False)])
def test_a_direction_that_overflows_skips_the_step_as_the_eager_one_does(s, skipped):
    forget = (torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    retain = (-torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        before = [p.detach().clone() for p in model.parameters()]
        opt = ProbablyAlignedSGD(model.parameters(), lr=1e-40, momentum=0.9, model=model, engine=_HugeMeans(s),
                                 retain_guard=None, rescale=None, fused=flag)
        opt.step(forget=forget, retain=retain)
        moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        results.append((opt.diagnostics.skipped, [p.detach().clone() for p in model.parameters()], moved,
                        sorted(k for st in opt.state.values() for k in st)))
    (skip_e, p_e, _, st_e), (skip_f, p_f, _, st_f) = results
    # 2e38 − (−2e38) overflows (the eager direction is inf: the step is skipped); 1e38 does not, but is
    # above a quarter of the range: the in-pass direction's bound fails and the eager route decides
    assert skip_e is skipped and skip_f is skipped
    assert st_e == st_f
    if skipped:
        assert not st_f and all(torch.equal(a, b) for a, b in zip(p_f, p_e))


def test_all_finite_bounds_have_no_second_opinion():
    x = [torch.ones(3)]
    assert base.all_finite(x, bounds=[torch.tensor(True)])
    assert not base.all_finite(x, bounds=[torch.tensor(True), torch.tensor(False)])
    assert not base.all_finite([torch.tensor([1.0, math.inf])], bounds=[torch.tensor(True)])


def test_direction_bounds_read_uncertified_means_and_trust_certificates():
    params = [torch.zeros(3), torch.zeros(2)]
    index = {id(p): i for i, p in enumerate(params)}
    q = torch.finfo(torch.float32).max / 4
    for value, holds in [(1.0, True), (q * 0.99, True), (q * 1.01, False), (math.nan, False), (-math.inf, False)]:
        stats = GradStats(2, [torch.tensor([0.0, value, 1.0]), torch.ones(2)], [torch.ones(3), torch.ones(2)],
                          torch.tensor(0.0))
        bounds = base.ProbablyAlignedOptimizer._direction_bounds({id(params[0])}, index, stats, None)
        assert len(bounds) == 1 and bool(bounds[0]) is holds
        certified = GradStats(2, stats.mean, stats.m2, stats.loss, finite=[torch.tensor(True), None])
        bounds = base.ProbablyAlignedOptimizer._direction_bounds({id(params[0])}, index, certified, None)
        assert len(bounds) == 1 and bool(bounds[0])  # the certificate is read, not the mean
