"""The step workspace (masked_optim.workspace): buffers lent for one step and reused by the next.

Reusing buffers must change nothing but where the bytes live: an optimizer with ``reuse_buffers=True``
takes the same steps, bit for bit, as one with ``reuse_buffers=False`` (which allocates every
temporary afresh), on the statistics' batched path (equal batches), their one-batch-at-a-time path
(unequal batches), the fused step behind the retain guard and the statistics direction (which becomes
the momentum buffer on the first step and so must never be lent). ``workspace.MIN_BYTES`` is lowered
so that the small test models use the workspace at all."""

import copy
import pickle

import pytest
import torch
from torch import nn

from masked_optim import ProbablyAlignedAdamW, ProbablyAlignedSGD, fused, workspace
from masked_optim.workspace import Workspace, lending

from .helpers import random_batches

needs_compiler = pytest.mark.skipif(not fused.available("cpu"), reason=str(fused.why_unavailable("cpu")))


@pytest.fixture
def lend_everything(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))


def test_a_round_lends_distinct_buffers_and_the_next_round_reuses_them(lend_everything):
    ws = Workspace()
    with lending(ws):
        a = workspace.empty((3, 5), dtype=torch.float32, device=torch.device("cpu"))
        b = workspace.empty((3, 5), dtype=torch.float32, device=torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()  # two live temporaries never share memory
    with lending(ws):
        c = workspace.empty((3, 5), dtype=torch.float32, device=torch.device("cpu"))
        d = workspace.empty((3, 5), dtype=torch.float32, device=torch.device("cpu"))
        e = workspace.empty((7,), dtype=torch.float64, device=torch.device("cpu"))
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()}
    assert ws.nbytes == 2 * 15 * 4 + 7 * 8
    with lending(ws):  # a round that needs less: the rest is dropped
        f = workspace.empty((7,), dtype=torch.float64, device=torch.device("cpu"))
    assert f.data_ptr() == e.data_ptr()
    assert ws.nbytes == 7 * 8
    ws.clear()
    assert ws.nbytes == 0


def test_outside_a_lending_block_and_below_the_size_nothing_is_lent(monkeypatch):
    ws = Workspace()
    with lending(ws):
        small = workspace.empty((4,), dtype=torch.float32, device=torch.device("cpu"))  # < MIN_BYTES
    assert ws.nbytes == 0 and small.shape == (4,)
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    with lending(None):
        workspace.empty((4,), dtype=torch.float32, device=torch.device("cpu"))
    workspace.empty((4,), dtype=torch.float32, device=torch.device("cpu"))
    assert ws.nbytes == 0


def test_an_error_inside_the_block_still_takes_the_buffers_back(lend_everything):
    ws = Workspace()
    with pytest.raises(RuntimeError, match="boom"):
        with lending(ws):
            first = workspace.empty((8,), dtype=torch.float32, device=torch.device("cpu"))
            raise RuntimeError("boom")
    with lending(ws):
        again = workspace.empty((8,), dtype=torch.float32, device=torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr()


def _run(cls, kw, reuse, batches, steps=4, caller_grad=True):
    model = _net()
    opt = cls(model.parameters(), model=model, reuse_buffers=reuse, **kw)
    for t in range(steps):
        (xf, yf), (xr, yr) = batches[t % len(batches)]
        opt.zero_grad(set_to_none=True)
        if caller_grad:
            loss = nn.functional.cross_entropy(model(xr), yr) - nn.functional.cross_entropy(model(xf), yf)
            loss.backward()
        opt.step(forget=(xf, yf), retain=(xr, yr))
    return model, opt


def _assert_same(run_a, run_b):
    (ma, oa), (mb, ob) = run_a, run_b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        sa, sb = oa.state[pa], ob.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


CASES = [
    (ProbablyAlignedSGD, dict(lr=0.2, momentum=0.9, weight_decay=1e-3)),  # defaults: guard, rescale="norm"
    (ProbablyAlignedSGD, dict(lr=0.2, momentum=0.9, retain_guard=None, rescale=None)),
    (ProbablyAlignedAdamW, dict(lr=1e-2)),
]


@pytest.mark.parametrize("cls, kw", CASES)
@pytest.mark.parametrize("sizes", [(8, 8), (6, 10)], ids=["equal-batches", "unequal-batches"])
@pytest.mark.parametrize("caller_grad", [True, False], ids=["caller-grad", "stats-direction"])
def test_reusing_buffers_takes_the_same_steps(lend_everything, cls, kw, sizes, caller_grad):
    batches = [random_batches(s, sizes[0], sizes[1]) for s in range(3)]
    kw = dict(kw, fused=False)
    reused = _run(cls, kw, True, batches, caller_grad=caller_grad)
    fresh = _run(cls, kw, False, batches, caller_grad=caller_grad)
    _assert_same(reused, fresh)
    assert reused[1].workspace.nbytes > 0  # the statistics did come from the workspace
    assert fresh[1].workspace.nbytes == 0


@needs_compiler
@pytest.mark.parametrize("caller_grad", [True, False], ids=["caller-grad", "stats-direction"])
def test_the_fused_step_behind_the_guard_takes_the_same_steps(lend_everything, caller_grad):
    batches = [random_batches(s, 8, 8) for s in range(3)]
    kw = dict(lr=0.2, momentum=0.9, fused=True)
    _assert_same(_run(ProbablyAlignedSGD, kw, True, batches, caller_grad=caller_grad),
                 _run(ProbablyAlignedSGD, kw, False, batches, caller_grad=caller_grad))


def test_no_state_tensor_is_a_workspace_buffer(lend_everything, monkeypatch):
    lent: set[int] = set()
    take = Workspace.empty

    def recording(self, shape, dtype, device):
        buf = take(self, shape, dtype, device)
        lent.add(buf.untyped_storage().data_ptr())
        return buf

    monkeypatch.setattr(Workspace, "empty", recording)
    batches = [random_batches(s, 8, 8) for s in range(2)]
    _, opt = _run(ProbablyAlignedSGD, dict(lr=0.2, momentum=0.9, fused=False), True, batches, caller_grad=False)
    assert lent  # the step did lend
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                assert v.untyped_storage().data_ptr() not in lent


def test_default_is_on_for_cpu_parameters_and_validated():
    model = _net()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model)
    assert opt.reuse_buffers is None and opt._lent_workspace() is opt.workspace
    off = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, reuse_buffers=False)
    assert off._lent_workspace() is None
    with pytest.raises(ValueError, match="reuse_buffers"):
        ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, reuse_buffers="yes")


def test_copies_and_pickles_start_without_buffers(lend_everything):
    batches = [random_batches(0, 8, 8)]
    model, opt = _run(ProbablyAlignedSGD, dict(lr=0.2, momentum=0.9, fused=False), True, batches, steps=1)
    assert opt.workspace.nbytes > 0
    twin = copy.deepcopy(opt)
    assert twin.workspace.nbytes == 0 and twin.workspace is not opt.workspace
    state = pickle.loads(pickle.dumps(opt.__getstate__()))
    assert "workspace" not in state


def _cnn(seed=0):
    torch.manual_seed(seed)
    # the first convolution's 64 positions take the per-sample products, the second's 4 the Gram form
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=4, padding=1),
                         nn.Flatten(), nn.Linear(32, 4))


@pytest.mark.parametrize("caller_grad", [True, False], ids=["caller-grad", "stats-direction"])
def test_convolutions_reusing_buffers_take_the_same_steps(lend_everything, caller_grad):
    gen = torch.Generator().manual_seed(3)
    batches = [((torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)),
                (torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen))) for _ in range(3)]
    runs = []
    for reuse in (True, False):
        model = _cnn()
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.2, momentum=0.9, model=model, reuse_buffers=reuse,
                                 fused=False)
        for (xf, yf), (xr, yr) in batches:
            opt.zero_grad(set_to_none=True)
            if caller_grad:
                (nn.functional.cross_entropy(model(xr), yr) - nn.functional.cross_entropy(model(xf), yf)).backward()
            opt.step(forget=(xf, yf), retain=(xr, yr))
        runs.append((model, opt))
    _assert_same(*runs)
    assert runs[0][1].workspace.nbytes > 0


def test_a_buffer_given_back_is_lent_again_in_the_round_but_held_once(lend_everything):
    ws = Workspace()
    shape, kw = (16,), dict(dtype=torch.float32, device=torch.device("cpu"))
    with lending(ws):
        a = workspace.empty(shape, **kw)
        workspace.give_back(a)
        b = workspace.empty(shape, **kw)  # a's memory, lent again
        c = workspace.empty(shape, **kw)  # while b is out: new memory
    assert b.data_ptr() == a.data_ptr() and c.data_ptr() != b.data_ptr()
    assert ws.nbytes == 2 * 16 * 4  # two buffers, not three
    with lending(ws):
        x, y = workspace.empty(shape, **kw), workspace.empty(shape, **kw)
        z = workspace.empty(shape, **kw)
    assert len({x.data_ptr(), y.data_ptr(), z.data_ptr()}) == 3  # never one buffer lent twice at once


def test_the_steps_warnings_point_at_the_caller():
    # step() now runs its body inside the workspace's lending block: one frame deeper than before
    import warnings

    model = _net()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # no batches: "the update is not masked"
    assert [w.filename for w in caught] == [__file__]
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, certify=0.9)
    (f, r) = random_batches(0, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(forget=f, retain=r)  # certify on the step's own retain batch
    assert __file__ in [w.filename for w in caught if "certify reuses" in str(w.message)]
