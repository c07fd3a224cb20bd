"""Models of the workbench: an MLP and a small CNN for small images, a 1-D CNN for signals
(MNIST-1D), ResNet-18 for 32x32 images."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ARCHS", "MLP", "Conv1dNet", "SmallCNN", "build_model", "count_parameters", "default_arch",
           "default_hidden", "resnet18_32"]

ARCHS = ("mlp", "cnn", "cnn1d", "resnet18")

# Hidden widths of the MLP per dataset; MNIST-1D's is the 40-512-512-10 network of its paper.
_MLP_HIDDEN = {"mnist1d": (512, 512)}
_MLP_DEFAULT_HIDDEN = (256, 256)


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs (ReLU hidden layers)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers.

    The adaptive pooling to 4x4 lets the same network take 8x8 digits and 28x28 or 32x32 images.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class Conv1dNet(nn.Module):
    """A small 1-D CNN for signals: two width-5 convolutions, a max-pool by 2, two linear layers.

    Inputs ``(N, C, H, W)`` are read as ``C*H`` channels of length ``W`` (MNIST-1D: ``(N, 1, 1,
    40)`` becomes ``(N, 1, 40)``). Only Conv1d, Linear, ReLU, pooling and Flatten: layers whose
    per-sample gradient statistics :class:`masked_optim.HookEngine` computes in closed form.
    """

    def __init__(self, in_channels: int, length: int, num_classes: int, width: int = 32,
                 hidden: int = 128) -> None:
        super().__init__()
        if length < 2:
            raise ValueError(f"Conv1dNet needs signals of length >= 2, not {length}")
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2), nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(width * (length // 2), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
        return self.classifier(self.features(x))


def resnet18_32(num_classes: int, in_channels: int = 3, norm: str = "batch") -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem and no max-pool.

    ``norm="group"`` replaces every BatchNorm by GroupNorm (32 groups), whose per-sample
    gradients are well defined in training mode. Weights are initialised randomly, never
    downloaded.
    """
    from torchvision.models import resnet18

    if norm == "batch":
        norm_layer = nn.BatchNorm2d
    elif norm == "group":
        def norm_layer(channels: int) -> nn.Module:
            return nn.GroupNorm(min(32, channels), channels)
    else:
        raise ValueError(f"norm must be 'batch' or 'group', not {norm!r}")
    model = resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def default_arch(dataset: str) -> str:
    """The architecture a study uses when none is named: small nets for small grey images and
    the MLP for MNIST-1D."""
    return {"digits": "mlp", "mnist1d": "mlp", "mnist": "cnn", "fashionmnist": "cnn"}.get(dataset, "resnet18")


def default_hidden(dataset: str | None) -> tuple[int, ...]:
    """Hidden widths of the ``"mlp"`` for ``dataset``: ``(512, 512)`` for MNIST-1D (the paper's
    40-512-512-10 network), ``(256, 256)`` otherwise."""
    return _MLP_HIDDEN.get(dataset or "", _MLP_DEFAULT_HIDDEN)


def build_model(arch: str, input_shape: tuple[int, int, int], num_classes: int,
                norm: str = "batch", *, hidden: Sequence[int] | None = None) -> nn.Module:
    """Build ``arch`` (one of :data:`ARCHS`) for inputs of shape ``(C, H, W)``.

    ``hidden`` sets the hidden widths of the ``"mlp"`` (default ``(256, 256)``; see
    :func:`default_hidden` for the per-dataset choice); other architectures refuse it.
    """
    c, h, w = input_shape
    if hidden is not None and arch != "mlp":
        raise ValueError(f"hidden widths apply to the 'mlp' only, not to {arch!r}")
    if arch == "mlp":
        return MLP(c * h * w, num_classes, _MLP_DEFAULT_HIDDEN if hidden is None else tuple(hidden))
    if arch == "cnn":
        return SmallCNN(c, num_classes)
    if arch == "cnn1d":
        return Conv1dNet(c * h, w, num_classes)
    if arch == "resnet18":
        return resnet18_32(num_classes, in_channels=c, norm=norm)
    raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

