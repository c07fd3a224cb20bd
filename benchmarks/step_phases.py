"""Where a masked step's time goes, phase by phase (issue 15, item 3: what remains after the fused tail).

Times ``ProbablyAlignedSGD.step(forget=, retain=)`` with the defaults (default direction, retain guard,
``fused=None``) on one model and reports each phase's median share of the whole step: the statistics
(forward, δ backward and layer rules), the direction, the fused pass, the eager updates and masks of the
small tensors, and the retain guard.

    python benchmarks/step_phases.py [--models resnet18,mlp,wide] [--repeats 7] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from masked_optim import ProbablyAlignedSGD  # noqa: E402
from masked_optim.optim import base as B  # noqa: E402

PHASES = {  # (object, attribute): phase
    (B.ProbablyAlignedOptimizer, "_statistics"): "statistics (forward, δ backward, layer rules)",
    (B.ProbablyAlignedOptimizer, "_stats_direction"): "direction (μ_r − μ_f)",
    (B, "fused_step"): "fused pass (base update, mask, length)",
    (ProbablyAlignedSGD, "_update_group"): "eager base update (tensors below the compile threshold)",
    (B, "masks_of"): "eager masks",
    (B, "guarded_apply"): "retain guard (apply, retain forward, back-off)",
}


def measure(model_name: str, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {}
    originals = {}
    for (obj, name), phase in PHASES.items():
        orig = originals[(obj, name)] = getattr(obj, name)

        def timed(*a: Any, _orig: Any = orig, _phase: str = phase, **k: Any) -> Any:
            t = time.perf_counter()
            out = _orig(*a, **k)
            times.setdefault(_phase, []).append(time.perf_counter() - t)
            return out
        setattr(obj, name, functools.wraps(orig)(timed))
    try:
        model = C.build_model(model_name)
        batch = C.default_batch(model_name, torch.device("cpu"))
        forget = C.make_batch(model_name, batch, torch.device("cpu"), 1)
        retain = C.make_batch(model_name, batch, torch.device("cpu"), 2)
        opt = ProbablyAlignedSGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4, model=model)
        for _ in range(3):  # warm-up: the plan's self-check, compilation
            opt.step(forget=forget, retain=retain)
        times.clear()
        whole = []
        for _ in range(repeats):
            t = time.perf_counter()
            opt.step(forget=forget, retain=retain)
            whole.append(time.perf_counter() - t)
    finally:
        for (obj, name), orig in originals.items():
            setattr(obj, name, orig)
    w = statistics.median(whole)
    return {"batch": batch, "params": C.count_params(model),
            "share_of_step": {k: statistics.median(v) * len(v) / repeats / w for k, v in times.items()},
            "kept_fraction": opt.diagnostics.kept_fraction, "step_fraction": opt.diagnostics.step_fraction}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,mlp,wide")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = {m: measure(m, args.repeats) for m in args.models.split(",")}
    payload = {"benchmark": "step_phases", "machine": {**C.machine_info("cpu"), "loadavg_end": C.loadavg()},
               "config": {"repeats": args.repeats, "optimizer": "ProbablyAlignedSGD defaults, momentum 0.9"},
               "models": results, "seconds": time.perf_counter() - t0}
    if args.out is not None:
        C.write_json(args.out / "step_phases.json", payload)
    for m, r in results.items():
        print(f"{m} (B={r['batch']}): " + "; ".join(f"{k} {v:.0%}" for k, v in r["share_of_step"].items()))
    return payload


if __name__ == "__main__":
    main()
