"""The step's finite check with the layer rules' certificates (Rule.finite, GradStats.finite).

A certificate may only say "finite" when the mean is finite: checked against the means themselves
(``torch.isfinite``, the independent reference) on inputs from ordinary to near the float range, with
NaN and inf. And the optimizer must still catch a non-finite mean whenever a certificate does not
hold, leaving the model and its state untouched."""

import pytest
import torch
from torch import nn

from masked_optim import HookEngine, ProbablyAlignedSGD, rule_for, taps
from masked_optim.stats import GradStats


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e12, 1e17, 1e18, 1e19, 1e20])
@pytest.mark.parametrize("k, n", [(1, 4), (2, 8), (2, 3)])
def test_a_certificate_only_holds_for_finite_means(scale, k, n):
    g = torch.Generator().manual_seed(int(scale) % 1000 + k * 10 + n)
    layer = nn.Linear(7, 5)
    rule = rule_for(layer)
    for trial in range(20):
        a = torch.randn(k * n, 7, generator=g) * scale
        d = torch.randn(k * n, 5, generator=g) * scale
        if trial % 5 == 4:
            (a if trial % 2 else d)[0, 0] = float("nan") if trial % 3 else float("inf")
        cert = bool(rule.finite(layer, a, d))
        stacked = rule.segments(layer, a, d, k)
        if cert:
            for mean, _ in stacked.values():
                assert torch.isfinite(mean).all()
                # and within a quarter of the range (rounding aside), so that μ_r − μ_f is finite too
                assert (mean.abs() <= torch.finfo(mean.dtype).max / 4 * (1 + 1e-3)).all()
        if not (torch.isfinite(a).all() and torch.isfinite(d).all()):
            assert not cert
        elif scale <= 1e12:
            assert cert  # ordinary values are certified


def test_the_engine_certifies_only_large_rule_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 3))
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 512, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]
    f, r = HookEngine().pair(model, params, *batches, sq=True)
    for stats in (f, r):
        assert stats.finite is not None
        big = [i for i, p in enumerate(params) if p.numel() >= taps.CERTIFY_MIN_NUMEL // 2]
        for i, c in enumerate(stats.finite):
            if i in (0, 1):  # the first layer: 512·512 + 512 ≥ CERTIFY_MIN_NUMEL elements
                assert c is not None and bool(c)
            else:
                assert c is None
        assert big == [0]
    one = HookEngine()(model, params, batches[0])  # a single batch, chunk by chunk: no certificates
    assert one.finite is None


class _Engine:
    """Statistics with a chosen certificate and a chosen (possibly non-finite) forget mean."""

    def __init__(self, bad: bool, certified: bool):
        self.bad, self.certified = bad, certified

    def __call__(self, model, params, batch, loss_fn=None):
        forget = bool(batch[0][0, 0] > 0)  # the forget batch: first input positive
        # significant means that agree with a gradient of ones: −1 on the forget side, +1 on the retain side
        means = [torch.full_like(p, -1.0 if forget else 1.0) for p in params]
        if self.bad and forget:
            means[0][0, 0] = float("inf")
        cert = [torch.tensor(self.certified) for _ in params]
        return GradStats(batch[0].shape[0], means, [torch.full_like(p, 1e-6) for p in params],
                         torch.tensor(1.0), finite=cert)


@pytest.mark.parametrize("certified", [False, True])
def test_a_failed_certificate_falls_back_to_the_means(certified):
    model = nn.Linear(4, 3)
    forget = (torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    retain = (-torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model,
                             engine=_Engine(bad=True, certified=certified), retain_guard=None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(forget=forget, retain=retain)
    moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if certified:  # a (wrong) certificate is trusted: the contract of Rule.finite
        assert moved
    else:  # the inf in the forget mean is found: nothing moves, no state
        assert not moved and not opt.state
        assert opt.diagnostics.skipped


def test_a_certified_clean_step_is_the_uncertified_step():
    steps = []
    for certified in (False, True):
        model = nn.Linear(4, 3)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model,
                                 engine=_Engine(bad=False, certified=certified), retain_guard=None)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(forget=(torch.ones(4, 4), torch.zeros(4, dtype=torch.long)),
                 retain=(-torch.ones(4, 4), torch.zeros(4, dtype=torch.long)))
        steps.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*steps):
        assert torch.equal(a, b)
