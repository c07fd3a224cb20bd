"""Masked unlearning with mixed precision: ``torch.autocast`` + ``GradScaler``.

A small MLP is trained on Gaussian blobs (no download), then made to forget one class with the
caller's NegGrad+ objective (retain loss − forget loss) computed under autocast and masked by
``ProbablyAlignedSGD``.  How the pieces fit:

* the caller's forward/backward runs under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA);
  the parameters stay float32, so ``p.grad`` is float32;
* ``scaler.scale(loss).backward()`` scales ``p.grad``; ``scaler.step(opt, forget=..., retain=...)``
  unscales ``p.grad`` in place, skips the whole ``opt.step`` when a gradient is inf/NaN, and
  otherwise forwards the keyword arguments to ``opt.step``;
* the per-sample statistics are computed inside ``opt.step``, *outside* the autocast region, from
  the parameters in float32; they never see the scale (``GradScaler`` only touches ``p.grad``);
* ``GradScaler.step`` refuses closures and needs at least one ``p.grad`` (it raises
  "No inf checks were recorded" otherwise): with the default statistics direction (no backward)
  call ``opt.step(forget=..., retain=...)`` directly — there is nothing to scale.

Run ``python examples/amp_unlearning.py --help``; the defaults take a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import ProbablyAlignedSGD


def make_blobs(n_per_class: int, n_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian blobs: a toy problem a small MLP learns perfectly."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="forget and retain samples per step")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--no-scaler", action="store_true", help="plain backward, no GradScaler")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    # bfloat16 needs no loss scaling; float16 (CUDA) does. GradScaler works with both.
    amp_dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    x, y = make_blobs(args.n_per_class, args.classes, args.dim, args.seed)
    x, y = x.to(dev), y.to(dev)
    model = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.classes))
    model = model.to(dev)

    # 1. the "original" model, trained on everything (plain float32)
    pre = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.pretrain_steps):
        pre.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()

    forget_idx = (y == 0).nonzero().squeeze(1)  # forget class 0
    retain_idx = (y != 0).nonzero().squeeze(1)
    xf, yf, xr, yr = x[forget_idx], y[forget_idx], x[retain_idx], y[retain_idx]
    before = {"forget_acc": accuracy(model, xf, yf), "retain_acc": accuracy(model, xr, yr),
              "forget_loss": F.cross_entropy(model(xf), yf).item()}

    # 2. masked unlearning: autocast for the caller's objective, float32 statistics inside step()
    opt = ProbablyAlignedSGD(model.parameters(), lr=args.lr, momentum=0.9, model=model,
                             confidence=args.confidence)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**12, enabled=not args.no_scaler)
    g = torch.Generator().manual_seed(args.seed + 1)
    kept = []
    for step in range(args.steps):
        fi = torch.randint(0, len(yf), (min(args.batch, len(yf)),), generator=g).to(dev)
        ri = torch.randint(0, len(yr), (min(args.batch, len(yr)),), generator=g).to(dev)
        fb, rb = (xf[fi], yf[fi]), (xr[ri], yr[ri])
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype):
            loss = F.cross_entropy(model(rb[0]), rb[1]) - F.cross_entropy(model(fb[0]), fb[1])
        scaler.scale(loss).backward()
        # unscale p.grad, skip on inf/NaN, else opt.step(forget=fb, retain=rb) — outside autocast
        scaler.step(opt, forget=fb, retain=rb)
        scaler.update()
        d = opt.diagnostics
        if d is not None:
            kept.append(d.kept_fraction)
            if not args.quiet:
                print(f"step {step:3d}: kept {d.kept_fraction:6.1%}  forget loss {d.forget_loss:7.3f}  "
                      f"retain loss {d.retain_loss:6.3f}  scale {scaler.get_scale():g}")

    after = {"forget_acc": accuracy(model, xf, yf), "retain_acc": accuracy(model, xr, yr),
             "forget_loss": F.cross_entropy(model(xf), yf).item()}
    result = {f"{k}_before": v for k, v in before.items()}
    result.update({f"{k}_after": v for k, v in after.items()})
    result["mean_kept_fraction"] = sum(kept) / len(kept) if kept else float("nan")
    result["steps_taken"] = float(len(kept))
    if not args.quiet:
        print(f"forget acc {before['forget_acc']:.1%} -> {after['forget_acc']:.1%}, "
              f"retain acc {before['retain_acc']:.1%} -> {after['retain_acc']:.1%}, "
              f"mean kept fraction {result['mean_kept_fraction']:.1%}")
    return result


if __name__ == "__main__":
    main()
