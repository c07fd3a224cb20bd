"""The optimizers' fused step (``fused=True``: one compiled pass per tensor, masked_optim.fused) against
their eager step (``fused=False``): the same masks and kept counts, parameters and state within float
tolerance, on SGD/Adam/AdamW with the defaults (retain guard, ``rescale="norm"``) and other options,
and no recompilation across a learning-rate schedule."""

import copy

import pytest
import torch
from torch import nn

from masked_optim import ProbablyAlignedAdam, ProbablyAlignedAdamW, ProbablyAlignedSGD, fused

from .helpers import random_batches

needs_compiler = pytest.mark.skipif(not fused.available("cpu"), reason=str(fused.why_unavailable("cpu")))


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


CASES = [
    (ProbablyAlignedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (ProbablyAlignedSGD, dict(lr=0.1, momentum=0.9, nesterov=True, retain_guard=None, rescale=None)),
    (ProbablyAlignedSGD, dict(lr=0.05, soft=True, retain_guard=None)),
    (ProbablyAlignedAdam, dict(lr=1e-2, amsgrad=True)),
    (ProbablyAlignedAdamW, dict(lr=1e-2, rescale="count", max_scale=5.0)),
]


@needs_compiler
@pytest.mark.parametrize("cls, kw", CASES)
@pytest.mark.parametrize("direction", ["grad", "stats"])
def test_fused_step_equals_the_eager_step(cls, kw, direction):
    steps = []
    for flag in (False, True):
        model = _net()
        opt = cls(model.parameters(), model=model, fused=flag, **kw)
        kept = []
        for s in range(4):
            fb, rb = random_batches(s)
            opt.zero_grad()
            if direction == "grad":
                loss = torch.nn.functional.cross_entropy(model(rb[0]), rb[1]) - torch.nn.functional.cross_entropy(
                    model(fb[0]), fb[1])
                loss.backward()
            opt.step(forget=fb, retain=rb)
            d = opt.diagnostics
            kept.append((d.kept_fraction, d.step_fraction, d.direction))
        steps.append((model, opt, kept))
    (m_e, o_e, k_e), (m_f, o_f, k_f) = steps
    if kw.get("soft"):  # a soft mask's kept fraction is a float sum of its weights
        assert [k[1:] for k in k_e] == [k[1:] for k in k_f]
        assert [k[0] for k in k_f] == pytest.approx([k[0] for k in k_e], rel=1e-5)
    else:
        assert k_e == k_f  # the same masks (exact counts) and the same guard decisions
    for a, b in zip(m_e.parameters(), m_f.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(m_e.parameters(), m_f.parameters()):
        for key, va in o_e.state[pa].items():
            torch.testing.assert_close(o_f.state[pb][key], va, rtol=1e-5, atol=1e-6, msg=key)


@needs_compiler
def test_no_recompilation_across_a_learning_rate_schedule():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = _net(1)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    graphs = []
    for s in range(6):
        fb, rb = random_batches(10 + s)
        opt.step(forget=fb, retain=rb)
        sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] >= 1 and graphs[-1] == graphs[1]  # compiled by the second step, never again


def test_fused_none_is_eager_below_the_threshold_and_fused_true_is_checked():
    model = _net()
    small = next(model.parameters())
    assert small.numel() < fused.CPU_MIN_NUMEL and not fused.use_fused(None, small)
    if not fused.available("cpu"):
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, fused=True)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="fused=True"):
            opt.step(forget=random_batches(0)[0], retain=random_batches(0)[1])
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_compiler
def test_mask_off_ignores_fused_and_stays_torch_optim():
    model = _net()
    twin = copy.deepcopy(model)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, confidence=None, fused=True)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for s in range(3):
        fb, rb = random_batches(s)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(rb[0]), rb[1]).backward()
        opt.step(forget=fb, retain=rb)
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
