"""HookEngine (no per-sample gradients of the whole model) against the vmap reference and a loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import HookEngine, ProbablyAlignedSGD, VmapEngine
from masked_optim import rules, taps
from masked_optim.hooks import supports

from .helpers import loop_moments


class SeqModel(nn.Module):
    """Embedding (padding_idx, repeated tokens), Linear/LayerNorm over a sequence dim, Conv1d."""

    def __init__(self, groups=1, ln_bias=True):
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.lin = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6, bias=ln_bias)
        self.conv = nn.Conv1d(6, 6, 3, padding=1, stride=2, groups=groups)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, tokens):
        h = self.ln(self.lin(self.emb(tokens)))
        h = torch.relu_(self.conv(h.transpose(1, 2)))
        return self.head(h.mean(2))


class Scaled(nn.Module):
    """A module the hooks do not know: its parameter goes to the fallback."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale


class Twice(nn.Module):
    """A Linear called twice: per-sample gradients add across calls, so it must fall back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(self.emb(t).mean(1))


def _cases():
    yield "mlp", lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)), lambda n: torch.randn(n, 6), 3
    yield "conv2d", lambda: nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.GroupNorm(3, 6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, (3, 2), dilation=(2, 1), padding="valid"), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3),
    ), lambda n: torch.randn(n, 4, 9, 9), 3
    yield "conv_nobias", lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False, padding=(1, 2)), nn.BatchNorm2d(4, affine=True), nn.ReLU(), nn.Flatten(),
        nn.LazyLinear(3),
    ), lambda n: torch.randn(n, 3, 5, 5), 3
    yield "seq", lambda: SeqModel(), lambda n: torch.randint(0, 9, (n, 7)), 3
    yield "seq_groups", lambda: SeqModel(groups=3, ln_bias=False), lambda n: torch.randint(0, 9, (n, 6)), 3
    yield "bn1d", lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), lambda n: torch.randn(n, 5), 3
    yield "mixed", lambda: nn.Sequential(nn.Linear(5, 6), Scaled(6), nn.PReLU(), nn.Linear(6, 3)), lambda n: torch.randn(n, 5), 3
    yield "twice", lambda: Twice(), lambda n: torch.randn(n, 5), 3
    yield "tied", lambda: Tied(), lambda n: torch.randint(0, 7, (n, 3)), 7


CASES = {name: (mk, data, k) for name, mk, data, k in _cases()}


def _setup(name, n=10, seed=0):
    mk, data, k = CASES[name]
    torch.manual_seed(seed)
    model = mk()
    x = data(n)
    model.train()
    for _ in range(2):  # lazy modules and non-trivial BatchNorm running statistics
        model(data(16))
    y = torch.randint(0, k, (n,))
    return model, x, y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk, per_sample_loop, gram", [
    (None, False, None), (3, False, None), (None, True, None), (None, False, "never"), (None, False, "always"),
    (None, "in_hook", None),
])
def test_hooks_equal_vmap_and_loop(name, chunk, per_sample_loop, gram, monkeypatch):
    if per_sample_loop is True:  # the one-sample-at-a-time accumulation used for large layers on CPU
        monkeypatch.setattr(rules, "_CACHE_RESIDENT", 0)
    if per_sample_loop == "in_hook":  # large layers: rules run inside the backward, not after it
        monkeypatch.setattr(taps, "DEFER_MAX", 0)
    if gram is not None:  # the Gram form of Σ_b g_b² for every contraction length, or for none
        monkeypatch.setattr(rules, "_GRAM_MAX_INNER", 0 if gram == "never" else 10**6)
    model, x, y = _setup(name)
    params = list(model.parameters())
    fast = HookEngine(chunk_size=chunk)(model, params, (x, y))
    ref = VmapEngine()(model, params, (x, y))
    _, lm, lq = loop_moments(model, params, x, y)
    for i, p in enumerate(params):
        torch.testing.assert_close(fast.mean[i], ref.mean[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.m2[i], ref.m2[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.mean[i].double(), lm[i], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.loss, ref.loss)


def test_supported_layer_set():
    assert supports(nn.Linear(2, 2)) and supports(nn.Conv2d(1, 1, 3, padding="valid"))
    assert not supports(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert not supports(nn.Conv2d(1, 1, 3, padding="same"))
    assert not supports(nn.Embedding(3, 2, max_norm=1.0))
    assert not supports(nn.BatchNorm1d(3, track_running_stats=False))
    assert not supports(nn.PReLU())

    class MyLinear(nn.Linear):  # may compute something else: never assumed
        pass

    assert not supports(MyLinear(2, 2))


@pytest.mark.parametrize("name", ["mixed", "twice", "tied"])
def test_strict_mode_needs_no_whole_model_fallback(name):
    """Unknown layers (per-layer fallback), a layer called twice and a tied weight (per-sample
    gradients summed over uses) need no whole-model vmap: equal to a per-sample loop without one."""
    model, x, y = _setup(name)
    params = list(model.parameters())
    got = HookEngine(fallback=None)(model, params, (x, y))
    _, lm, lq = loop_moments(model, params, x, y)
    for i in range(len(params)):
        torch.testing.assert_close(got.mean[i].double(), lm[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)


def test_strict_mode_refuses_what_only_the_whole_model_fallback_can_do():
    class Reuse(nn.Module):  # the embedding matrix used outside the Embedding's forward
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, t):
            return self.emb(t).mean(1) @ self.emb.weight.T

    torch.manual_seed(0)
    model = Reuse()
    with pytest.warns(RuntimeWarning, match="emb.weight"), pytest.raises(ValueError, match="emb.weight"):
        HookEngine(fallback=None)(model, list(model.parameters()), (torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))))


def test_hooks_removed_and_state_unchanged_even_on_error():
    model, x, y = _setup("conv2d")
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    HookEngine()(model, list(model.parameters()), (x, y))
    with pytest.raises(RuntimeError):
        HookEngine()(model, list(model.parameters()), (torch.randn(4, 5, 9, 9), torch.zeros(4, dtype=torch.long)))
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert m.training
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_custom_loss_fn_per_sample():
    model, x, y = _setup("mlp")
    target = torch.randn(len(y), 3)
    params = list(model.parameters())
    fast = HookEngine()(model, params, (x, target), F.mse_loss)
    _, lm, lq = loop_moments(model, params, x, target, F.mse_loss)
    for i in range(len(params)):
        torch.testing.assert_close(fast.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)


def test_optimizer_engines_agree():
    results = []
    for engine in ("auto", "hooks", "vmap"):
        model, x, y = _setup("conv2d")
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, momentum=0.9, model=model, confidence=0.6, engine=engine)
        for s in range(3):
            opt.step(forget=(x[:5], y[:5]), retain=(x[5:], y[5:]))
        results.append(([p.detach().clone() for p in model.parameters()], opt.diagnostics.kept_fraction))
    for params, kept in results[1:]:
        assert kept == pytest.approx(results[0][1], abs=2e-3)
        for p, q in zip(params, results[0][0]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="engine"):
        ProbablyAlignedSGD(nn.Linear(2, 2).parameters(), lr=0.1, model=nn.Linear(2, 2), engine="fast")


def test_foreign_parameter_is_a_clear_error():
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match="not a parameter"):
        HookEngine()(model, [nn.Parameter(torch.zeros(3))], (x, y))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("split", [4, 6])
@pytest.mark.parametrize("in_hook", [False, True])
def test_pair_equals_two_loops(name, split, in_hook, monkeypatch):
    """One pass over forget+retain (unequal sizes, and equal ones: batched segments) gives each batch's
    own moments, whether the layer rules run after the backward or inside it."""
    if in_hook:
        monkeypatch.setattr(taps, "DEFER_MAX", 0)
    model, x, y = _setup(name, n=12 if split == 6 else 11)
    params = list(model.parameters())
    first, second = (x[:split], y[:split]), (x[split:], y[split:])
    got = HookEngine().pair(model, params, first, second)
    for stats, (xb, yb) in zip(got, (first, second)):
        _, lm, lq = loop_moments(model, params, xb, yb)
        assert stats.n == len(yb)
        for i in range(len(params)):
            torch.testing.assert_close(stats.mean[i].double(), lm[i], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.loss, F.cross_entropy(model.eval()(xb), yb), rtol=1e-5, atol=1e-6)
        model.train()


def test_pair_falls_back_to_separate_passes():
    """Inputs that cannot be concatenated (sequences of another length), or chunking, still give
    each batch's exact moments."""
    model, x, y = _setup("seq", n=9)
    short = (torch.randint(0, 9, (5, 4)), torch.randint(0, 3, (5,)))
    mlp, xm, ym = _setup("mlp", n=9)
    for net, first, second, chunk in [(model, (x, y), short, None), (mlp, (xm[:4], ym[:4]), (xm[4:], ym[4:]), 2)]:
        params = list(net.parameters())
        got = HookEngine(chunk_size=chunk).pair(net, params, first, second)
        for stats, (xb, yb) in zip(got, (first, second)):
            _, lm, lq = loop_moments(net, params, xb, yb)
            for i in range(len(params)):
                torch.testing.assert_close(stats.mean[i].double(), lm[i], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(stats.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)


def test_frozen_first_layer_and_bias_free_layers():
    """Autograd is only asked for what carries δ through each hooked layer: a frozen first layer and
    layers without bias must still get every statistic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    model[2].requires_grad_(False)  # a frozen layer in the middle
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    params = [p for p in model.parameters() if p.requires_grad]
    fast = HookEngine(fallback=None)(model, params, (x, y))
    _, lm, lq = loop_moments(model, params, x, y)
    for i in range(len(params)):
        torch.testing.assert_close(fast.mean[i].double(), lm[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.m2[i].double(), lq[i], rtol=1e-4, atol=1e-6)
    model[0].requires_grad_(False)  # now the first trainable layer's input needs no gradient
    params = [model[4].weight]
    fast = HookEngine(fallback=None)(model, params, (x, y))
    _, lm, lq = loop_moments(model, params, x, y)
    torch.testing.assert_close(fast.m2[0].double(), lq[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine, second", [
    (HookEngine, None), (lambda: HookEngine(chunk_size=4), None), (HookEngine, "double"),
])
def test_pair_sq_holds_square_sums(engine, second):
    """``pair(sq=True)``: the means of ``pair`` and Σg² = M2 + n·μ² (float64 loop), also for parameters
    of the per-layer fallback, in one pass or (chunked, or inputs that differ in dtype) two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), Scaled(7), nn.Tanh(), nn.Linear(7, 3))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    fb = (torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    rb = (torch.randn(9, 5, generator=g), torch.randint(0, 3, (9,), generator=g))
    if second == "double":
        model.double()
        fb, rb = (fb[0].double(), fb[1]), (rb[0].double(), rb[1])
    sf, sr = engine().pair(model, params, fb, rb, sq=True)
    for stats, batch in ((sf, fb), (sr, rb)):
        n, means, m2s = loop_moments(model, params, *batch)
        assert stats.n == n
        for mean, sq, ref_mean, ref_m2 in zip(stats.mean, stats.m2, means, m2s):
            torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(sq.double(), ref_m2 + n * ref_mean**2, atol=1e-6, rtol=1e-5)
