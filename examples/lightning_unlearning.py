"""Masked unlearning inside a Lightning ``Trainer``: NegGrad+ with ``ProbablyAlignedSGD``.

A small MLP is trained on Gaussian blobs (no download), then made to forget one class. The
``LightningModule``'s ``training_step`` returns the NegGrad+ loss (retain loss − forget loss) of a
batch ``{"forget": (x, y), "retain": (x, y)}`` from a ``CombinedLoader``; Lightning's automatic
optimisation runs its backward inside ``optimizer.step(closure)``, and
:class:`~masked_optim.integrations.lightning.MaskedStepCallback` stages the batch's two parts on
the optimizer first, so each step is masked to the coordinates probably aligned with both
gradients. The forget batch carries its true labels: its loss is the one that must rise.

Run ``python examples/lightning_unlearning.py --help``; the defaults take a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader

from masked_optim import ProbablyAlignedSGD
from masked_optim.integrations.lightning import MaskedStepCallback


def make_blobs(n_per_class: int, n_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian blobs: a toy problem a small MLP learns perfectly."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


class NegGradPlus(pl.LightningModule):
    """NegGrad+ unlearning of ``net``: descend on the retain batch, ascend on the forget batch."""

    def __init__(self, net: nn.Module, lr: float, forget_weight: float = 1.0) -> None:
        super().__init__()
        self.net, self.lr, self.forget_weight = net, lr, forget_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        (xf, yf), (xr, yr) = batch["forget"], batch["retain"]
        return F.cross_entropy(self(xr), yr) - self.forget_weight * F.cross_entropy(self(xf), yf)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # model=self: the statistics call the module on each part's inputs, as training_step does
        return ProbablyAlignedSGD(self.parameters(), lr=self.lr, momentum=0.9, model=self)


class PrintDiagnostics(pl.Callback):
    """Prints what each masked step did and keeps the kept fractions."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.kept, self.directions = quiet, [], []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        d = trainer.optimizers[0].diagnostics
        self.kept.append(d.kept_fraction)
        self.directions.append(d.direction)
        if not self.quiet:
            print(f"step {trainer.global_step}: kept {d.kept_fraction:.1%} of coordinates, n_forget {d.n_forget}, "
                  f"n_retain {d.n_retain}, forget loss {d.forget_loss:.3f}, retain loss {d.retain_loss:.3f}")


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="forget samples per step (twice as many retain)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--forget-class", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quiet:  # Lightning's start-up notes (accelerators, tips)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    pl.seed_everything(args.seed, verbose=False)
    x, y = make_blobs(args.n_per_class, args.classes, args.dim, args.seed)
    net = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(args.pretrain_steps):  # the "original" model, trained on everything
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    is_f = y == args.forget_class
    forget, retain = TensorDataset(x[is_f], y[is_f]), TensorDataset(x[~is_f], y[~is_f])
    loaders = CombinedLoader(
        {"forget": DataLoader(forget, batch_size=args.batch, shuffle=True, drop_last=True),
         "retain": DataLoader(retain, batch_size=2 * args.batch, shuffle=True, drop_last=True)},
        mode="max_size_cycle",
    )
    before = {"forget_acc_before": accuracy(net, x[is_f], y[is_f]),
              "retain_acc_before": accuracy(net, x[~is_f], y[~is_f])}

    printer = PrintDiagnostics(args.quiet)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[MaskedStepCallback(), printer],  # stages batch["forget"], batch["retain"] before each step
    )
    with warnings.catch_warnings():  # Lightning's advice on DataLoader workers: not the point here
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(NegGradPlus(net, args.lr), train_dataloaders=loaders)

    res = {
        **before,
        "forget_acc_after": accuracy(net, x[is_f], y[is_f]),
        "retain_acc_after": accuracy(net, x[~is_f], y[~is_f]),
        "steps_taken": trainer.global_step,
        "mean_kept_fraction": sum(printer.kept) / max(len(printer.kept), 1),
        "directions": sorted(set(printer.directions)),
    }
    if not args.quiet:
        print(f"forget accuracy {res['forget_acc_before']:.1%} -> {res['forget_acc_after']:.1%}, "
              f"retain accuracy {res['retain_acc_before']:.1%} -> {res['retain_acc_after']:.1%}, "
              f"mean kept fraction {res['mean_kept_fraction']:.1%}")
    return res


if __name__ == "__main__":
    main()
