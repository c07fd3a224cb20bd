"""Models the default engine once got silently wrong or refused (issue 13): each now equals a float64
per-sample loop, or is reported. The reference is tests/helpers.py's autograd loop."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.checkpoint import checkpoint

from masked_optim import HookEngine, ProbablyAlignedSGD, VmapEngine, register_rule
from masked_optim.rules import _REGISTRY

from .helpers import loop_moments


def _check(model, x, y, loss_fn=None, expect_warning=None, engine=None):
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = (engine or HookEngine())(model, params, (x, y), loss_fn)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if expect_warning is None:
        assert not msgs, msgs
    else:
        assert any(expect_warning in m for m in msgs), msgs
    _, lm, lq = loop_moments(model, params, x, y, loss_fn)
    for i in range(len(params)):
        torch.testing.assert_close(got.mean[i], lm[i], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.m2[i], lq[i], rtol=1e-9, atol=1e-12)
    return got


def _data(n=6, d=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def test_parameter_reused_outside_its_layer_is_detected_and_routed():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, t):
            return self.mix(self.emb(t)).mean(1) @ self.emb.weight.T

    torch.manual_seed(0)
    t = torch.randint(0, 9, (6, 3))
    _check(Reuse(), t, torch.randint(0, 9, (6,)), expect_warning="'emb.weight'")


def test_pruned_layer_gets_its_weight_orig_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    got = _check(model, *_data())
    names = [n for n, _ in model.named_parameters()]
    assert "0.weight_orig" in names
    assert got.m2[names.index("0.weight_orig")].abs().sum() > 0


def test_forward_hook_that_replaces_a_layers_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    model[0].register_forward_hook(lambda m, i, o: 2.0 * o + 0.1 * o.square())
    _check(model, *_data())


def test_tuple_output_with_a_matching_loss_fn_under_every_engine():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h), h.square().mean(1)

    def loss_fn(out, y):
        logits, aux = out
        return F.cross_entropy(logits, y) + 0.1 * aux.mean()

    torch.manual_seed(0)
    model = Aux()
    _check(model, *_data(), loss_fn=loss_fn)
    _check(model, *_data(), loss_fn=loss_fn, engine=VmapEngine())


def test_layer_called_with_a_keyword_argument():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(5, 7), nn.Linear(7, 4)

        def forward(self, x):
            return self.out(input=torch.tanh(self.fc(input=x)))

    torch.manual_seed(0)
    engine = HookEngine()
    model = Kw()
    _check(model, *_data(), engine=engine)
    rules, rest = engine.plan(model, list(model.parameters()))
    assert not rest and len(rules) == 2


def test_activation_checkpointing_non_reentrant_is_supported_and_reentrant_refused():
    class Ckpt(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.inp = nn.Linear(5, 5)
            self.block = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7))
            self.head = nn.Linear(7, 4)
            self.reentrant = reentrant

        def forward(self, x):
            h = checkpoint(self.block, torch.tanh(self.inp(x)), use_reentrant=self.reentrant)
            return self.head(torch.tanh(h))

    torch.manual_seed(0)
    engine = HookEngine(fallback=None)
    model = Ckpt(False)
    _check(model, *_data(), engine=engine)
    assert not engine.plan(model, list(model.parameters()))[1]
    torch.manual_seed(0)
    model = Ckpt(True).double()
    x, y = _data()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        HookEngine()(model, list(model.parameters()), (x.double(), y))
    assert all(p.grad is None for p in model.parameters())


def test_model_whose_samples_interact_goes_to_one_sample_at_a_time():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(h - 0.5 * h.mean(0, keepdim=True)))

    torch.manual_seed(0)
    model = Mix().double()
    x, y = _data()
    x = x.double()
    params = list(model.parameters())
    with pytest.warns(RuntimeWarning, match="samples interact"):
        got = HookEngine()(model, params, (x, y))
    # per-sample gradients are defined one sample at a time: what the loop (and vmap) compute
    _, lm, lq = loop_moments(model, params, x, y)
    for i in range(len(params)):
        torch.testing.assert_close(got.mean[i], lm[i], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.m2[i], lq[i], rtol=1e-9, atol=1e-12)


def test_unknown_layer_and_module_with_own_parameters_use_the_per_layer_fallback():
    class Gate(nn.Module):  # no rule: per-sample gradients from its own input and output gradient
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))
            self.inner = nn.Linear(d, d)

        def forward(self, x):
            return self.inner(x) * torch.sigmoid(self.w)

    torch.manual_seed(0)
    engine = HookEngine(fallback=None)
    model = nn.Sequential(nn.Linear(5, 6), Gate(6), nn.PReLU(), nn.Linear(6, 4))
    _check(model, *_data(), engine=engine)


def test_a_rule_that_leaves_a_parameter_unfilled_is_an_error():
    class NoBias(nn.Linear):
        pass

    register_rule(NoBias, lambda m, a, d: {"weight": (d.t() @ a, (d * d).t() @ (a * a))})
    try:
        torch.manual_seed(0)
        model = nn.Sequential(NoBias(5, 7), nn.Tanh(), nn.Linear(7, 4))
        with pytest.raises(ValueError, match="no statistics for its parameter"):
            HookEngine()(model, list(model.parameters()), _data())
    finally:
        _REGISTRY.pop(NoBias)


def test_a_wrong_registered_rule_is_reported_not_used():
    class Half(nn.Linear):
        pass

    def wrong(m, a, d):  # halves the weight's gradient and squares
        return {"weight": (0.5 * d.t() @ a, 0.25 * (d * d).t() @ (a * a)), "bias": (d.sum(0), (d * d).sum(0))}

    register_rule(Half, wrong)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Half(5, 7), nn.Tanh(), nn.Linear(7, 4))
        _check(model, *_data(), expect_warning="'0.weight'")
    finally:
        _REGISTRY.pop(Half)


def test_a_rule_routed_away_is_not_run_on_later_passes():
    """Once verification sends a layer's parameters to the whole-model fallback, later passes build
    no tap for that layer: its (wrong) rule is not run again, and the statistics stay the loop's."""
    class Half(nn.Linear):
        pass

    calls = []

    def wrong(m, a, d):
        calls.append(m)  # both sums halved: both parameters fail verification
        return {"weight": (0.5 * d.t() @ a, 0.25 * (d * d).t() @ (a * a)), "bias": (0.5 * d.sum(0), (d * d).sum(0))}

    register_rule(Half, wrong)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Half(5, 7), nn.Tanh(), nn.Linear(7, 4))
        engine = HookEngine()
        _check(model, *_data(), expect_warning="'0.weight'", engine=engine)
        assert calls  # the first call verified the rule (and found it wrong)
        calls.clear()
        _check(model, *_data(seed=1), expect_warning=None, engine=engine)  # warned once, not again
        assert not calls
        assert engine.routes(model, list(model.parameters()))["whole"] == [0, 1]
    finally:
        _REGISTRY.pop(Half)


def test_a_registered_rule_is_used_for_its_type():
    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return x * self.weight

    register_rule(Scale, per_sample=lambda m, a, d: {"weight": a * d}, params=("weight",))
    try:
        torch.manual_seed(0)
        engine = HookEngine(fallback=None)
        model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 4))
        _check(model, *_data(), engine=engine)
        rules, rest = engine.plan(model, list(model.parameters()))
        assert model[1] in rules and not rest
    finally:
        _REGISTRY.pop(Scale)


def test_optimizer_with_tuple_output_model_and_loss_fn_steps():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)

        def forward(self, x):
            out = self.a(x)
            return out, out.detach()

    torch.manual_seed(0)
    model = Aux()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, loss_fn=lambda o, t: F.cross_entropy(o[0], t))
    f, r = _data(seed=1), _data(seed=2)
    opt.step(forget=f, retain=r)
    assert opt.diagnostics.direction == "stats" and opt.diagnostics.n_retain == 6


def test_a_parsed_batch_moved_to_its_own_device_is_itself_and_others_are_copies():
    from masked_optim.batches import parse_batch

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    b = parse_batch({"input": x, "flag": True, "labels": y})
    same = b.to(torch.device("cpu"))
    assert same is b
    meta = b.to(torch.device("meta"))  # another device: every tensor moved, the rest kept
    assert meta is not b and meta.targets.device.type == "meta" and meta.kwargs["input"].device.type == "meta"
    assert meta.kwargs["flag"] is True and meta.n == b.n and b.kwargs["input"].device.type == "cpu"
