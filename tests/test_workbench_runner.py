"""The run loop, batch streams, training and the model cache."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from masked_optim.workbench.data import load_dataset, make_split
from masked_optim.workbench.methods import FT, GA, RL, Phase
from masked_optim import ProbablyAlignedSGD
from masked_optim.workbench import runner
from masked_optim.workbench.data import ImageSet
from masked_optim.workbench.metrics import accuracy
from masked_optim.workbench.models import build_model, resnet18_32
from masked_optim.workbench.runner import BatchStream, check_batch_indices, make_optimizer, \
    phase_batch_sizes, run_unlearning
from masked_optim.workbench.training import ModelCache, TrainConfig, augment_batch, reference_model


@pytest.fixture(scope="module")
def split():
    return make_split(load_dataset("digits"), "class:3")


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=64)
    model, rec = reference_model("original", split, "mlp", config=cfg, seed=0, cache=cache, progress=False)
    return model, cache, cfg, rec


def test_batch_stream_covers_every_index_once_per_pass():
    idx = torch.arange(10, 20)
    s = BatchStream(idx, torch.Generator().manual_seed(0))
    first = torch.cat([s.take(4), s.take(4), s.take(2)])
    assert sorted(first.tolist()) == list(range(10, 20))
    second = torch.cat([s.take(3) for _ in range(3)] + [s.take(1)])
    assert sorted(second.tolist()) == list(range(10, 20))
    assert len(s.take(50)) == 10  # capped at the set size
    with pytest.raises(ValueError):
        BatchStream(idx[:0], torch.Generator())


def test_phase_batch_sizes_closed_form():
    assert phase_batch_sizes(Phase(over="retain"), 64, 146, 1291) == (64, 64, math.ceil(1291 / 64))
    assert phase_batch_sizes(Phase(over="forget"), 64, 146, 1291) == (64, 64, 3)
    assert phase_batch_sizes(Phase(over="forget", batch_size=32), 64, 20, 1291) == (20, 32, 1)
    # "all": 64 * 146 / 1437 = 6.5 -> 7 forget + 57 retain per batch, ceil(1437 / 64) steps.
    assert phase_batch_sizes(Phase(over="all"), 64, 146, 1291) == (7, 57, 23)
    assert phase_batch_sizes(Phase(over="all"), 64, 1, 1291)[0] == 1  # never more than exist
    assert phase_batch_sizes(Phase(over="all"), 64, 5, 1291)[0] == 2  # at least 2 for a variance


def test_train_classifier_fits_and_cache_round_trips(split, trained):
    model, cache, cfg, rec = trained
    assert not rec["cached"]
    assert accuracy(model, split.data.train, torch.arange(len(split.data.train))) > 90
    again, rec2 = reference_model("original", split, "mlp", config=cfg, seed=0, cache=cache, progress=False)
    assert rec2["cached"] and rec2["key"] == rec["key"]
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    # Anything that changes the weights changes the key.
    other = ModelCache.key({"a": 1, "seed": 1})
    assert other != ModelCache.key({"a": 1, "seed": 0})
    assert ModelCache.key({"seed": 0, "a": 1}) == ModelCache.key({"a": 1, "seed": 0})
    disabled = ModelCache(cache.root, enabled=False)
    fresh = build_model("mlp", (1, 8, 8), 10)
    assert not disabled.load_into(fresh, {"kind": "original"})
    assert disabled.save(fresh, {"kind": "x"}) is None


def test_retrain_never_sees_the_forget_set(split, trained):
    _, cache, cfg, _ = trained
    model, _ = reference_model("retrain", split, "mlp", config=cfg, seed=0, cache=cache, progress=False)
    assert accuracy(model, split.data.train, split.forget_idx) < 5  # class 3 is never predicted
    assert accuracy(model, split.data.train, split.retain_idx) > 90


def test_plain_run_equals_a_hand_written_sgd_loop(split, trained):
    model = copy.deepcopy(trained[0])
    ref = copy.deepcopy(model)
    res = run_unlearning(model, FT(), split, masked=False, lr=0.02, epochs=1, batch_size=128,
                         seed=5, evaluate_at_end=False)
    # The same batches, drawn as the runner documents: two streams on one generator.
    gen = torch.Generator().manual_seed(5)
    fs, rs = BatchStream(split.forget_idx, gen), BatchStream(split.retain_idx, gen)
    opt = torch.optim.SGD(ref.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    steps = math.ceil(len(split.retain_idx) / 128)
    for _ in range(steps):
        fs.take(128)
        x, y = split.data.train.batch(rs.take(128))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    assert res.steps == steps and res.kept_fraction == 1.0 and res.metrics is None
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_masked_run_reports_kept_fraction_trace_and_metrics(split, trained):
    model = copy.deepcopy(trained[0])
    res = run_unlearning(model, RL(), split, masked=True, lr=0.05, epochs=1, batch_size=128,
                         seed=0, track_every=4)
    steps = math.ceil(1437 / 128)
    assert res.steps == steps == len(res.kept)
    assert all(0.0 <= k <= 1.0 for k in res.kept) and res.kept_fraction < 1.0
    assert [t["step"] for t in res.trace] == [0, 4, 8, steps]
    assert res.trace[0]["FA"] > 90 and res.metrics is not None and res.runtime_s > 0
    assert not res.diverged


def test_ga_run_steps_over_the_forget_set(split, trained):
    model = copy.deepcopy(trained[0])
    res = run_unlearning(model, GA(), split, masked=False, lr=0.5, epochs=2, batch_size=64, seed=0)
    assert res.steps == 2 * math.ceil(len(split.forget_idx) / 64)
    assert res.metrics is not None and res.metrics.FA < 50


def test_augment_batch_keeps_shape_and_content_up_to_shift_and_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # every non-zero value of the output comes from the same image
        vals = set(out[i][out[i] != 0].tolist())
        assert vals <= set(x[i].flatten().tolist())


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_for_32x32(norm):
    model = resnet18_32(10, norm=norm)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.stride == (1, 1)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("GroupNorm" in kinds) == (norm == "group") and ("BatchNorm2d" in kinds) == (norm == "batch")
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _Recorder:
    """Stands in for ProbablyAlignedSGD in the runner and records the keywords it is built with."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, **kwargs):
        self.calls.append(kwargs)
        return ProbablyAlignedSGD(params, **kwargs)


def test_make_optimizer_passes_only_the_given_mask_options(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(runner, "ProbablyAlignedSGD", rec)
    model = torch.nn.Linear(3, 2)
    fixed = {"lr", "momentum", "weight_decay", "model"}
    make_optimizer(model, lr=0.1, mask_options={"quantile": "t", "soft": True})
    # nothing the caller did not give: the optimizer's own defaults apply
    assert set(rec.calls[-1]) - fixed == {"quantile", "soft"}
    assert rec.calls[-1]["quantile"] == "t" and rec.calls[-1]["soft"] is True
    make_optimizer(model, lr=0.1)
    assert set(rec.calls[-1]) == fixed
    make_optimizer(model, lr=0.1, masked=False)
    assert {k: v for k, v in rec.calls[-1].items() if k not in fixed} == {
        "confidence": None, "forget_confidence": None, "retain_confidence": None}
    # earlier call sites: mask keywords given directly join the options; others pass through
    make_optimizer(model, lr=0.1, confidence=0.8, engine="vmap")
    assert rec.calls[-1]["confidence"] == 0.8 and rec.calls[-1]["engine"] == "vmap"
    with pytest.raises(ValueError, match="both"):
        make_optimizer(model, lr=0.1, confidence=0.8, mask_options={"confidence": 0.9})
    with pytest.raises(ValueError, match="plain"):
        make_optimizer(model, lr=0.1, masked=False, mask_options={"confidence": 0.9})


def test_plain_optimizer_has_no_test_whatever_the_defaults():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, lr=0.1, masked=False)
    for key in ("confidence", "forget_confidence", "retain_confidence"):
        assert opt.param_groups[0][key] is None
    masked = make_optimizer(model, "adam", lr=0.1, mask_options={"retain_confidence": 0.7})
    assert masked.param_groups[0]["retain_confidence"] == 0.7


def test_new_mask_options_reach_the_optimizer():
    import inspect

    accepted = inspect.signature(ProbablyAlignedSGD).parameters
    options = {k: v for k, v in {"rescale": None, "rescale_scope": "group", "max_scale": 7.0}.items()
               if k in accepted}
    if not options:
        pytest.skip("this optimizer has no rescale options yet")
    opt = make_optimizer(torch.nn.Linear(3, 2), lr=0.1, mask_options=options)
    for k, v in options.items():
        assert opt.param_groups[0].get(k, getattr(opt, k, None)) == v


def test_check_batch_indices_are_disjoint_from_the_step_batch():
    pool = torch.arange(100, 130)
    exclude = pool[torch.randperm(30, generator=torch.Generator().manual_seed(1))[:12]]
    got = check_batch_indices(pool, exclude, 12, torch.Generator().manual_seed(0))
    assert len(got) == 12 and len(set(got.tolist())) == 12
    assert set(got.tolist()) <= set(pool.tolist()) - set(exclude.tolist())
    again = check_batch_indices(pool, exclude, 12, torch.Generator().manual_seed(0))
    assert torch.equal(got, again)
    # fewer left than asked: all of them
    assert sorted(check_batch_indices(pool, pool[:25], 12, torch.Generator()).tolist()) == list(range(125, 130))


def _record_steps(monkeypatch):
    """Record the indices behind every batch the runner hands to step()."""
    made: dict[int, torch.Tensor] = {}
    steps: list[dict[str, torch.Tensor | None]] = []
    batch = ImageSet.batch

    def recording_batch(self, idx=None, device=None):
        out = batch(self, idx, device)
        made[id(out[0])] = idx.clone()
        return out

    step = ProbablyAlignedSGD.step

    def recording_step(self, closure=None, **kw):
        steps.append({k: None if v is None else made[id(v[0])] for k, v in kw.items()})
        return step(self, closure, **kw)

    monkeypatch.setattr(ImageSet, "batch", recording_batch)
    monkeypatch.setattr(ProbablyAlignedSGD, "step", recording_step)
    return steps


def test_certified_run_checks_each_step_on_a_disjoint_retain_batch(split, trained, monkeypatch):
    steps = _record_steps(monkeypatch)
    res = run_unlearning(copy.deepcopy(trained[0]), RL(), split, masked=True, lr=0.05, epochs=1,
                         batch_size=128, seed=3, evaluate_at_end=False,
                         mask_options={"confidence": 0.6, "certify": 0.5})
    assert res.steps == len(steps) == math.ceil(1437 / 128)
    retain_set = set(split.retain_idx.tolist())
    for s in steps:
        r, c = s["retain"].tolist(), s["check_retain"].tolist()
        assert len(c) == len(r) and len(set(c)) == len(c)
        assert not set(c) & set(r) and set(c) <= retain_set
    # every step carried a certificate, and the run counts them
    assert sum(res.certificates.values()) == res.steps
    assert set(res.certificates) <= {"accepted", "tightened", "emptied", "skipped"}
    assert res.skipped_steps == res.certificates.get("skipped", 0)

    # The step batches are those of the plain run with the same seed (the check batches come
    # from a stream of their own), and a second run draws the same check batches.
    first = [(s["forget"].tolist(), s["retain"].tolist(), s["check_retain"].tolist()) for s in steps]
    steps.clear()
    run_unlearning(copy.deepcopy(trained[0]), RL(), split, masked=True, lr=0.05, epochs=1,
                   batch_size=128, seed=3, evaluate_at_end=False,
                   mask_options={"confidence": 0.6, "certify": 0.5})
    assert [(s["forget"].tolist(), s["retain"].tolist(), s["check_retain"].tolist()) for s in steps] == first
    steps.clear()
    run_unlearning(copy.deepcopy(trained[0]), RL(), split, masked=False, lr=0.05, epochs=1,
                   batch_size=128, seed=3, evaluate_at_end=False,
                   mask_options={"confidence": 0.6, "certify": 0.5})  # ignored: plain
    assert all(s == {} for s in steps)  # plain: step() without batches


def test_uncertified_run_passes_no_check_batch(split, trained, monkeypatch):
    steps = _record_steps(monkeypatch)
    res = run_unlearning(copy.deepcopy(trained[0]), FT(), split, masked=True, lr=0.01, epochs=1,
                         batch_size=256, seed=0, evaluate_at_end=False, mask_options={"confidence": 0.9})
    assert steps and all(set(s) == {"forget", "retain"} for s in steps)
    assert res.certificates == {}


def test_run_reports_collapse(split, trained):
    # A model that predicts one class: its retain accuracy is that class's share of the retain
    # set, within 10 points of the majority rate -> collapsed. lr = 0 keeps it as it is.
    model = copy.deepcopy(trained[0])
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(10.0) == 5)
    res = run_unlearning(model, FT(), split, masked=False, lr=0.0, epochs=1, batch_size=512, seed=0)
    share = 100.0 * float((split.data.train.y[split.retain_idx] == 5).float().mean())
    assert res.metrics.RA == pytest.approx(share)
    assert res.collapsed and res.metrics.collapsed and not res.diverged
    fine = run_unlearning(copy.deepcopy(trained[0]), FT(), split, masked=False, lr=0.0, epochs=1,
                          batch_size=512, seed=0)
    assert fine.metrics.RA > 90 and not fine.collapsed
