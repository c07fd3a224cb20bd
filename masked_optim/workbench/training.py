"""Training of the original model (all training data) and of the retrained gold standard (retain
set only), cached on disk under a hash of everything that determines the weights."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import ImageSet, UnlearningSplit
from .models import build_model, default_hidden

__all__ = [
    "ModelCache",
    "TrainConfig",
    "augment_batch",
    "default_cache_dir",
    "default_train_config",
    "reference_model",
    "train_classifier",
]

CACHE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of ordinary training (SGD with momentum, cosine learning-rate decay)."""

    epochs: int = 40
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False


def default_train_config(dataset: str) -> TrainConfig:
    """Training recipe per dataset: enough to fit the training set (the regime unlearning is
    studied in) at a cost that suits the data size."""
    if dataset == "digits":
        return TrainConfig(epochs=40, lr=0.05, batch_size=64)
    if dataset == "mnist1d":
        # The 40-512-512-10 MLP: 100 % train, ~71 % test accuracy in ~2 s on one CPU thread.
        return TrainConfig(epochs=20, lr=0.2, batch_size=128)
    if dataset in ("mnist", "fashionmnist"):
        return TrainConfig(epochs=15, lr=0.05, batch_size=128)
    # 32x32 colour images with ResNet-18: the usual crop+flip augmentation.
    return TrainConfig(epochs=60, lr=0.1, batch_size=256, augment=True)


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator).tolist()
    dy = torch.randint(0, 9, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def train_classifier(model: nn.Module, images: ImageSet, idx: Tensor, config: TrainConfig, *,
                     seed: int = 0, device: torch.device | str = "cpu",
                     desc: str | None = None, progress: bool = True) -> nn.Module:
    """Train ``model`` with cross-entropy on the rows ``idx`` of ``images`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(idx) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    bar = tqdm(total=steps, desc=desc or "train", disable=not progress, leave=False, unit="step")
    for _ in range(config.epochs):
        perm = idx[torch.randperm(len(idx), generator=g)]
        for chunk in perm.split(config.batch_size):
            x, y = images.batch(chunk, device)
            if config.augment:
                x = augment_batch(x.cpu(), g).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model


def default_cache_dir() -> Path:
    """``$MASKED_OPTIM_CACHE``, else ``$XDG_CACHE_HOME/masked_optim``, else ``~/.cache/masked_optim``."""
    if os.environ.get("MASKED_OPTIM_CACHE"):
        return Path(os.environ["MASKED_OPTIM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "masked_optim"


class ModelCache:
    """Model weights on disk, keyed by a hash of the configuration that produced them.

    ``root=None`` uses :func:`default_cache_dir`; ``enabled=False`` makes every lookup miss and
    every save a no-op.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, enabled: bool = True) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.enabled = enabled

    @staticmethod
    def key(config: dict[str, Any]) -> str:
        """Stable hash of a JSON-serialisable configuration."""
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def path(self, config: dict[str, Any]) -> Path:
        """Where the weights of ``config`` are (or would be) stored."""
        return self.root / f"{config.get('kind', 'model')}-{self.key(config)}.pt"

    def load_into(self, model: nn.Module, config: dict[str, Any]) -> bool:
        """Load cached weights into ``model``; ``False`` on a miss (or an unreadable file)."""
        path = self.path(config)
        if not (self.enabled and path.is_file()):
            return False
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("config") != config:  # a hash collision or a hand-edited file
                return False
            model.load_state_dict(blob["state_dict"])
        except (OSError, RuntimeError, KeyError, AttributeError, EOFError):
            return False
        return True

    def save(self, model: nn.Module, config: dict[str, Any]) -> Path | None:
        """Store the weights of ``model``; atomic, so a killed run never leaves half a file."""
        if not self.enabled:
            return None
        path = self.path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"config": config, "state_dict": state}, tmp)
        os.replace(tmp, path)
        return path


def reference_model(kind: str, split: UnlearningSplit, arch: str, *, norm: str = "batch",
                    config: TrainConfig, seed: int, cache: ModelCache,
                    device: torch.device | str = "cpu",
                    progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The ``"original"`` model (trained on forget + retain) or the ``"retrain"`` model (retain
    only, the gold standard), from the cache when possible.

    Returns the model (on ``device``, eval mode) and a record with the cache key, whether it came
    from the cache and the training time.
    """
    if kind not in ("original", "retrain"):
        raise ValueError(f"kind must be 'original' or 'retrain', not {kind!r}")
    data = split.data
    cfg = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "dataset": data.name,
        # The original model sees the whole training set, so it is shared by every forget spec.
        "data": data.fingerprint() if kind == "original" else split.fingerprint(),
        "arch": arch,
        "norm": norm if arch == "resnet18" else None,
        "train": asdict(config),
        "seed": seed,
    }
    torch.manual_seed(seed)
    # The MLP's widths follow the dataset (in the key through "dataset"); a cached file of other
    # widths fails load_state_dict and is retrained.
    hidden = default_hidden(data.name) if arch == "mlp" else None
    model = build_model(arch, data.input_shape, data.num_classes, norm, hidden=hidden)
    start = time.perf_counter()
    cached = cache.load_into(model, cfg)
    if not cached:
        idx = torch.arange(len(data.train)) if kind == "original" else split.retain_idx
        train_classifier(model, data.train, idx, config, seed=seed, device=device,
                         desc=f"train {kind} (seed {seed})", progress=progress)
        cache.save(model, cfg)
    model.to(device).eval()
    return model, {"key": cache.key(cfg), "cached": cached, "seconds": time.perf_counter() - start}
