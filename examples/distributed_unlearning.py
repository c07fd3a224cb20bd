"""Masked unlearning with data parallelism: DDP + ``DistributedEngine``.

Every rank holds the same model (DDP broadcasts rank 0's weights), takes its shard of each global
forget/retain batch, and computes per-sample statistics on that shard; ``DistributedEngine`` merges
``(n, mean, M2)`` across the ranks, so every rank builds the mask of the *global* batch and the
parameters stay identical — as if one process had seen the whole batch.

Launch with torchrun (any backend; NCCL when the ranks have GPUs)::

    torchrun --nproc-per-node 2 examples/distributed_unlearning.py

or let the script start its own CPU ranks (gloo, no network: a file store in a temp folder)::

    python examples/distributed_unlearning.py --nproc 2

Rank 0 prints the diagnostics and, last, one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from masked_optim import ProbablyAlignedSGD
from masked_optim.distributed import DistributedEngine, parameters_in_sync, shard_batch


def make_blobs(n_per_class: int, n_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def unlearn(args: argparse.Namespace) -> dict[str, float]:
    """The per-rank program; the process group is already initialised."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if nccl else torch.device("cpu")
    torch.manual_seed(args.seed)
    x, y = make_blobs(args.n_per_class, args.classes, args.dim, args.seed)  # the same data on every rank
    x, y = x.to(dev), y.to(dev)
    model = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.classes))
    model = model.to(dev)
    pre = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.pretrain_steps):  # the "original" model (identical on every rank)
        pre.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()

    ddp = DDP(model)  # broadcasts rank 0's parameters and buffers
    opt = ProbablyAlignedSGD(ddp.parameters(), lr=args.lr, momentum=0.9, model=ddp,
                             confidence=args.confidence, engine=DistributedEngine())
    f_mask = y == 0
    xf, yf, xr, yr = x[f_mask], y[f_mask], x[~f_mask], y[~f_mask]
    with torch.no_grad():
        forget_before = F.cross_entropy(model(xf), yf).item()
    g = torch.Generator().manual_seed(args.seed + 1)  # the same global batches on every rank
    for step in range(args.steps):
        fi = torch.randint(0, len(yf), (args.batch,), generator=g).to(dev)
        ri = torch.randint(0, len(yr), (args.batch,), generator=g).to(dev)
        fb, rb = shard_batch((xf[fi], yf[fi])), shard_batch((xr[ri], yr[ri]))  # this rank's part
        opt.zero_grad(set_to_none=True)
        # NegGrad+ on the global batch. DDP *averages* the ranks' gradients, so each rank sums its
        # samples over the global count and multiplies by the world size: exact for unequal shards.
        out = ddp(torch.cat([fb[0], rb[0]]))
        k = len(fb[1])
        loss = (F.cross_entropy(out[k:], rb[1], reduction="sum") / args.batch
                - F.cross_entropy(out[:k], fb[1], reduction="sum") / args.batch) * world
        loss.backward()
        opt.step(forget=fb, retain=rb)  # statistics merged across ranks: the global mask
        d = opt.diagnostics
        if rank == 0 and not args.quiet:
            print(f"step {step:3d}: kept {d.kept_fraction:6.1%}  forget loss {d.forget_loss:7.3f}  "
                  f"retain loss {d.retain_loss:6.3f}  (global means; local shard {d.n_forget}+{d.n_retain})",
                  flush=True)

    in_sync = parameters_in_sync(model)
    with torch.no_grad():
        res = {
            "world_size": float(world),
            "forget_loss_before": forget_before,
            "forget_loss_after": F.cross_entropy(model(xf), yf).item(),
            "forget_acc_after": (model(xf).argmax(1) == yf).float().mean().item(),
            "retain_acc_after": (model(xr).argmax(1) == yr).float().mean().item(),
            "kept_fraction_last": opt.diagnostics.kept_fraction,
            "in_sync": float(in_sync),
        }
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    if not in_sync:
        raise RuntimeError("ranks ended with different parameters")
    return res


def _spawned(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        unlearn(args)
    finally:
        dist.destroy_process_group()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=0,
                    help="start this many CPU ranks here (gloo); 0: launched by torchrun")
    ap.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a stuck collective fails")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=63, help="global forget and retain batch size")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.nproc > 0:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_spawned, args=(args.nproc, os.path.join(tmp, "store"), args),
                               nprocs=args.nproc, start_method=args.start_method)
        return
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, or pass --nproc N to start N local CPU ranks")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        unlearn(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
