"""The run loop, batch streams, training and the model cache."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from masked_optim.workbench.data import load_dataset, make_split
from masked_optim.workbench.methods import FT, GA, RL, Phase
from masked_optim.workbench.metrics import accuracy
from masked_optim.workbench.models import build_model, resnet18_32
from masked_optim.workbench.runner import BatchStream, phase_batch_sizes, run_unlearning
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
