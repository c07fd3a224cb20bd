"""Per-sample statistics against a plain per-sample loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import GradStats, VmapEngine, chan_merge, per_sample_grad_stats
from masked_optim.stats import validate_batch

from .helpers import loop_moments


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.lin = nn.Linear(4 + 3, 5)

    def forward(self, tokens, feats):
        return self.lin(torch.cat([self.emb(tokens).mean(1), feats], dim=1))


def _models():
    torch.manual_seed(0)
    yield "linear", nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)), lambda n: (torch.randn(n, 6),)
    yield "conv", nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2, dilation=2),
        nn.Flatten(), nn.LazyLinear(3),
    ), lambda n: (torch.randn(n, 2, 9, 9),)
    yield "groupnorm", nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ), lambda n: (torch.randn(n, 3, 6, 6),)
    yield "layernorm", nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)), lambda n: (
        torch.randn(n, 5),
    )
    yield "embedding", TwoInput(), lambda n: (torch.randint(0, 11, (n, 5)), torch.randn(n, 3))
    bn = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 3)
    )
    yield "batchnorm", bn, lambda n: (torch.randn(n, 3, 6, 6),)


MODELS = {name: (m, mk) for name, m, mk in _models()}


def _setup(name, n=9):
    model, make = MODELS[name]
    torch.manual_seed(1)
    xs = make(n)
    model(*xs)  # materialise lazy modules
    if name == "batchnorm":
        model.train()
        for _ in range(3):  # non-trivial running statistics
            model(*make(16))
    y = torch.randint(0, 3, (n,))
    return model, xs, y


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_stats_equal_per_sample_loop(name, chunk):
    model, xs, y = _setup(name)
    params = [p for p in model.parameters()]
    n, ref_mean, ref_m2 = loop_moments(model, params, xs, y)
    inputs = xs[0] if len(xs) == 1 else xs
    st = per_sample_grad_stats(model, (inputs, y), params, chunk_size=chunk)
    assert st.n == n
    for p, m, q, rm, rq in zip(params, st.mean, st.m2, ref_mean, ref_m2):
        assert m.shape == p.shape and m.dtype == torch.float32
        torch.testing.assert_close(m.double(), rm, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q.double(), rq, rtol=1e-4, atol=1e-6)


def test_modes_and_running_stats_untouched():
    model, xs, y = _setup("batchnorm")
    model.train()
    model[3].eval()  # a mixed configuration must be restored per module
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    per_sample_grad_stats(model, (xs[0], y))
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_loss_is_mean_per_sample_loss():
    model, xs, y = _setup("linear")
    st = per_sample_grad_stats(model, (xs[0], y), chunk_size=4)
    model.eval()
    torch.testing.assert_close(st.loss, F.cross_entropy(model(xs[0]), y).detach())


def test_frozen_and_subset_params():
    model, xs, y = _setup("linear")
    params = [model[2].weight]
    st = per_sample_grad_stats(model, (xs[0], y), params)
    _, rm, rq = loop_moments(model, params, xs, y)
    torch.testing.assert_close(st.mean[0].double(), rm[0], rtol=1e-4, atol=1e-6)


def test_chan_merge_equals_whole_batch():
    torch.manual_seed(0)
    g = torch.randn(13, 4, 3, dtype=torch.float64) * 3 + 1

    def stats(x):
        m = x.mean(0)
        return GradStats(x.shape[0], [m], [((x - m) ** 2).sum(0)], torch.tensor(float(x.shape[0])))

    merged = chan_merge(chan_merge(stats(g[:2]), stats(g[2:9])), stats(g[9:]))
    whole = stats(g)
    assert merged.n == 13
    torch.testing.assert_close(merged.mean[0], whole.mean[0])
    torch.testing.assert_close(merged.m2[0], whole.m2[0])
    torch.testing.assert_close(merged.variance()[0], g.var(0))


def test_float64_params_accumulate_in_float64():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    st = per_sample_grad_stats(model, (x, y))
    assert st.mean[0].dtype == torch.float64
    _, rm, rq = loop_moments(model, list(model.parameters()), x, y)
    torch.testing.assert_close(st.m2[0], rq[0])


def test_auto_chunk_respects_memory_budget():
    model = nn.Linear(100, 10)  # 1010 floats = 4040 bytes per sample
    eng = VmapEngine(memory_budget=4040 * 3)
    assert eng._chunk(list(model.parameters()), 50) == 3
    x, y = torch.randn(7, 100), torch.randint(0, 10, (7,))
    st = eng(model, list(model.parameters()), (x, y))
    _, rm, rq = loop_moments(model, list(model.parameters()), x, y)
    torch.testing.assert_close(st.m2[0].double(), rq[0], rtol=1e-4, atol=1e-6)


def test_custom_loss_fn():
    model, xs, y = _setup("linear")
    yf = torch.randn(len(y), 3)
    st = per_sample_grad_stats(model, (xs[0], yf), loss_fn=F.mse_loss)
    _, rm, rq = loop_moments(model, list(model.parameters()), xs, yf, F.mse_loss)
    torch.testing.assert_close(st.mean[0].double(), rm[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "batch, err, msg",
    [
        ((torch.randn(4, 6), torch.zeros(3, dtype=torch.long)), ValueError, "batch size"),
        ((torch.randn(0, 6), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
        ((torch.tensor(1.0), torch.tensor(0)), ValueError, "leading batch dimension"),
        ((torch.randn(4, 6), torch.tensor(0)), ValueError, "leading batch dimension"),
        ((torch.randn(4, 6),), TypeError, "pair"),
        (([], torch.zeros(3, dtype=torch.long)), TypeError, "tensor"),
        ((torch.randn(4, 6), [0, 1, 2, 3]), TypeError, "targets"),
    ],
)
def test_validate_batch_errors(batch, err, msg):
    with pytest.raises(err, match=msg):
        validate_batch(batch)


def test_param_not_in_model():
    model, xs, y = _setup("linear")
    with pytest.raises(ValueError, match="not a parameter"):
        per_sample_grad_stats(model, (xs[0], y), [nn.Parameter(torch.zeros(3))])


def test_unsupported_operation_clear_error():
    class ItemModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * float(x.sum().item())  # data-dependent host value: not vmappable

    model = ItemModel()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="vmap"):
        per_sample_grad_stats(model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_memory_budget_too_small_is_a_clear_error():
    model = nn.Linear(100, 10)
    with pytest.raises(MemoryError, match="memory_budget"):
        VmapEngine(memory_budget=1000)(model, list(model.parameters()), (torch.randn(3, 100), torch.zeros(3, dtype=torch.long)))


def test_eval_behaviour_switches_and_restores_modes():
    from masked_optim.stats import eval_behaviour

    class Frozen(nn.Module):
        """Overrides train(): eval_behaviour must go through it."""

        def __init__(self):
            super().__init__()
            self.calls = []
            self.bn = nn.BatchNorm1d(2)

        def train(self, mode=True):
            self.calls.append(mode)
            return super().train(mode)

    plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    plain[1].eval()  # a submodule with its own mode
    for model in (plain, nn.Sequential(Frozen(), nn.Dropout())):
        before = [m.training for m in model.modules()]
        with eval_behaviour(model):
            assert not any(m.training for m in model.modules())
        assert [m.training for m in model.modules()] == before
    # it saw the switch, and the switch back (an override's train(True) undoes what its eval() did)
    assert model[0].calls == [False, True]


def test_eval_behaviour_leaves_mode_free_models_alone():
    """A model made only of modules whose forward ignores ``training`` is not switched at all; one
    subclass (which may read it) or one Dropout is enough to switch the whole model."""
    from masked_optim.stats import eval_behaviour

    class MyLinear(nn.Linear):
        pass

    free = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.LayerNorm(3), nn.Linear(3, 2))
    with eval_behaviour(free):
        assert all(m.training for m in free.modules())
    for model in (nn.Sequential(nn.Linear(2, 3), nn.Dropout()), nn.Sequential(MyLinear(2, 3), nn.ReLU())):
        with eval_behaviour(model):
            assert not any(m.training for m in model.modules())
        assert all(m.training for m in model.modules())
