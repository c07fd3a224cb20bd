"""Statistics engines: per-coordinate mean and M2 of per-sample gradients, several ways.

For each model (MLP B=128, small CNN B=64, ResNet-18-GroupNorm B=16 on CPU / 128 on CUDA), side by
side in one process (interleaved repeats, after warm-up, medians), as a multiple of one plain
forward+backward of the mean loss on the same batch:

  loop      a plain per-sample loop: one autograd.grad per sample, streaming Welford moments (float32)
  vmap      masked_optim.VmapEngine (torch.func vmap(grad), chunked, Chan-merged)
  hooks     the hook-based engine (``engine="hooks"``), when this masked_optim has it
  auto      ``engine="auto"`` (hooks with the vmap fallback), when asked for with --engines
  opacus    Opacus GradSampleModule (loss_reduction="sum") + two-pass moments — optional
  backpack  BackPACK Variance on a summed loss (M2 = n·variance) — optional

Error: max |x − ref| / max |ref| over every parameter the engine covered, for the mean and for M2,
against the per-sample loop in float64. ``covered`` counts parameters an engine returned
statistics for (BackPACK leaves some out without saying so). Peak memory: fresh subprocess per
engine on CPU (peak RSS above the steady state), ``max_memory_allocated`` on CUDA.

    python benchmarks/bench_stats.py [--quick] [--device cpu|cuda] [--engines vmap,hooks]
        [--comparators loop,opacus,backpack]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from masked_optim.stats import chunk_moments  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")

DEFAULT_ENGINES = ("vmap", "hooks")
DEFAULT_COMPARATORS = ("loop", "opacus", "backpack")
QUICK_BATCH = {"mlp": 8, "cnn": 8, "resnet18": 4}

Moments = tuple[list[Tensor | None], list[Tensor | None]]


# --------------------------------------------------------------------------------------------
# the engines, each: (model, batch) -> prepared callable returning (means, m2s) per parameter
# --------------------------------------------------------------------------------------------
def loop_moments(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
                 dtype: torch.dtype = torch.float32) -> Moments:
    """Per-sample autograd loop with Welford's streaming update (no n×P storage)."""
    mean = [torch.zeros_like(p, dtype=dtype) for p in params]
    m2 = [torch.zeros_like(p, dtype=dtype) for p in params]
    for k in range(y.shape[0]):
        loss = F.cross_entropy(model(x[k:k + 1]), y[k:k + 1])
        gs = torch.autograd.grad(loss, params)
        for mu, q, g in zip(mean, m2, gs):
            g = g.to(dtype)
            delta = g - mu
            mu.add_(delta, alpha=1.0 / (k + 1))
            q.addcmul_(delta, g - mu)
    return mean, m2


def prepare(name: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Moments]:
    """A callable computing the moments with engine ``name``; raises ImportError when an optional
    comparator is not installed and any other error when it cannot handle the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "plain":
        def plain() -> Moments:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            return [None] * len(params), [None] * len(params)
        return plain
    if name == "loop":
        return lambda: loop_moments(model, params, x, y)
    if name == "opacus":
        from opacus import GradSampleModule

        # Opacus records activations only in training mode; these models have no BatchNorm or
        # dropout, so train mode computes the same function as the eval behaviour of the others.
        gsm = GradSampleModule(copy.deepcopy(model).train(), batch_first=True, loss_reduction="sum")
        gparams = [p for p in gsm.parameters() if p.requires_grad]

        def opacus_fn() -> Moments:
            gsm.zero_grad(set_to_none=True)
            for p in gparams:
                p.grad_sample = None
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            means, m2s = [], []
            for p in gparams:
                gsample = getattr(p, "grad_sample", None)
                if gsample is None:
                    means.append(None)
                    m2s.append(None)
                else:
                    mu, q = chunk_moments(gsample)
                    means.append(mu)
                    m2s.append(q)
            return means, m2s
        return opacus_fn
    if name == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import Variance

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
        n = y.shape[0]

        def make(use_converter: bool) -> Callable[[], Moments]:
            bmodel = extend(copy.deepcopy(model), use_converter=use_converter)
            named = dict(bmodel.named_parameters())
            # the converter (torch.fx) may rename submodules: match by name, dots or underscores
            bparams = [named.get(k, named.get(k.replace(".", "_"))) for k in names]

            def backpack_fn() -> Moments:
                bmodel.zero_grad(set_to_none=True)
                for p in bparams:
                    if p is not None and hasattr(p, "variance"):
                        del p.variance
                with backpack(Variance()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lossf(bmodel(x), y).backward()
                means, m2s = [], []
                for p in bparams:
                    var = None if p is None else getattr(p, "variance", None)
                    means.append(None if var is None else p.grad / n)
                    # summed loss: variance = (1/n) Σ g² − μ², the biased variance, so M2 = n · variance
                    m2s.append(None if var is None else var * n)
                return means, m2s
            return backpack_fn

        fn = make(False)
        try:
            fn()
        except RuntimeError:
            # residual connections with in-place additions need BackPACK's graph converter
            fn = make(True)
        return fn
    # masked_optim engines
    eng, desc = C.resolve_engine(name)
    if eng is None:
        raise ImportError(desc)
    fn = C.engine_callable(eng)

    def engine_fn() -> Moments:
        st = fn(model, params, (x, y), None)
        return list(st.mean), list(st.m2)
    return engine_fn


def rel_errors(got: Moments, ref: Moments) -> dict[str, Any]:
    out: dict[str, Any] = {}
    covered = sum(m is not None for m in got[0])
    out["covered_params"] = f"{covered}/{len(ref[0])}"
    for label, g_list, r_list in (("mean", got[0], ref[0]), ("m2", got[1], ref[1])):
        err, scale = 0.0, 0.0
        for g, r in zip(g_list, r_list):
            scale = max(scale, float(r.abs().max()))
            if g is not None:
                err = max(err, float((g.double().reshape(r.shape) - r).abs().max()))
        out[f"{label}_max_rel_err"] = err / scale if scale > 0 else err
    return out


def _setup(model_name: str, batch: int, device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    model = C.build_model(model_name).to(device).eval()
    x, y = C.make_batch(model_name, batch, device, seed=3)
    return model, x, y


def child(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, x, y = _setup(spec["model"], spec["batch"], device)
    fn = prepare(spec["engine"], model, x, y)
    fn()
    with C.PeakMemory(device) as pm:
        res = fn()
        del res
    return pm.result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    machine = C.machine_info(device)
    log = C.log_to_stderr if args.verbose else None
    comparators = C.parse_list(args.comparators, DEFAULT_COMPARATORS)
    wanted = [c for c in comparators if c == "loop"] + C.parse_list(args.engines, DEFAULT_ENGINES) \
        + [c for c in comparators if c != "loop"]
    models = C.parse_list(args.models, ["mlp", "cnn"] if args.quick else list(C.STATS_MODELS))
    repeats = args.repeats or (2 if args.quick else 5)
    target = 0.0 if args.quick else 0.2
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for model_name in models:
        batch = args.batch or C.default_batch(model_name, device)
        if args.quick:
            batch = min(batch, QUICK_BATCH[model_name])
        model, x, y = _setup(model_name, batch, device)
        params = [p for p in model.parameters() if p.requires_grad]
        # float64 reference: the per-sample loop on a float64 copy
        m64 = copy.deepcopy(model).double()
        ref = loop_moments(m64, [p for p in m64.parameters() if p.requires_grad], x.double(), y, torch.float64)
        del m64
        fns: dict[str, Callable[[], Moments]] = {"plain": prepare("plain", model, x, y)}
        errors: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for name in wanted:
            try:
                fn = prepare(name, model, x, y)
                got = fn()
            except ImportError as err:
                skipped[name] = f"not installed / not available: {err}"
                continue
            except Exception as err:  # noqa: BLE001 - reported, the others still run
                failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                C.log_to_stderr(f"[stats] {model_name}: {name} failed: {failures[name]}")
                continue
            if len(got[0]) != len(params):
                failures[name] = f"returned {len(got[0])} parameters, expected {len(params)}"
                continue
            errors[name] = rel_errors(got, ref)
            fns[name] = fn
            del got
        C.log_to_stderr(f"[stats] {model_name} B={batch}: timing {', '.join(fns)} x {repeats} repeats")
        timing = C.interleaved_timing(fns, device=device, repeats=repeats, target_s=target, log=log,
                                      warmup=1)
        ratios = {name: C.ratio_stats(timing, name, "plain") for name in fns if name != "plain"}
        memory: dict[str, Any] = {}
        if not args.no_memory:
            mem_names = list(fns)
            if args.quick:
                mem_names = ["vmap"] if model_name == models[0] and "vmap" in fns else []
            for name in mem_names:
                if device.type == "cuda":
                    fns[name]()
                    with C.PeakMemory(device) as pm:
                        res = fns[name]()
                        del res
                    memory[name] = pm.result
                else:
                    memory[name] = C.run_child(Path(__file__), {
                        "model": model_name, "batch": batch, "device": str(device), "engine": name,
                        "threads": torch.get_num_threads()})
        out[model_name] = {
            "desc": C.MODELS[model_name]["desc"], "params": C.count_params(model), "batch": batch,
            "timing": timing, "ratio_to_plain_fwd_bwd": ratios, "errors_vs_float64_loop": errors,
            "failures": failures, "memory": memory,
        }
    config = {"quick": args.quick, "repeats": repeats, "target_seconds_per_measurement": target,
              "engines": wanted, "unit": "one plain forward+backward of the mean CE loss on the batch",
              "error": "max |x - ref| / max |ref| over covered parameters, ref = float64 per-sample loop",
              "memory": ("CUDA: max_memory_allocated above the allocation before one call. CPU: peak RSS "
                         "above RSS before one call, after a warm-up call, fresh process per engine.")}
    return C.bench_payload("stats", machine, t_start, config, skipped=skipped, models=out)


def table(payload: dict[str, Any]) -> str:
    rows = ["| model | B | engine | time (ms) | × plain fwd+bwd | rel. err mean / M2 | covered | peak mem (MiB) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in payload["models"].items():
        for eng, t in m["timing"].items():
            r = "1.00×" if eng == "plain" else f"{m['ratio_to_plain_fwd_bwd'][eng]['median']:.2f}×"
            e = m["errors_vs_float64_loop"].get(eng)
            err = "–" if e is None else f"{e['mean_max_rel_err']:.1e} / {e['m2_max_rel_err']:.1e}"
            cov = "–" if e is None else e["covered_params"]
            mm = m["memory"].get(eng)
            mem = "–" if not mm or "peak_delta_mib" not in mm else f"{mm['peak_delta_mib']:.0f}"
            rows.append(f"| {name} | {m['batch']} | {eng} | {t['median_s'] * 1e3:.2f} | {r} | {err} | {cov} | {mem} |")
        for eng, why in m["failures"].items():
            rows.append(f"| {name} | {m['batch']} | {eng} | fails | – | – | – | – |")
    notes = [f"- {name} on {mn}: {why}" for mn, m in payload["models"].items() for name, why in m["failures"].items()]
    notes += [f"- {name} skipped: {why}" for name, why in payload["skipped"].items()]
    return "\n".join(rows + ([""] + notes if notes else []))


def build_parser() -> argparse.ArgumentParser:
    p = C.bench_parser(__doc__, child=True)
    p.add_argument("--engines", "--engine", dest="engines", default=None,
                   help=f"masked_optim engines, comma-separated (default {','.join(DEFAULT_ENGINES)}; also 'auto')")
    p.add_argument("--comparators", default=None,
                   help=f"reference and optional comparators (default {','.join(DEFAULT_COMPARATORS)}); "
                        "opacus and backpack are skipped when not installed")
    p.add_argument("--models", default=None, help=f"comma-separated, from {','.join(C.MODELS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return C.bench_main(argv, build_parser, run, table, "stats.json", child=child)


if __name__ == "__main__":
    main()
