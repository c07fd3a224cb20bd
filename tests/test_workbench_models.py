"""The workbench's models on MNIST-1D: the MLP's per-dataset widths, the 1-D CNN, and the package's
fast statistics engine (HookEngine) covering both exactly."""
import pytest
import torch
from torch import nn

from masked_optim import HookEngine, VmapEngine
from masked_optim.workbench.data import load_dataset, make_split
from masked_optim.workbench.models import ARCHS, MLP, Conv1dNet, build_model, default_arch, default_hidden
from masked_optim.workbench.training import ModelCache, TrainConfig, default_train_config, reference_model


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKED_OPTIM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_dataset("mnist1d")


def _widths(model):
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


def test_mlp_widths_follow_the_dataset_and_keep_the_old_default():
    assert default_hidden("mnist1d") == (512, 512) and default_hidden("digits") == (256, 256)
    assert default_hidden(None) == (256, 256)
    assert default_arch("mnist1d") == "mlp" and default_arch("digits") == "mlp"
    assert "cnn1d" in ARCHS
    assert _widths(build_model("mlp", (1, 8, 8), 10)) == [256, 256, 10]  # callers without hidden
    assert _widths(MLP(64, 10)) == [256, 256, 10]
    mlp = build_model("mlp", (1, 1, 40), 10, hidden=default_hidden("mnist1d"))
    assert _widths(mlp) == [512, 512, 10] and mlp.net[1].in_features == 40
    with pytest.raises(ValueError, match="mlp"):
        build_model("cnn1d", (1, 1, 40), 10, hidden=(8,))


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_models_give_logits_on_an_mnist1d_batch(mnist1d, arch):
    torch.manual_seed(0)
    hidden = default_hidden("mnist1d") if arch == "mlp" else None
    model = build_model(arch, mnist1d.input_shape, mnist1d.num_classes, hidden=hidden)
    x, _ = mnist1d.train.batch(torch.arange(7))
    assert model(x).shape == (7, 10)
    if arch == "cnn1d":
        assert isinstance(model, Conv1dNet)
        allowed = (nn.Sequential, Conv1dNet, nn.Conv1d, nn.Linear, nn.ReLU, nn.MaxPool1d, nn.Flatten)
        assert all(isinstance(m, allowed) for m in model.modules())
        # (N, 1, 1, 40) is read as one channel of length 40; a 3-D input is taken as it is.
        torch.testing.assert_close(model(x[:, 0]), model(x))


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_hook_engine_covers_the_models_exactly(mnist1d, arch):
    torch.manual_seed(0)
    hidden = default_hidden("mnist1d") if arch == "mlp" else None
    model = build_model(arch, mnist1d.input_shape, mnist1d.num_classes, hidden=hidden)
    params = list(model.parameters())
    batch = mnist1d.train.batch(torch.arange(0, 4000, 250))  # 16 samples of several classes
    # fallback=None: every parameter is handled by a closed-form layer rule, none by vmap.
    fast = HookEngine(fallback=None)(model, params, batch)
    ref = VmapEngine()(model, params, batch)
    assert fast.n == ref.n == 16
    for i in range(len(params)):
        torch.testing.assert_close(fast.mean[i], ref.mean[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.m2[i], ref.m2[i], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.loss, ref.loss)
    # The one-pass pair of a forget and a retain batch, as the optimizers call it.
    forget, retain = mnist1d.train.batch(torch.arange(5)), mnist1d.train.batch(torch.arange(5, 16))
    got = HookEngine(fallback=None).pair(model, params, forget, retain)
    for stats, part in zip(got, (forget, retain)):
        want = VmapEngine()(model, params, part)
        assert stats.n == want.n
        for i in range(len(params)):
            torch.testing.assert_close(stats.mean[i], want.mean[i], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats.m2[i], want.m2[i], rtol=1e-4, atol=1e-6)

def test_reference_model_uses_the_dataset_widths_and_the_cache(mnist1d, tmp_path):
    split = make_split(mnist1d, "random:0.1")
    cache = ModelCache(tmp_path)
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=256)
    model, rec = reference_model("retrain", split, "mlp", config=cfg, seed=0, cache=cache, progress=False)
    assert _widths(model) == [512, 512, 10] and not rec["cached"]
    again, rec = reference_model("retrain", split, "mlp", config=cfg, seed=0, cache=cache, progress=False)
    assert rec["cached"]
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    conv, _ = reference_model("original", split, "cnn1d", config=cfg, seed=0, cache=cache, progress=False)
    assert isinstance(conv, Conv1dNet)


def test_mnist1d_recipe_memorises_the_training_set(mnist1d, tmp_path):
    """The default recipe fits the training set (the regime random forgetting is measurable in)
    and generalises as the paper's MLP does (~70 %); about two seconds on one CPU thread."""
    split = make_split(mnist1d, "random:0.1")
    model, _ = reference_model("original", split, "mlp", config=default_train_config("mnist1d"), seed=0,
                               cache=ModelCache(tmp_path), progress=False)
    with torch.no_grad():
        train = (model(mnist1d.train.batch()[0]).argmax(1) == mnist1d.train.y).float().mean().item()
        test = (model(mnist1d.test.batch()[0]).argmax(1) == mnist1d.test.y).float().mean().item()
    assert train >= 0.995 and 0.6 <= test <= 0.8
