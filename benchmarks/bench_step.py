"""Step microbenchmark: what a masked step costs next to the plain NegGrad+ step.

Variants, timed side by side in one process (interleaved repeats, after warm-up, medians):

  a          plain NegGrad+: forward+backward on a forget and a retain batch
             (loss = CE(retain) - CE(forget)) and a torch.optim.SGD step;
  b[engine]  ProbablyAlignedSGD.step(forget=..., retain=...) with the default direction
             (mean retain gradient - mean forget gradient), no backward by the caller;
  c[engine]  the caller's NegGrad+ backward first, then the same masked step.

Models: ``--models`` from the MLP, the small CNN, ResNet-18, the HF models and ``wide`` (an MLP
2048-4096-2048, 16.8 M parameters, B=4: so few samples for so many parameters that the elementwise
mask + update dominates the step; the case the fused kernels of ``masked_optim.fused`` are for, timed
here as the optimizers step today).

All use lr=1e-4, momentum 0.9, weight decay 5e-4 and the mask of ``--mask``: ``defaults`` (the
optimizer constructed with no mask option: forget test 0.95, retain test 0.05, rescale="norm") or
``strict`` (both tests at 0.95, no rescale: the default before the defaults study). Reported: the ratios b/a and
c/a per statistics engine (``--engine vmap,hooks``; engines that do not exist are reported as
unavailable) and the peak memory of each variant: on CUDA ``max_memory_allocated`` above the
steady state, on CPU the peak RSS above the steady state, each variant in a fresh subprocess.

    python benchmarks/bench_step.py [--quick] [--device cpu|cuda] [--engine vmap,hooks] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from masked_optim import ProbablyAlignedSGD  # noqa: E402

LR, MOMENTUM, WD = 1e-4, 0.9, 5e-4
DEFAULT_ENGINES = ("vmap", "hooks")
MASKS: dict[str, dict[str, Any]] = {"defaults": {}, "strict": {"confidence": 0.95, "rescale": None}}
QUICK_BATCH = {"mlp": 16, "cnn": 8, "resnet18": 4, "wide": 4, "gpt2": 4, "bert": 4}


def make_variant(kind: str, engine: Any, model: torch.nn.Module, forget, retain, mask: str = "defaults"):
    """A zero-argument function doing one step of variant ``kind`` ('a', 'b' or 'c')."""
    if kind in ("a", "af"):  # af: torch's fused SGD (one kernel for the whole update)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, fused=kind == "af")

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            C.loss_neggrad_plus(model, forget, retain).backward()
            opt.step()
        step.opt = opt  # type: ignore[attr-defined]
        return step
    opt = ProbablyAlignedSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, model=model,
                             engine=engine, **MASKS[mask])
    if kind == "b":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            opt.step(forget=forget, retain=retain)
    elif kind == "c":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            C.loss_neggrad_plus(model, forget, retain).backward()
            opt.step(forget=forget, retain=retain)
    else:
        raise ValueError(kind)
    step.opt = opt  # type: ignore[attr-defined]
    return step


def _setup(model_name: str, batch: int, device: torch.device):
    model = C.build_model(model_name).to(device)
    forget = C.make_batch(model_name, batch, device, seed=1)
    retain = C.make_batch(model_name, batch, device, seed=2)
    return model, forget, retain


def _routes(opt: Any) -> dict[str, float] | None:
    """Share of parameter elements on each route of a hook engine's plan after its steps (rules,
    per-layer fallback, whole-model fallback); ``None`` for other engines."""
    engine = opt.engine
    if not hasattr(engine, "routes"):
        return None
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    total = sum(p.numel() for p in params)
    r = engine.routes(opt.model, params)
    return {k: sum(params[i].numel() for i in v) / total for k, v in r.items()}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh-process peak memory of one variant (CPU)."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, forget, retain = _setup(spec["model"], spec["batch"], device)
    engine = None
    if spec["kind"] not in ("a", "af"):
        engine, _ = C.resolve_engine(spec["engine"])
    step = make_variant(spec["kind"], engine, model, forget, retain, spec.get("mask", "defaults"))
    step()  # steady state: optimizer state allocated, lazy initialisation done
    with C.PeakMemory(device) as pm:
        step()
    return pm.result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    machine = C.machine_info(device)
    log = C.log_to_stderr if args.verbose else None
    engines: dict[str, dict[str, Any]] = {}
    resolved: dict[str, Any] = {}
    for name in C.parse_list(args.engine, DEFAULT_ENGINES):
        eng, desc = C.resolve_engine(name)
        engines[name] = {"available": eng is not None, ("engine" if eng is not None else "reason"): desc}
        if eng is not None:
            resolved[name] = eng
        else:
            C.log_to_stderr(f"[step] skipping engine {name!r}: {desc}")
    models = C.parse_list(args.models, ["mlp", "cnn"] if args.quick else [*C.MODELS, *C.HF_MODELS])
    repeats = args.repeats or (2 if args.quick else 7)
    target = 0.0 if args.quick else 0.25
    out: dict[str, Any] = {}
    for model_name in models:
        batch = args.batch or C.default_batch(model_name, device)
        if args.quick:  # exercise the code, not measure: a few samples per batch
            batch = min(batch, QUICK_BATCH[model_name])
        base, forget, retain = _setup(model_name, batch, device)
        steps: dict[str, Any] = {"a": make_variant("a", None, copy.deepcopy(base), forget, retain),
                                 "af": make_variant("af", None, copy.deepcopy(base), forget, retain)}
        errors: dict[str, str] = {}
        for name, eng in resolved.items():
            try:
                for kind in ("b", "c"):
                    fn = make_variant(kind, eng, copy.deepcopy(base), forget, retain, args.mask)
                    fn()  # fails early for layers an engine does not support
                    steps[f"{kind}[{name}]"] = fn
            except Exception as err:  # noqa: BLE001 - reported in the JSON, the others still run
                errors[name] = f"{type(err).__name__}: {err}"
                steps.pop(f"b[{name}]", None)
                C.log_to_stderr(f"[step] {model_name}: engine {name!r} failed: {errors[name]}")
        ok = [name for name in resolved if name not in errors]
        C.log_to_stderr(f"[step] {model_name} B={batch}: timing {', '.join(steps)} x {repeats} repeats")
        # every b/c variant has already run once (the engine check above); one more warm-up call each
        timing = C.interleaved_timing(steps, device=device, repeats=repeats, target_s=target, log=log,
                                      warmup=1)
        ratios = {
            name: {"b/a": C.ratio_stats(timing, f"b[{name}]", "a"), "c/a": C.ratio_stats(timing, f"c[{name}]", "a"),
                   "c/af": C.ratio_stats(timing, f"c[{name}]", "af")}
            for name in ok
        }
        kept, routes, held = {}, {}, {}
        for name in ok:
            opt = steps[f"b[{name}]"].opt
            d = opt.diagnostics
            kept[name] = None if d is None else d.kept_fraction
            routes[name] = _routes(opt)
            for kind in ("b", "c"):  # the buffers a masked step keeps between steps (reuse_buffers)
                held[f"{kind}[{name}]"] = steps[f"{kind}[{name}]"].opt.workspace.nbytes / 2**20
        memory: dict[str, Any] = {}
        if not args.no_memory:
            mem_variants = list(steps)
            if args.quick:
                mem_variants = mem_variants[:1] if model_name == models[0] else []
            for v in mem_variants:
                kind, _, rest = v.partition("[")
                spec = {"model": model_name, "batch": batch, "device": str(device), "kind": kind,
                        "mask": args.mask, "engine": rest.rstrip("]") or None, "threads": torch.get_num_threads()}
                if device.type == "cuda":
                    with C.PeakMemory(device) as pm:
                        steps[v]()
                    memory[v] = pm.result
                else:
                    memory[v] = C.run_child(Path(__file__), spec)
        out[model_name] = {
            "desc": {**C.MODELS, **C.HF_MODELS}[model_name]["desc"],
            "params": C.count_params(base),
            "batch_forget": batch,
            "batch_retain": batch,
            "timing": {k: {kk: vv for kk, vv in v.items()} for k, v in timing.items()},
            "ratios": ratios,
            "kept_fraction_last_b_step": kept,
            "parameter_elements_by_route": routes,
            "workspace_mib_between_steps": held,
            "memory": memory,
            "engine_errors": errors,
        }
        del steps, base
    config = {"quick": args.quick, "repeats": repeats, "target_seconds_per_measurement": target,
              "lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "mask": args.mask,
              "mask_options": MASKS[args.mask],
              "variants": {"a": "plain NegGrad+ forward+backward (forget and retain) + torch.optim.SGD.step",
                           "af": "the same with torch.optim.SGD(fused=True)",
                           "b": "ProbablyAlignedSGD.step(forget, retain), default direction, no caller backward",
                           "c": "caller's NegGrad+ backward, then ProbablyAlignedSGD.step(forget, retain)"},
              "memory": ("CUDA: torch.cuda.max_memory_allocated above the allocation before one step "
                         "(after warm-up). CPU: peak RSS (VmHWM, reset before the step) above RSS before "
                         "one step, after one warm-up step, in a fresh process per variant. The masked "
                         "steps' workspace (reuse_buffers, held between steps) is part of that steady "
                         "state: workspace_mib_between_steps.")}
    return C.bench_payload("step", machine, t_start, config, engines=engines, models=out)


def table(payload: dict[str, Any]) -> str:
    """Markdown table of the step ratios and peak memory."""
    rows = ["| model | B | engine | a: plain (ms) | b/a | c/a | c/af | peak mem a / b / c (MiB) | kept (b) | "
            "rules / layer / whole |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in payload["models"].items():
        a_ms = m["timing"]["a"]["median_s"] * 1e3
        for eng, r in m["ratios"].items():
            mems = []
            for v in ("a", f"b[{eng}]", f"c[{eng}]"):
                mm = m["memory"].get(v)
                mems.append("–" if not mm or "peak_delta_mib" not in mm else f"{mm['peak_delta_mib']:.0f}")
            kept = m["kept_fraction_last_b_step"].get(eng)
            rt = m.get("parameter_elements_by_route", {}).get(eng)
            routes = "–" if not rt else " / ".join(f"{rt[k]:.0%}" for k in ("rules", "layer", "whole"))
            caf = r.get("c/af")
            rows.append(f"| {name} | {m['batch_forget']} | {eng} | {a_ms:.2f} | {r['b/a']['median']:.2f}× | "
                        f"{r['c/a']['median']:.2f}× | {'–' if caf is None else format(caf['median'], '.2f') + '×'} | "
                        f"{' / '.join(mems)} | "
                        f"{'–' if kept is None else f'{kept:.1%}'} | {routes} |")
    rows += ["", "b/a, c/a: median of per-repeat ratios; c/af: c against the plain step with torch's "
             "SGD(fused=True). Peak mem: extra memory of one step above the steady "
             "state (CPU: peak RSS, fresh process per variant; a few MiB is within the C allocator's noise). "
             "kept: fraction of coordinates the mask kept in the last b step. rules / layer / whole: share of "
             "parameter elements whose statistics come from layer rules, the per-layer fallback and the "
             "whole-model (vmap) fallback."]
    unavailable = [f"{k}: {v['reason']}" for k, v in payload["engines"].items() if not v["available"]]
    unavailable += [f"{k} on {name}: {e}" for name, m in payload["models"].items()
                    for k, e in m.get("engine_errors", {}).items()]
    if unavailable:
        rows.append("")
        rows += [f"Not run — {u}" for u in unavailable]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = C.bench_parser(__doc__, child=True)
    p.add_argument("--engine", "--engines", dest="engine", default=None,
                   help=f"comma-separated statistics engines (default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--models", default=None, help=f"comma-separated, from {','.join(C.MODELS)}")
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every model")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--mask", choices=tuple(MASKS), default="defaults",
                   help="the mask of the masked variants: the optimizer's defaults, or both tests at 0.95 unscaled")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return C.bench_main(argv, build_parser, run, table, "step.json", child=child)


if __name__ == "__main__":
    main()
