"""Datasets, the deterministic train/test split and the forget-set selection.

Every dataset is held in memory as it is stored on disk (``uint8`` for image files), in
``(N, C, H, W)`` layout, and normalised one batch at a time: CIFAR-10 stays at 150 MB instead of
600 MB of float32. Nothing is ever downloaded; the local-folder datasets must already be on disk.
MNIST-1D (Greydanus & Kobak: 10 classes of 1-D signals of length 40) is generated locally by the
``mnist1d`` package and kept as ``float32`` signals of shape ``(N, 1, 1, 40)``; the generated
arrays are cached on disk, so only the first load pays for the generation.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "ForgetSpec",
    "ImageDataset",
    "ImageSet",
    "UnlearningSplit",
    "load_dataset",
    "make_split",
    "select_forget",
]

DATASETS = ("digits", "mnist1d", "mnist", "fashionmnist", "cifar10", "cifar100", "imagefolder")

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ImageSet:
    """Images and labels in memory; :meth:`batch` returns normalised float tensors.

    ``x`` keeps the stored values (``uint8`` 0..255 for image files, 0..16 for scikit-learn's
    digits, ``float32`` signals for MNIST-1D); ``scale`` is the value of full intensity (1 for
    MNIST-1D), ``mean``/``std`` are per channel on the ``[0, 1]`` scale (on ``x / scale``).
    """

    x: Tensor
    y: Tensor
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, idx: Tensor | None = None, device: torch.device | str | None = None) -> Batch:
        """Normalised ``(inputs, labels)`` for the rows ``idx`` (all rows when ``None``)."""
        x = self.x if idx is None else self.x[idx]
        y = self.y if idx is None else self.y[idx]
        x = x.to(device=device, dtype=torch.float32) / self.scale
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std, y.to(device)


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset with its own train and test parts."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """A short hash of the contents, so that cached models notice a changed data folder."""
        h = hashlib.sha256(self.name.encode())
        for part in (self.train, self.test):
            h.update(str(tuple(part.x.shape)).encode())
            h.update(part.y.numpy().astype(np.int64).tobytes())
            # A strided sample of the pixels is enough to tell two data folders apart, and cheap.
            flat = part.x.reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 100_000)].numpy().tobytes())
        return h.hexdigest()[:16]


def _channel_stats(x: Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.to(torch.float64) / scale
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _make_dataset(name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                  classes: tuple[str, ...], scale: float) -> ImageDataset:
    # Normalisation statistics come from the training part only, as a user would compute them.
    mean, std = _channel_stats(x_train, scale)
    return ImageDataset(
        name=name,
        train=ImageSet(x_train.contiguous(), y_train.long(), scale, mean, std),
        test=ImageSet(x_test.contiguous(), y_test.long(), scale, mean, std),
        classes=classes,
    )


def _load_digits(split_seed: int, test_fraction: float) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=bunch.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return _make_dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                         tuple(str(c) for c in range(10)), scale=16.0)


# MNIST-1D cache: bump when the stored layout changes. The file name carries the versions of the
# packages that compute the data (mnist1d's defaults belong to its version), so an upgrade
# regenerates, and a cache hit needs no import of mnist1d (which imports matplotlib.pyplot).
_MNIST1D_FORMAT = 1
_MNIST1D_HINT = "MNIST-1D is generated by the mnist1d package: pip install mnist1d"


def _mnist1d_cache_file(cache_dir: Path) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "?"

    text = repr((_MNIST1D_FORMAT, ver("mnist1d"), ver("numpy"), ver("scipy")))
    return cache_dir / f"mnist1d-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The package's default arguments (5000 signals, seed 42) and its own 80/20 split."""
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(_MNIST1D_HINT) from err
    # make_dataset seeds the global numpy and python generators; put back the caller's state.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())  # never get_dataset: that one downloads
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(raw["x"], dtype=np.float32), "y": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    x, y, xt, yt = arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]
    ok = (x.ndim == 2 and xt.ndim == 2 and x.shape[1] == xt.shape[1] > 0
          and x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
          and y.shape == x.shape[:1] and yt.shape == xt.shape[:1] and len(y) > 0)
    return arrays if ok else None


def _load_mnist1d(cache_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """MNIST-1D from the package's default arguments: 4000 train / 1000 test signals of length 40,
    the same on every call.

    The generated arrays are cached as an ``.npz`` in ``cache_dir``; a missing or unreadable file
    is regenerated (about a second) and rewritten atomically.
    """
    if cache_dir is None:
        from .training import default_cache_dir  # here, not at the top: training imports data

        cache_dir = default_cache_dir()
    path = _mnist1d_cache_file(Path(cache_dir).expanduser())
    arrays = _read_mnist1d_cache(path) if path.is_file() else None
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache folder only costs the generation next time
    x_tr, x_te = (torch.from_numpy(arrays[k]).unsqueeze(1).unsqueeze(1) for k in ("x", "x_test"))
    return _make_dataset("mnist1d", x_tr, torch.from_numpy(arrays["y"]), x_te,
                         torch.from_numpy(arrays["y_test"]), tuple(str(c) for c in range(10)), scale=1.0)


def _missing(what: str, folder: Path, files: list[str], hint: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected the folder {folder} with {', '.join(files)}. "
        f"masked-optim never downloads data; {hint} and point --data-root at the folder that "
        f"contains it.")


def _load_cifar(root: Path, hundred: bool) -> ImageDataset:
    # torchvision's CIFAR10/CIFAR100 refuse any copy whose md5 differs from the official archive
    # (a subset, a re-pickled copy); reading the same python-pickle layout ourselves accepts them.
    if hundred:
        name, folder = "cifar100", root / "cifar-100-python"
        train_files, test_files, meta_file, label_key, names_key = ["train"], ["test"], "meta", \
            "fine_labels", "fine_label_names"
        tv = "CIFAR100"
    else:
        name, folder = "cifar10", root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = ["test_batch"], "batches.meta", "labels", \
            "label_names"
        tv = "CIFAR10"
    needed = train_files + test_files
    if not all((folder / f).is_file() for f in needed):
        raise _missing(name.upper(), folder, needed,
                       f"get it once with torchvision.datasets.{tv}(root, download=True) "
                       f"(the 'python version' archive)")

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    x_tr, y_tr = read(train_files)
    x_te, y_te = read(test_files)
    n_classes = 100 if hundred else 10
    classes: tuple[str, ...] = tuple(str(i) for i in range(n_classes))
    if (folder / meta_file).is_file():
        with open(folder / meta_file, "rb") as fh:
            meta = pickle.load(fh, encoding="latin1")
        if len(meta.get(names_key, [])) == n_classes:
            classes = tuple(meta[names_key])
    return _make_dataset(name, x_tr, y_tr, x_te, y_te, classes, scale=255.0)


def _load_mnist_like(root: Path, fashion: bool) -> ImageDataset:
    from torchvision import datasets as tvd

    cls = tvd.FashionMNIST if fashion else tvd.MNIST
    base = root / cls.__name__
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as err:
        raw = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]
        raise _missing(cls.__name__, base / "raw", raw,
                       f"get it once with torchvision.datasets.{cls.__name__}(root, download=True) "
                       f"(or put processed/training.pt and processed/test.pt under {base})") from err
    return _make_dataset(
        "fashionmnist" if fashion else "mnist",
        train.data.unsqueeze(1), torch.as_tensor(train.targets),
        test.data.unsqueeze(1), torch.as_tensor(test.targets),
        tuple(train.classes), scale=255.0)


def _load_imagefolder(root: Path, image_size: int) -> ImageDataset:
    from torchvision import datasets as tvd
    from torchvision import transforms

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing("ImageFolder data", root, ["train/<class>/<images>", "test/<class>/<images>"],
                       "arrange your images as root/train/<class>/*.png and root/test/<class>/*.png "
                       "(val/ is accepted for test/)")
    tf = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.PILToTensor(),
    ])

    def read(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
        ds = tvd.ImageFolder(str(folder), transform=tf)  # the default loader converts to RGB
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        return xs, torch.as_tensor(ds.targets), list(ds.classes)

    x_tr, y_tr, classes = read(root / "train")
    x_te, y_te, test_classes = read(test_dir)
    # ImageFolder numbers classes by the sorted folder names of each tree; a test tree that lacks
    # a class would silently shift every label after it, so map test labels through the names.
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise ValueError(f"{test_dir} has classes not in {root / 'train'}: {unknown}")
    remap = torch.tensor([classes.index(c) for c in test_classes])
    return _make_dataset("imagefolder", x_tr, y_tr, x_te, remap[y_te], tuple(classes), scale=255.0)


def load_dataset(name: str, data_root: str | os.PathLike[str] | None = None, *, split_seed: int = 0,
                 test_fraction: float = 0.2, image_size: int = 32,
                 cache_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load a dataset by name; see :data:`DATASETS`.

    ``digits`` (scikit-learn's 1797 8x8 handwritten digits) is embedded; it is split into train
    and test by a stratified split with ``split_seed`` and ``test_fraction``. ``mnist1d`` (MNIST-1D,
    4000 train / 1000 test signals of length 40, shape ``(1, 1, 40)``) is generated by the
    ``mnist1d`` package with its default arguments and its own split (``split_seed`` and
    ``test_fraction`` do not apply); the arrays are cached in ``cache_dir`` (default
    :func:`~masked_optim.workbench.training.default_cache_dir`). The others are read
    from ``data_root`` in the layouts torchvision uses (``cifar-10-batches-py/``,
    ``cifar-100-python/``, ``MNIST/raw/``, ``FashionMNIST/raw/``) or, for ``imagefolder``,
    ``data_root/train/<class>/`` and ``data_root/test/<class>/`` (resized to ``image_size``).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "digits":
        return _load_digits(split_seed, test_fraction)
    if key == "mnist1d":
        return _load_mnist1d(cache_dir)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_root is None:
        raise ValueError(f"dataset {name!r} is read from a local folder: pass data_root (--data-root)")
    root = Path(data_root).expanduser()
    if key in ("cifar10", "cifar100"):
        return _load_cifar(root, hundred=key == "cifar100")
    if key in ("mnist", "fashionmnist"):
        return _load_mnist_like(root, fashion=key == "fashionmnist")
    return _load_imagefolder(root, image_size)


@dataclass(frozen=True)
class ForgetSpec:
    """Which training samples to forget: ``random:0.1`` (a fraction), ``random:100`` (a count)
    or ``class:3`` / ``class:3,5`` (every training sample of those classes)."""

    kind: str
    amount: float = 0.0
    classes: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ForgetSpec:
        """Parse the command-line form; raises ``ValueError`` with the accepted forms."""
        kind, sep, value = text.strip().partition(":")
        kind = kind.lower()
        try:
            if sep and kind == "random":
                amount = float(value)
                if amount <= 0 or (amount >= 1 and amount != int(amount)):
                    raise ValueError
                return cls("random", amount=amount)
            if sep and kind == "class":
                classes = tuple(sorted({int(c) for c in value.split(",") if c.strip()}))
                if not classes or min(classes) < 0:
                    raise ValueError
                return cls("class", classes=classes)
        except ValueError:
            pass
        raise ValueError(f"bad forget spec {text!r}: use random:FRACTION (0<f<1), random:COUNT or "
                         f"class:C[,C...]")

    def __str__(self) -> str:
        if self.kind == "class":
            return "class:" + ",".join(str(c) for c in self.classes)
        amount = int(self.amount) if self.amount >= 1 else self.amount
        return f"random:{amount}"


def select_forget(labels: Tensor, spec: ForgetSpec, seed: int = 0) -> Tensor:
    """Indices (sorted) of the training samples to forget; deterministic in ``seed``."""
    n = int(labels.shape[0])
    if spec.kind == "class":
        present = set(labels.unique().tolist())
        missing = [c for c in spec.classes if c not in present]
        if missing:
            raise ValueError(f"forget classes {missing} do not occur in the training set")
        mask = torch.isin(labels, torch.tensor(spec.classes, dtype=labels.dtype))
        return mask.nonzero().flatten()
    count = int(spec.amount) if spec.amount >= 1 else int(round(spec.amount * n))
    if not 0 < count < n:
        raise ValueError(f"{spec} selects {count} of {n} training samples")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return perm[:count].sort().values


@dataclass(frozen=True)
class UnlearningSplit:
    """A dataset cut into forget, retain and test index sets.

    Retain indices keep the training-set order, so "the first N retain samples" (the members of
    the MIA attacker, docs/design.md §6) is well defined. For class-wise forgetting the forgotten classes
    are removed from the test set, as SalUn does, so TA measures the remaining classes.
    """

    data: ImageDataset
    spec: ForgetSpec
    forget_idx: Tensor
    retain_idx: Tensor
    test_idx: Tensor
    split_seed: int = 0

    def forget(self, device: torch.device | str | None = None) -> Batch:
        """The whole forget set (true labels)."""
        return self.data.train.batch(self.forget_idx, device)

    def retain(self, device: torch.device | str | None = None) -> Batch:
        """The whole retain set."""
        return self.data.train.batch(self.retain_idx, device)

    def test(self, device: torch.device | str | None = None) -> Batch:
        """The (possibly class-filtered) test set."""
        return self.data.test.batch(self.test_idx, device)

    def fingerprint(self) -> str:
        """Hash of the data and the retain set, the inputs of a retrained model."""
        h = hashlib.sha256(self.data.fingerprint().encode())
        h.update(self.retain_idx.numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]


def make_split(data: ImageDataset, spec: ForgetSpec | str, seed: int = 0) -> UnlearningSplit:
    """Select the forget set by ``spec`` (random selection seeded by ``seed``)."""
    if isinstance(spec, str):
        spec = ForgetSpec.parse(spec)
    if spec.kind == "class" and max(spec.classes) >= data.num_classes:
        raise ValueError(f"{spec}: {data.name} has classes 0..{data.num_classes - 1}")
    forget_idx = select_forget(data.train.y, spec, seed)
    keep = torch.ones(len(data.train), dtype=torch.bool)
    keep[forget_idx] = False
    retain_idx = keep.nonzero().flatten()
    if spec.kind == "class":
        test_keep = ~torch.isin(data.test.y, torch.tensor(spec.classes, dtype=data.test.y.dtype))
        test_idx = test_keep.nonzero().flatten()
    else:
        test_idx = torch.arange(len(data.test))
    return UnlearningSplit(data, spec, forget_idx, retain_idx, test_idx, seed)
