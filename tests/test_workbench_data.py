"""Data loading (the embedded digits and local folders in torchvision's layouts), the split and the
forget-set selection. Every local-folder test writes its own tiny data set."""
import pickle
import struct

import numpy as np
import pytest
import torch

from masked_optim.workbench.data import ForgetSpec, load_dataset, make_split, select_forget


# --------------------------------------------------------------------------- digits and splits

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split_is_stratified_and_deterministic(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    counts = torch.bincount(digits.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of ~180 per class
    again = load_dataset("digits")
    assert torch.equal(again.train.y, digits.train.y) and torch.equal(again.test.x, digits.test.x)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.train.y, digits.train.y)


def test_batch_normalises_with_training_statistics(digits):
    x, y = digits.train.batch()
    assert x.dtype == torch.float32 and x.shape == (1437, 1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    xs, ys = digits.train.batch(torch.tensor([5, 0]))
    torch.testing.assert_close(xs, x[[5, 0]])
    assert torch.equal(ys, y[[5, 0]])


@pytest.mark.parametrize("text,canonical", [("random:0.1", "random:0.1"), ("random:25", "random:25"),
                                            ("class:3", "class:3"), ("CLASS:5,2", "class:2,5")])
def test_forget_spec_round_trip(text, canonical):
    assert str(ForgetSpec.parse(text)) == canonical


@pytest.mark.parametrize("bad", ["random", "random:0", "random:1.5", "class:", "class:-1", "half:0.1",
                                 "random:x"])
def test_forget_spec_rejects(bad):
    with pytest.raises(ValueError, match="forget spec"):
        ForgetSpec.parse(bad)


def test_random_forgetting_selects_the_asked_fraction_deterministically():
    labels = torch.arange(1000) % 7
    a = select_forget(labels, ForgetSpec.parse("random:0.1"), seed=3)
    assert len(a) == 100 and len(set(a.tolist())) == 100
    assert torch.equal(a, a.sort().values)
    assert torch.equal(a, select_forget(labels, ForgetSpec.parse("random:0.1"), seed=3))
    assert not torch.equal(a, select_forget(labels, ForgetSpec.parse("random:0.1"), seed=4))
    assert len(select_forget(labels, ForgetSpec.parse("random:37"), seed=0)) == 37


def test_class_forgetting_selects_exactly_the_class(digits):
    split = make_split(digits, "class:3")
    assert torch.all(digits.train.y[split.forget_idx] == 3)
    assert not torch.any(digits.train.y[split.retain_idx] == 3)
    assert len(split.forget_idx) == int((digits.train.y == 3).sum())
    # The forgotten class leaves the test set too (SalUn's class-wise protocol).
    assert not torch.any(digits.test.y[split.test_idx] == 3)
    assert len(split.test_idx) == int((digits.test.y != 3).sum())
    with pytest.raises(ValueError):
        make_split(digits, "class:10")


def test_split_partitions_training_set_and_keeps_retain_order(digits):
    split = make_split(digits, "random:0.2", seed=0)
    both = torch.cat([split.forget_idx, split.retain_idx]).sort().values
    assert torch.equal(both, torch.arange(len(digits.train)))
    assert torch.all(split.retain_idx[1:] > split.retain_idx[:-1])
    assert len(split.test_idx) == len(digits.test)
    assert split.fingerprint() != make_split(digits, "random:0.2", seed=1).fingerprint()


# --------------------------------------------------------------------------- CIFAR pickles

def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _cifar_images(rng, 3), [int(v) for v in rng.integers(0, 10, 3)]
        _write_pickle(folder / f"data_batch_{i}", {"data": x, "labels": y, "batch_label": f"b{i}"})
        train_x.append(x)
        train_y += y
    test_x, test_y = _cifar_images(rng, 4), [1, 2, 3, 4]
    _write_pickle(folder / "test_batch", {"data": test_x, "labels": test_y})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names})

    data = load_dataset("cifar10", tmp_path)
    assert data.classes == tuple(names) and data.input_shape == (3, 32, 32)
    assert torch.equal(data.train.y, torch.tensor(train_y))
    assert torch.equal(data.test.y, torch.tensor(test_y))
    # Row layout: 1024 red values, then green, then blue, each row-major.
    flat = np.concatenate(train_x)
    assert data.train.x.dtype == torch.uint8
    assert np.array_equal(data.train.x.numpy().reshape(15, -1), flat)
    assert data.train.x[4, 1, 2, 3].item() == flat[4, 1024 + 2 * 32 + 3]

    # Independent reference: torchvision's own reader on the same files (its md5 check off).
    from torchvision.datasets import CIFAR10, cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    tv = CIFAR10(str(tmp_path), train=True, download=False)
    assert np.array_equal(data.train.x.permute(0, 2, 3, 1).numpy(), tv.data)
    assert tv.targets == train_y


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    x, fine = _cifar_images(rng, 6), [0, 99, 5, 42, 7, 7]
    _write_pickle(folder / "train", {"data": x, "fine_labels": fine, "coarse_labels": [0] * 6})
    _write_pickle(folder / "test", {"data": x[:2], "fine_labels": [3, 4], "coarse_labels": [0, 0]})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                    "coarse_label_names": ["x"] * 20})
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.classes[42] == "c42"
    assert torch.equal(data.train.y, torch.tensor(fine))
    assert np.array_equal(data.test.x.numpy().reshape(2, -1), x[:2])


def test_missing_cifar_names_the_expected_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert "never downloads" in str(err.value)
    with pytest.raises(ValueError, match="data_root"):
        load_dataset("cifar10", None)


# --------------------------------------------------------------------------- MNIST / FashionMNIST

def _write_idx(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # unsigned byte data, ndim dimensions
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for d in array.shape:
            fh.write(struct.pack(">I", d))
        fh.write(array.astype(np.uint8).tobytes())


def _mnist_arrays(rng):
    return (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.uint8),
            rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), rng.integers(0, 10, 3).astype(np.uint8))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_like_reads_raw_idx_files(tmp_path, name, folder):
    xtr, ytr, xte, yte = _mnist_arrays(np.random.default_rng(2))
    raw = tmp_path / folder / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", xtr)
    _write_idx(raw / "train-labels-idx1-ubyte", ytr)
    _write_idx(raw / "t10k-images-idx3-ubyte", xte)
    _write_idx(raw / "t10k-labels-idx1-ubyte", yte)
    data = load_dataset(name, tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert np.array_equal(data.train.x[:, 0].numpy(), xtr)
    assert np.array_equal(data.test.y.numpy(), yte.astype(np.int64))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_like_reads_processed_files(tmp_path, name, folder):
    xtr, ytr, xte, yte = _mnist_arrays(np.random.default_rng(3))
    processed = tmp_path / folder / "processed"
    processed.mkdir(parents=True)
    torch.save((torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64))), processed / "training.pt")
    torch.save((torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64))), processed / "test.pt")
    data = load_dataset(name, tmp_path)
    assert np.array_equal(data.test.x[:, 0].numpy(), xte)
    assert np.array_equal(data.train.y.numpy(), ytr.astype(np.int64))


def test_missing_mnist_names_the_expected_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashionmnist", tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)


# --------------------------------------------------------------------------- ImageFolder

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def _write_png(path, colour, size=40):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def test_imagefolder_reads_and_resizes_pngs_and_maps_test_classes_by_name(tmp_path):
    for cls, colour in COLOURS.items():
        for i in range(2):
            _write_png(tmp_path / "train" / cls / f"{i}.png", colour)
    # The test tree lacks "cat": its own numbering would call "dog" 0; the loader must say 1.
    _write_png(tmp_path / "test" / "dog" / "a.png", COLOURS["dog"])
    _write_png(tmp_path / "test" / "emu" / "b.png", COLOURS["emu"], size=17)
    data = load_dataset("imagefolder", tmp_path, image_size=32)
    assert data.classes == ("cat", "dog", "emu")
    assert data.input_shape == (3, 32, 32)
    assert torch.equal(data.train.y, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(data.test.y, torch.tensor([1, 2]))
    for img, label in zip(data.train.x, data.train.y):
        want = torch.tensor(COLOURS[data.classes[label]], dtype=torch.uint8).view(3, 1, 1)
        assert torch.equal(img, want.expand(3, 32, 32))


def test_imagefolder_rejects_unknown_test_class_and_missing_tree(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", tmp_path)
    _write_png(tmp_path / "train" / "cat" / "0.png", COLOURS["cat"])
    _write_png(tmp_path / "test" / "yak" / "0.png", COLOURS["cat"])
    with pytest.raises(ValueError, match="yak"):
        load_dataset("imagefolder", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", ".")


# --------------------------------------------------------------------------- MNIST-1D

@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A cache folder of this module's own (``$MASKED_OPTIM_CACHE``, which load_dataset reads)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKED_OPTIM_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def mnist1d(mnist1d_cache):
    return load_dataset("mnist1d")  # generated once (about a second), then cached


@pytest.fixture(scope="module")
def mnist1d_reference():
    """Independent reference: the package's own generator, called directly with its defaults."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    state, py_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
        random.setstate(py_state)


def test_mnist1d_shapes_and_classes(mnist1d):
    assert mnist1d.name == "mnist1d" and mnist1d.num_classes == 10
    assert (len(mnist1d.train), len(mnist1d.test)) == (4000, 1000)
    assert mnist1d.input_shape == (1, 1, 40)
    assert mnist1d.train.x.dtype == torch.float32 and mnist1d.train.scale == 1.0
    assert set(mnist1d.train.y.tolist()) == set(range(10)) == set(mnist1d.test.y.tolist())
    x, y = mnist1d.train.batch()
    assert x.shape == (4000, 1, 1, 40) and y.dtype == torch.int64
    # Normalised with the training part's statistics (one channel).
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    xt, _ = mnist1d.test.batch()
    torch.testing.assert_close(xt, (mnist1d.test.x - mnist1d.train.mean[0]) / mnist1d.train.std[0])


def test_mnist1d_equals_the_package_generator_and_is_deterministic(mnist1d, mnist1d_reference):
    ref = mnist1d_reference
    assert np.array_equal(mnist1d.train.x.reshape(4000, 40).numpy(), ref["x"].astype(np.float32))
    assert np.array_equal(mnist1d.test.x.reshape(1000, 40).numpy(), ref["x_test"].astype(np.float32))
    assert np.array_equal(mnist1d.train.y.numpy(), ref["y"])
    assert np.array_equal(mnist1d.test.y.numpy(), ref["y_test"])
    again = load_dataset("MNIST-1D")
    assert torch.equal(again.train.x, mnist1d.train.x) and torch.equal(again.test.y, mnist1d.test.y)
    assert again.fingerprint() == mnist1d.fingerprint() != load_dataset("digits").fingerprint()


def test_mnist1d_cache_round_trip(mnist1d, mnist1d_cache, monkeypatch, tmp_path):
    from masked_optim.workbench import data as data_mod

    files = list(mnist1d_cache.glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list(mnist1d_cache.glob("*.tmp*"))
    generate = data_mod._generate_mnist1d

    def refuse():
        raise AssertionError("generated although the cache holds the arrays")

    monkeypatch.setattr(data_mod, "_generate_mnist1d", refuse)
    cached = load_dataset("mnist1d")
    assert torch.equal(cached.train.x, mnist1d.train.x) and torch.equal(cached.test.x, mnist1d.test.x)
    assert cached.train.mean == mnist1d.train.mean and cached.train.std == mnist1d.train.std

    # Arrays of the wrong kind are not accepted from the cache.
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((3, 40)), y=np.zeros(3), x_test=np.zeros((1, 40)), y_test=np.zeros(1))
    assert data_mod._read_mnist1d_cache(wrong) is None
    np.savez(wrong, x=np.zeros((3, 40), np.float32), y=np.zeros(2, np.int64),
             x_test=np.zeros((1, 40), np.float32), y_test=np.zeros(1, np.int64))
    assert data_mod._read_mnist1d_cache(wrong) is None

    # A corrupt file is regenerated and rewritten.
    calls = []
    monkeypatch.setattr(data_mod, "_generate_mnist1d", lambda: calls.append(1) or generate())
    files[0].write_bytes(b"not a zip file")
    np.random.seed(123)
    before = np.random.rand()
    np.random.seed(123)
    fresh = load_dataset("mnist1d")
    assert np.random.rand() == before  # the generator's global seeding does not leak
    assert torch.equal(fresh.train.x, mnist1d.train.x) and torch.equal(fresh.test.y, mnist1d.test.y)
    assert len(calls) == 1 and data_mod._read_mnist1d_cache(files[0]) is not None

    # An explicit cache folder, created on demand.
    load_dataset("mnist1d", cache_dir=tmp_path / "sub")
    assert len(calls) == 2 and len(list((tmp_path / "sub").glob("mnist1d-*.npz"))) == 1


def test_mnist1d_splits(mnist1d):
    split = make_split(mnist1d, "random:0.1", seed=0)
    assert (len(split.forget_idx), len(split.retain_idx), len(split.test_idx)) == (400, 3600, 1000)
    both = torch.cat([split.forget_idx, split.retain_idx]).sort().values
    assert torch.equal(both, torch.arange(4000))
    x, y = split.forget()
    assert x.shape == (400, 1, 1, 40) and len(y) == 400
    cls = make_split(mnist1d, "class:3")
    assert torch.all(mnist1d.train.y[cls.forget_idx] == 3)
    assert len(cls.forget_idx) == int((mnist1d.train.y == 3).sum()) > 0
    assert not torch.any(mnist1d.test.y[cls.test_idx] == 3)
    assert len(cls.test_idx) == int((mnist1d.test.y != 3).sum()) < 1000
