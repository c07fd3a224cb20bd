"""Fitting into training code: closure-only trainers with staged batches, mixed precision
(autocast + GradScaler), torch.compile, checkpoint/resume, and the vmap engine's memory budget."""

from __future__ import annotations

import copy
import functools
import math
import pathlib
import runpy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import ProbablyAlignedAdamW, ProbablyAlignedSGD, VmapEngine
from masked_optim import stats as stats_module

from .helpers import loop_moments

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------------------------------ toy problem
def _blobs(seed: int = 0, n_per_class: int = 60, classes: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    centres = 0.8 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def _mlp(seed: int = 0, dim: int = 8, classes: int = 3, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, classes))


@functools.lru_cache(maxsize=1)
def _pretrained_state():
    x, y = _blobs()
    model = _mlp()
    pre = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        pre.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    f, r = y == 0, y != 0
    return model.state_dict(), (x[f], y[f]), (x[r], y[r])


def _pretrained():
    """A fresh MLP that fits the blobs, and the forget (class 0) / retain split."""
    state, forget, retain = _pretrained_state()
    model = _mlp()
    model.load_state_dict(copy.deepcopy(state))
    return model, forget, retain


def _acc(model: nn.Module, batch) -> float:
    with torch.no_grad():
        return (model(batch[0]).argmax(1) == batch[1]).float().mean().item()


def _loss(model: nn.Module, batch) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(batch[0]), batch[1]).item()


def _minibatches(forget, retain, steps: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        fi = torch.randint(0, len(forget[1]), (size,), generator=g)
        ri = torch.randint(0, len(retain[1]), (size,), generator=g)
        yield (forget[0][fi], forget[1][fi]), (retain[0][ri], retain[1][ri])


def _neggrad_plus(model: nn.Module, fb, rb) -> torch.Tensor:
    return F.cross_entropy(model(rb[0]), rb[1]) - F.cross_entropy(model(fb[0]), fb[1])


# ------------------------------------------------------------------------------- closure-only trainer
class ClosureOnlyTrainer:
    """Stand-in for a framework's loop (Lightning, HF Trainer, ignite...): it knows nothing about
    forget/retain batches and only ever calls ``optimizer.step(closure)``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective) -> None:
        self.model, self.optimizer, self.objective = model, optimizer, objective

    def fit(self, loader) -> None:
        for batch in loader:
            def closure(batch=batch):
                self.optimizer.zero_grad()
                loss = self.objective(self.model, *batch)
                loss.backward()
                return loss

            self.optimizer.step(closure)


class _Current:
    """Wraps the trainer's loader and remembers the batch it handed out last."""

    def __init__(self, it) -> None:
        self.it, self.last = it, None

    def __iter__(self):
        for item in self.it:
            self.last = item
            yield item


def test_closure_only_trainer_unlearns_with_staged_batches():
    model, forget, retain = _pretrained()
    start = copy.deepcopy(model.state_dict())
    steps, size = 25, 24
    assert _acc(model, forget) > 0.95 and _acc(model, retain) > 0.95

    # the strict test with the unscaled step: every step keeps some, never all, coordinates
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, momentum=0.9, model=model, confidence=0.95, rescale=None)
    loader = _Current(_minibatches(forget, retain, steps, size, seed=1))
    # the trainer never passes batches: a step pre-hook stages the current ones (true labels)
    opt.register_step_pre_hook(lambda o, args, kwargs: o.stage(forget=loader.last[0], retain=loader.last[1]))
    diags = []
    opt.register_step_post_hook(lambda o, args, kwargs: diags.append(o.diagnostics))
    ClosureOnlyTrainer(model, opt, _neggrad_plus).fit(loader)

    assert len(diags) == steps
    assert all(d.n_forget == size and d.n_retain == size and d.direction == "grad" for d in diags)
    assert all(0 < d.kept_fraction < 1 for d in diags)  # the mask was applied at every step
    # it unlearned: the forget class is no longer recognised, the others still are
    assert _acc(model, forget) < 0.3
    assert _loss(model, forget) > 1.0
    assert _acc(model, retain) > 0.9

    # reference: the same run passing the batches to step() explicitly
    ref = _mlp()
    ref.load_state_dict(start)
    ref_opt = ProbablyAlignedSGD(ref.parameters(), lr=0.05, momentum=0.9, model=ref, confidence=0.95, rescale=None)
    for fb, rb in _minibatches(forget, retain, steps, size, seed=1):
        ref_opt.zero_grad()
        _neggrad_plus(ref, fb, rb).backward()
        ref_opt.step(forget=fb, retain=rb)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------- mixed precision
def _amp_run(use_scaler: bool, steps: int = 4, inject_inf_at: int | None = None):
    model, forget, retain = _pretrained()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, momentum=0.9, model=model, confidence=0.8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
    returned, diags, scales, states = [], [], [], []
    for step, (fb, rb) in enumerate(_minibatches(forget, retain, steps, 24, seed=2)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _neggrad_plus(model, fb, rb)
        scaler.scale(loss).backward()
        if step == inject_inf_at:
            model[0].weight.grad[0, 0] = math.inf
        returned.append(scaler.step(opt, forget=fb, retain=rb))  # statistics outside autocast
        scaler.update()
        diags.append(opt.diagnostics)
        scales.append(scaler.get_scale())
        states.append(len(opt.state))
    return model, diags, scales, returned, states


def test_gradscaler_forwards_batches_and_matches_unscaled_run():
    scaled, diags, scales, _, _ = _amp_run(True)
    plain, plain_diags, _, _, _ = _amp_run(False)
    assert scales == [2.0**10] * 4
    assert all(d.n_forget == 24 and d.n_retain == 24 and d.direction == "grad" for d in diags)
    assert [d.kept_fraction for d in diags] == [d.kept_fraction for d in plain_diags]
    assert all(0 < d.kept_fraction < 1 for d in diags)
    # a power-of-two scale and its exact unscaling: the same trajectory as without the scaler
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_gradscaler_skips_the_whole_step_on_inf():
    model_a, diags, scales, returned, states = _amp_run(True, steps=2, inject_inf_at=0)
    assert returned[0] is None and diags[0] is None  # opt.step never ran: nothing to diagnose
    assert scales[0] == 2.0**9  # the scaler backed off
    assert states[0] == 0 and states[1] > 0  # no momentum buffer from the skipped step
    # after the skip, the second step is exactly a first step from the pretrained model
    ref, _, _ = _pretrained()
    ref_opt = ProbablyAlignedSGD(ref.parameters(), lr=0.05, momentum=0.9, model=ref, confidence=0.8)
    fb, rb = list(_minibatches(*_pretrained()[1:], 2, 24, seed=2))[1]
    ref_opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _neggrad_plus(ref, fb, rb)
    loss.backward()
    ref_opt.step(forget=fb, retain=rb)
    assert diags[1].kept_fraction == ref_opt.diagnostics.kept_fraction
    for p, q in zip(model_a.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_gradscaler_needs_a_backward():
    # documented: with no p.grad at all (default statistics direction) GradScaler has nothing to
    # check; call opt.step(forget=..., retain=...) directly in that case
    model, forget, retain = _pretrained()
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, model=model)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(AssertionError):  # "_scale is None" / "No inf checks were recorded"
        scaler.step(opt, forget=forget, retain=retain)
    scaler.scale(_neggrad_plus(model, forget, retain))  # a scaled loss without backward: no p.grad
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(opt, forget=forget, retain=retain)


def test_amp_example_runs():
    main = runpy.run_path(str(EXAMPLES / "amp_unlearning.py"))["main"]
    tiny = ["--n-per-class", "30", "--pretrain-steps", "60", "--steps", "4", "--hidden", "16",
            "--batch", "16", "--quiet"]
    res = main(tiny)
    assert res["steps_taken"] == 4
    assert all(math.isfinite(v) for v in res.values())
    assert 0 < res["mean_kept_fraction"] < 1
    assert res["forget_loss_after"] > res["forget_loss_before"]
    assert res == main(tiny + ["--no-scaler"])  # the scale is exactly undone


def test_statistics_ignore_the_callers_autocast():
    model, forget, retain = _pretrained()
    twin = copy.deepcopy(model)
    outs = []
    for m, amp in ((model, False), (twin, True)):
        opt = ProbablyAlignedSGD(m.parameters(), lr=0.05, model=m, confidence=0.8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            opt.step(forget=forget, retain=retain)  # default direction: the statistics' means
        outs.append(list(m.parameters()))
    for p, q in zip(*outs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_of_the_model_keeps_statistics_and_compilation():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, forget, retain = _pretrained()
    eager = copy.deepcopy(model)
    # aot_eager runs dynamo and AOT autograd without inductor's C++ build (seconds, not a minute);
    # the optimizer gets the *original* module: it shares the parameters with the compiled one
    compiled = torch.compile(model, backend="aot_eager")
    runs = []
    for net, base in ((compiled, model), (eager, eager)):
        opt = ProbablyAlignedSGD(base.parameters(), lr=0.05, momentum=0.9, model=base, confidence=0.8)
        kept = []
        for fb, rb in _minibatches(forget, retain, 3, 24, seed=3):
            opt.zero_grad()
            _neggrad_plus(net, fb, rb).backward()
            opt.step(forget=fb, retain=rb)
            kept.append(opt.diagnostics.kept_fraction)
        runs.append(kept)
    assert runs[0] == runs[1] and all(0 < k < 1 for k in runs[0])
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    # the compiled module stayed compiled: one graph, no recompilation, nothing unsupported
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["unimplemented"] and not counters["recompiles"]


def test_compiled_module_passed_as_model():
    model, forget, retain = _pretrained()
    model = nn.Sequential(model[0], model[1], model[3])  # no dropout: eval mode then needs no recompile
    inner = copy.deepcopy(model)
    compiled = torch.compile(inner, backend="aot_eager")
    compiled(forget[0])  # compiled by the caller's first forward, as in a training loop
    # engine="hooks" cannot reach the vmap fallback, which would disable dynamo process-wide
    ours = ProbablyAlignedSGD(compiled.parameters(), lr=0.05, model=compiled, confidence=0.8, engine="hooks")
    ref = ProbablyAlignedSGD(model.parameters(), lr=0.05, model=model, confidence=0.8, engine="hooks")
    ours.step(forget=forget, retain=retain)
    ref.step(forget=forget, retain=retain)
    assert ours.diagnostics.kept_fraction == ref.diagnostics.kept_fraction > 0


# -------------------------------------------------------------------------------------- checkpoints
def _make(kind: str, seed: int):
    model = _mlp(seed, dropout=0.2)
    if kind == "sgd":
        opt = ProbablyAlignedSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                 model=model, confidence=0.7)
    else:
        opt = ProbablyAlignedAdamW(model.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-2, model=model,
                                   confidence=0.7, soft=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    return model, opt, sched


def _unlearn(model, opt, sched, data_gen: torch.Generator, steps: int, forget, retain) -> list[float]:
    kept = []
    for _ in range(steps):
        fi = torch.randint(0, len(forget[1]), (16,), generator=data_gen)
        ri = torch.randint(0, len(retain[1]), (16,), generator=data_gen)
        fb, rb = (forget[0][fi], forget[1][fi]), (retain[0][ri], retain[1][ri])
        rand_labels = torch.randint(0, 3, (16,), generator=data_gen)
        opt.zero_grad()
        model.train()  # dropout draws from the global RNG: part of what a checkpoint must restore
        # random labels on the forget set (RL) + retain loss, masked against the true labels
        (F.cross_entropy(model(fb[0]), rand_labels) + F.cross_entropy(model(rb[0]), rb[1])).backward()
        opt.step(forget=fb, retain=rb)
        sched.step()
        kept.append(opt.diagnostics.kept_fraction)
    return kept


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_mid_unlearning_equals_uninterrupted(tmp_path, kind):
    _, forget, retain = _pretrained()
    total, cut = 6, 3

    torch.manual_seed(123)
    model, opt, sched = _make(kind, seed=0)
    g = torch.Generator().manual_seed(9)
    kept_full = _unlearn(model, opt, sched, g, total, forget, retain)

    torch.manual_seed(123)
    m1, o1, s1 = _make(kind, seed=0)
    g1 = torch.Generator().manual_seed(9)
    kept_a = _unlearn(m1, o1, s1, g1, cut, forget, retain)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m1.state_dict(), "optimizer": o1.state_dict(), "scheduler": s1.state_dict(),
                "data_rng": g1.get_state(), "torch_rng": torch.get_rng_state(), "step": cut}, path)
    del m1, o1, s1, g1

    # a fresh process would build everything anew: a different init proves the load restores it
    m2, o2, s2 = _make(kind, seed=1)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and containers only
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["optimizer"])
    s2.load_state_dict(ckpt["scheduler"])
    g2 = torch.Generator()
    g2.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    kept_b = _unlearn(m2, o2, s2, g2, total - ckpt["step"], forget, retain)

    assert kept_a + kept_b == kept_full
    assert all(0 < k < 1 for k in kept_full)
    for p, q in zip(m2.parameters(), model.parameters()):
        assert torch.equal(p, q)
    sd_resumed, sd_full = o2.state_dict(), opt.state_dict()
    assert sd_resumed["param_groups"] == sd_full["param_groups"]
    for k, st in sd_full["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(sd_resumed["state"][k][name]), torch.as_tensor(v)), (k, name)
    assert "diagnostics" not in str(list(ckpt["optimizer"]))  # diagnostics never enter state_dict


# --------------------------------------------------------------------------------- memory budget
def test_vmap_engine_holds_at_most_the_budget_per_chunk(monkeypatch):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    params = list(model.parameters())
    per_sample = sum(p.numel() for p in params) * 4  # float32 bytes of one sample's gradients
    budget = 4 * per_sample + per_sample // 2  # room for 4.5 samples: chunks of 4
    seen: list[tuple[int, int]] = []  # (samples, bytes of per-sample gradients) of each vmap call
    real_vmap = stats_module.vmap

    def spy(fn, *args, **kwargs):
        batched = real_vmap(fn, *args, **kwargs)

        def run(*a, **k):
            out = batched(*a, **k)
            grads = out[0] if isinstance(out, tuple) else out
            leaves = torch.utils._pytree.tree_leaves(grads)
            seen.append((leaves[0].shape[0], sum(t.numel() * t.element_size() for t in leaves)))
            return out

        return run

    monkeypatch.setattr(stats_module, "vmap", spy)
    x, y = torch.randn(11, 20), torch.randint(0, 5, (11,))
    st = VmapEngine(memory_budget=budget)(model, params, (x, y))
    assert [s for s, _ in seen] == [4, 4, 3]
    assert max(b for _, b in seen) <= budget
    _, means, m2s = loop_moments(model, params, x, y)  # the chunks merge to the whole-batch moments
    for a, b in zip(st.mean + st.m2, means + m2s):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)

    # the same budget through an optimizer: pass the engine
    seen.clear()
    opt = ProbablyAlignedSGD(params, lr=0.1, model=model, engine=VmapEngine(memory_budget=budget))
    opt.step(forget=(x, y), retain=(x[:7], y[:7]))
    assert [s for s, _ in seen] == [4, 4, 3, 4, 3]
    assert max(b for _, b in seen) <= budget
