"""Mask + update kernel: the elementwise part of a masked step, alone, over P parameters.

Given the statistics (forget and retain mean and M2, as a statistics engine returns them), time
side by side (interleaved repeats, after warm-up, medians), on P parameters split into 16 tensors:

  copy         torch._foreach_copy_ of P floats: the memory-bandwidth yardstick of this device
  mask         masked_optim.feasibility_masks alone (hard mask, both constraints)
  sgd_masked   masked_optim.optim.sgd.sgd_updates (momentum 0.9, weight decay, foreach), then the mask and update
  sgd_torch    torch.optim.SGD(momentum=0.9, weight_decay, foreach=True).step() on the same tensors
  adam_masked  masked_optim.optim.adam.adam_updates (foreach), then the mask and update
  adam_torch   torch.optim.Adam(foreach=True).step() on the same tensors

Achieved bandwidth = the bytes the operation must move at least (each input read once, each output
written once, float32) / time. "min bytes" per parameter: copy 8, mask 24 (u, 4 statistics in;
mask out), sgd_masked 36 (θ, g, buf, 4 statistics in; θ, buf out), sgd_torch 20, adam_masked 44
(θ, g, m, v, 4 statistics in; θ, m, v out), adam_torch 28. On CPU the reference is
torch.optim.Adam(foreach=True) and the copy; on CUDA also the card's nominal peak bandwidth.

    python benchmarks/bench_kernel.py [--quick] [--device cpu|cuda] [--sizes 1e6,1e7,5e7]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from masked_optim import Constraint, feasibility_masks, normal_quantile  # noqa: E402

N_TENSORS = 16
N_STATS = 128  # samples behind the statistics (enters only through the threshold)
MIN_BYTES_PER_PARAM = {"copy": 8, "mask": 24, "sgd_masked": 36, "sgd_torch": 20, "adam_masked": 44,
                       "adam_torch": 28}
# rough bytes held per parameter while every variant's tensors and temporaries are alive
HELD_BYTES_PER_PARAM = 4 * 24
# nominal peak memory bandwidth (GB/s) of common cards, matched on the device name
NOMINAL_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
                "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100": 1935,
                "L40S": 864, "L4": 300, "A10G": 600, "T4": 320, "V100": 900, "RTX 4090": 1008}
DEFAULT_SIZES_CPU = (1e6, 1e7, 5e7)
DEFAULT_SIZES_CUDA = (1e6, 1e7, 1e8)


def nominal_bandwidth(name: str) -> float | None:
    for key, gbps in NOMINAL_GBPS.items():
        if key.lower() in name.lower():
            return gbps
    return None


def _split(total: int) -> list[int]:
    base = total // N_TENSORS
    sizes = [base] * N_TENSORS
    sizes[-1] += total - base * N_TENSORS
    return sizes


def build(total: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = _split(total)

    def randn(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g, device=device)

    params = [torch.nn.Parameter(randn(n) * 0.1) for n in sizes]
    grads = [randn(n) for n in sizes]
    for p, gr in zip(params, grads):
        p.grad = gr
    q = normal_quantile(0.95)
    # statistics in a regime where the mask keeps a fraction of the coordinates: means of either
    # sign, M2 of the order of n·mean²
    forget = [Constraint(randn(n), randn(n).square_().mul_(N_STATS), N_STATS, q, -1) for n in sizes]
    retain = [Constraint(randn(n), randn(n).square_().mul_(N_STATS), N_STATS, q, +1) for n in sizes]
    return {
        "sizes": sizes, "params": params, "grads": grads, "forget": forget, "retain": retain,
        "bufs": [randn(n) for n in sizes],
        "exp_avgs": [torch.zeros(n, device=device) for n in sizes],
        "exp_avg_sqs": [torch.zeros(n, device=device) for n in sizes],
        "steps": [torch.tensor(0.0) if device.type == "cpu" else torch.tensor(0.0, device=device) for _ in sizes],
        "copy_dst": [torch.empty(n, device=device) for n in sizes],
    }


def variants(t: dict[str, Any]) -> dict[str, Any]:
    from masked_optim.optim.adam import adam_updates
    from masked_optim.optim.masking import GroupTests, Side, Update, apply_updates, masks_of
    from masked_optim.optim.sgd import sgd_updates

    params, grads = t["params"], t["grads"]
    sides = [Side([c.mean for c in cons], [c.m2 for c in cons], cons[0].n, cons[0].q, cons[0].sign)
             for cons in (t["forget"], t["retain"])]
    tests = GroupTests(*sides, False, foreach=True)
    sgd = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=5e-4, foreach=True)
    adam = torch.optim.Adam(params, lr=1e-6, foreach=True)

    def masked_apply(us: list[torch.Tensor], lr: float) -> None:
        updates = [Update(tests, i, p, u, lr) for i, (p, u) in enumerate(zip(params, us))]
        ms = masks_of(updates, last=False, foreach=True)
        apply_updates(updates, ms, [None] * len(ms))

    @torch.no_grad()
    def copy() -> None:
        torch._foreach_copy_(t["copy_dst"], grads)

    @torch.no_grad()
    def mask_only() -> None:
        feasibility_masks(grads, t["forget"], t["retain"])

    @torch.no_grad()
    def sgd_masked() -> None:
        us = sgd_updates(params, grads, t["bufs"], lr=1e-6, weight_decay=5e-4, momentum=0.9, dampening=0.0,
                         nesterov=False, maximize=False, foreach=True, apply=False)
        masked_apply(us, 1e-6)

    @torch.no_grad()
    def adam_masked() -> None:
        us = adam_updates(params, grads, t["exp_avgs"], t["exp_avg_sqs"], [], t["steps"], amsgrad=False,
                          beta1=0.9, beta2=0.999, lr=1e-6, weight_decay=0.0, eps=1e-8, maximize=False,
                          decoupled_weight_decay=False, foreach=True, apply=False)
        masked_apply(us, 1e-6)

    return {"copy": copy, "mask": mask_only, "sgd_masked": sgd_masked, "sgd_torch": sgd.step,
            "adam_masked": adam_masked, "adam_torch": adam.step}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    machine = C.machine_info(device)
    log = C.log_to_stderr if args.verbose else None
    if args.sizes:
        sizes = [int(float(s)) for s in C.parse_list(args.sizes, [])]
    elif args.quick:
        sizes = [100_000]
    else:
        sizes = [int(s) for s in (DEFAULT_SIZES_CUDA if device.type == "cuda" else DEFAULT_SIZES_CPU)]
    repeats = args.repeats or (2 if args.quick else 5)
    target = 0.0 if args.quick else 0.3
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for total in sizes:
        need = total * HELD_BYTES_PER_PARAM
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            avail = free
        else:
            avail = C.meminfo().get("MemAvailable", need * 2)
        if need > 0.5 * avail:
            skipped[str(total)] = (f"needs about {need / 2**30:.1f} GiB, more than half of the "
                                   f"{avail / 2**30:.1f} GiB available")
            C.log_to_stderr(f"[kernel] skipping P={total:.0e}: {skipped[str(total)]}")
            continue
        t = build(total, device)
        fns = variants(t)
        errors = {}
        for name in list(fns):
            try:
                fns[name]()
            except Exception as err:  # noqa: BLE001 - an API change in the core is reported, not fatal
                errors[name] = f"{type(err).__name__}: {err}"
                del fns[name]
                C.log_to_stderr(f"[kernel] P={total:.0e}: {name} failed: {errors[name]}")
        C.log_to_stderr(f"[kernel] P={total:.0e}: timing {', '.join(fns)} x {repeats} repeats")
        timing = C.interleaved_timing(fns, device=device, repeats=repeats, target_s=target, log=log,
                                      warmup=1)
        entry: dict[str, Any] = {"timing": timing, "errors": errors, "gbps": {}}
        for name, res in timing.items():
            entry["gbps"][name] = MIN_BYTES_PER_PARAM[name] * total / res["median_s"] / 1e9
        ratios = {}
        for a, b in (("sgd_masked", "sgd_torch"), ("adam_masked", "adam_torch"), ("mask", "adam_torch")):
            if a in timing and b in timing:
                ratios[f"{a}/{b}"] = C.ratio_stats(timing, a, b)
        entry["ratios"] = ratios
        if "copy" in entry["gbps"]:
            entry["fraction_of_copy_bandwidth"] = {k: v / entry["gbps"]["copy"] for k, v in entry["gbps"].items()}
        with torch.no_grad():
            kept = sum(float(m.sum()) for m in feasibility_masks(t["grads"], t["forget"], t["retain"]))
        entry["kept_fraction"] = kept / total
        results[str(total)] = entry
        del t, fns
    machine["loadavg_end"] = C.loadavg()
    nominal = nominal_bandwidth(machine.get("gpu_name", "")) if device.type == "cuda" else None
    if nominal:
        for entry in results.values():
            entry["fraction_of_nominal_bandwidth"] = {k: v / nominal for k, v in entry["gbps"].items()}
    return {
        "benchmark": "kernel",
        "machine": machine,
        "config": {"quick": args.quick, "repeats": repeats, "target_seconds_per_measurement": target,
                   "n_tensors": N_TENSORS, "dtype": "float32", "min_bytes_per_param": MIN_BYTES_PER_PARAM,
                   "nominal_bandwidth_gbps": nominal,
                   "note": "GB/s = minimal bytes moved / median time (1 GB = 1e9 bytes)"},
        "sizes": results,
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
    }


def table(payload: dict[str, Any]) -> str:
    names = ["copy", "mask", "sgd_masked", "sgd_torch", "adam_masked", "adam_torch"]
    rows = ["| P | " + " | ".join(names) + " | masked/torch SGD | masked/torch Adam |",
            "|---|" + "---|" * (len(names) + 2)]
    for total, e in payload["sizes"].items():
        cells = []
        for n in names:
            if n in e["timing"]:
                cells.append(f"{e['timing'][n]['median_s'] * 1e3:.2f} ms, {e['gbps'][n]:.1f} GB/s")
            else:
                cells.append("fails")
        r = e["ratios"]
        rs = [f"{r[k]['median']:.2f}×" if k in r else "–" for k in ("sgd_masked/sgd_torch", "adam_masked/adam_torch")]
        rows.append(f"| {float(total):.0e} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
    notes = [f"- P={k}: skipped, {v}" for k, v in payload["skipped"].items()]
    notes += [f"- P={k}: {n} failed: {why}" for k, e in payload["sizes"].items() for n, why in e["errors"].items()]
    if payload["config"].get("nominal_bandwidth_gbps"):
        notes.append(f"- nominal device bandwidth: {payload['config']['nominal_bandwidth_gbps']} GB/s")
    return "\n".join(rows + ([""] + notes if notes else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--sizes", default=None, help="comma-separated parameter counts, e.g. 1e6,1e7,1e8")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with C.torch_threads(args.threads if args.threads else (1 if args.quick else None)):
        payload = run(args)
    if args.out is not None:
        C.write_json(args.out / "kernel.json", payload)
    print(table(payload))
    return payload


if __name__ == "__main__":
    main()
