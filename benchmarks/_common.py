"""Shared helpers of the benchmark scripts: machine description, interleaved timing, peak memory,
the benchmark models and the statistics engines.

Timing rules (benchmarks/README.md): every comparison is measured side by side in one process,
after warm-up, as the median of repeats whose variants are *interleaved* (each repeat runs every
variant once, in a rotated order), so slow drifts of a shared machine hit all variants alike.
Ratios are the median of the per-repeat ratios. On CUDA, times come from CUDA events with
synchronisation. Peak CPU memory is measured in a fresh subprocess per variant (peak RSS is
process-wide and monotone).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"

NOISE_NOTE = (
    "Measured on a shared machine while other jobs were running: absolute times are noisy. "
    "Variants are interleaved within each repeat and medians (of times and of per-repeat ratios) "
    "are reported; min and IQR show the spread."
)


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float | None:
    info = meminfo()
    return None if "MemTotal" not in info else round(info["MemTotal"] / 2**30, 1)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything a reader needs to judge a figure: CPU/GPU, torch, threads, date, load."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": loadavg(),
        "noise": NOISE_NOTE,
    }
    try:
        import masked_optim

        info["masked_optim"] = getattr(masked_optim, "__version__", "?")
        info["masked_optim_all"] = sorted(getattr(masked_optim, "__all__", []))
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds per call of a function on ``device`` (CUDA: events, after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any], inner: int) -> float:
        """Seconds per call of ``fn`` over ``inner`` back-to-back calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def summarise(times: Sequence[float]) -> dict[str, Any]:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return {
        "median_s": statistics.median(ts),
        "min_s": ts[0],
        "iqr_s": [q[0], q[2]],
        "repeats": len(ts),
    }


def interleaved_timing(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    target_s: float = 0.1,
    max_inner: int = 1000,
    log: Callable[[str], None] | None = None,
    settle: int = 0,
) -> dict[str, dict[str, Any]]:
    """Time every function side by side: ``warmup`` calls each (the last one calibrates an inner loop
    so that one measurement lasts about ``target_s``), then ``repeats`` rounds that each run every function once
    in a rotated order. ``settle``: untimed calls before each measurement, so that a function is timed
    in its steady state, not just after another one evicted its data from the caches (which would
    weigh on functions with short inner loops most). Returns per-function summaries with the raw
    per-repeat times."""
    timer = Timer(device)
    names = list(fns)
    inner: dict[str, int] = {}
    for name in names:
        t = 0.0
        for _ in range(max(1, warmup)):  # the last warm-up call calibrates the inner loop
            t = timer(fns[name], 1)
        inner[name] = int(max(1, min(max_inner, math.ceil(target_s / max(t, 1e-7)))))
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                for _ in range(settle):
                    fns[name]()
                times[name].append(timer(fns[name], inner[name]))
            if log:
                log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.2f} ms" for n in names))
    finally:
        if was_enabled:
            gc.enable()
    return {n: {**summarise(times[n]), "inner": inner[n], "times_s": times[n]} for n in names}


def ratio_stats(results: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    """Median (and min/max) of the per-repeat ratios ``num/den`` plus the ratio of medians."""
    a, b = results[num]["times_s"], results[den]["times_s"]
    rs = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(rs, n=4) if len(rs) >= 2 else [rs[0], rs[0], rs[0]]
    return {
        "median": statistics.median(rs),
        "iqr": [q[0], q[2]],
        "of_medians": results[num]["median_s"] / results[den]["median_s"],
    }


# --------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------
def proc_status_kib() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, rest = line.split(":", 1)
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block, as honestly as the device allows.

    CUDA: ``max_memory_allocated`` minus the allocation at entry (caching-allocator bytes handed
    to tensors). CPU: peak RSS (VmHWM, reset at entry when the kernel allows it) minus RSS at entry;
    meaningful only in a fresh process, because freed memory that the C allocator keeps is reused
    without raising RSS — use :func:`run_child` for one process per variant.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict[str, Any] = {}

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._reset = reset_peak_rss()
            self._base = proc_status_kib().get("VmRSS", 0) * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"kind": "cuda_max_allocated", "peak_delta_mib": (peak - self._base) / 2**20,
                           "base_mib": self._base / 2**20}
        else:
            st = proc_status_kib()
            peak = st.get("VmHWM", 0) * 1024
            self.result = {"kind": "rss_peak_fresh_process", "peak_delta_mib": (peak - self._base) / 2**20,
                           "base_mib": self._base / 2**20, "peak_reset": self._reset}


def run_child(script: Path, spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter and return the JSON it prints last."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"child exited {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# models and batches
# --------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, adaptive pooling to 4x4 and two linear layers (the
    workbench's small CNN, defined here so the benchmark does not move when the workbench does)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def resnet18_gn(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (unchanged stem) with GroupNorm(32, c) instead of BatchNorm."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))


MODELS = {
    "mlp": {"desc": "MLP 64-256-256-10", "input": (64,), "batch": {"cpu": 128, "cuda": 128}},
    "cnn": {"desc": "small CNN (conv32-conv64-pool-fc128), 3x32x32", "input": (3, 32, 32),
            "batch": {"cpu": 64, "cuda": 64}},
    "resnet18": {"desc": "torchvision ResNet-18, GroupNorm(32), 3x32x32", "input": (3, 32, 32),
                 "batch": {"cpu": 16, "cuda": 128}},
    # few samples, many parameters: the elementwise part of the step (mask + update) dominates
    "wide": {"desc": "wide MLP 2048-4096-2048 (16.8 M parameters, 2048 outputs, labels 0-9)", "input": (2048,),
             "batch": {"cpu": 4, "cuda": 4}},
}
#: models whose per-sample statistics bench_stats compares with a float64 per-sample loop by default
STATS_MODELS = ("mlp", "cnn", "resnet18")


# HuggingFace models from tiny random configs (no download), dict batches {"input_ids", "attention_mask",
# "labels"}: the layout HF trainers pass; timed by bench_step (not bench_stats: the vmap engine
# cannot batch transformers' attention-mask code)
HF_MODELS = {
    "gpt2": {"desc": "GPT-2 LM, 2 layers, width 128, 2 heads, vocab 1000, sequences of 64 (tied embedding)",
             "seq": 64, "vocab": 1000, "batch": {"cpu": 8, "cuda": 64}},
    "bert": {"desc": "BERT sequence classification, 2 layers, width 128, 2 heads, vocab 1000, sequences of 64",
             "seq": 64, "vocab": 1000, "batch": {"cpu": 8, "cuda": 64}},
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name in HF_MODELS:
        import transformers

        spec = HF_MODELS[name]
        if name == "gpt2":
            cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=spec["vocab"],
                                          n_positions=spec["seq"], bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(cfg)
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                      intermediate_size=512, vocab_size=spec["vocab"],
                                      max_position_embeddings=spec["seq"], num_labels=10)
        return transformers.BertForSequenceClassification(cfg)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return SmallCNN()
    if name == "resnet18":
        return resnet18_gn()
    if name == "wide":
        return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048))
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_batch(name: str, n: int, device: torch.device, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    if name in HF_MODELS:  # right-padded sequences of random lengths, padding masked (-100 for the LM)
        spec = HF_MODELS[name]
        length = spec["seq"]
        ids = torch.randint(1, spec["vocab"], (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100) if name == "gpt2" else torch.randint(0, 10, (n,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    x = torch.randn((n, *MODELS[name]["input"]), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def default_batch(name: str, device: torch.device) -> int:
    return {**MODELS, **HF_MODELS}[name]["batch"]["cuda" if device.type == "cuda" else "cpu"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# statistics engines
# --------------------------------------------------------------------------------------------
_HOOK_CLASS_HINTS = ("hook", "fast", "closedform", "closed_form")


def resolve_engine(name: str) -> tuple[Any | None, str]:
    """The statistics engine called ``name`` as the optimizers accept it, or ``(None, reason)``.

    ``"vmap"`` is :class:`masked_optim.VmapEngine`. Other names are tried as the optimizer's
    ``engine=`` string first (the fast engine of issue 5 is selectable as ``engine="hooks"`` or
    ``"auto"``), then as an engine class exported by ``masked_optim`` whose name matches. The value
    returned is what to pass as ``engine=`` (a string or an engine object).
    """
    import masked_optim

    if name == "vmap":
        return masked_optim.VmapEngine(), "masked_optim.VmapEngine()"
    tiny = nn.Linear(2, 2)
    try:
        opt = masked_optim.ProbablyAlignedSGD(tiny.parameters(), lr=0.1, model=tiny, engine=name)
        if isinstance(getattr(opt, "engine", None), str):
            raise TypeError("engine kept as a string")
        return name, f"engine={name!r} ({type(opt.engine).__name__})"
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        pass
    hints = (name.lower(),) + (_HOOK_CLASS_HINTS if name.lower() in ("hooks", "hook", "fast") else ())
    for attr in getattr(masked_optim, "__all__", []):
        obj = getattr(masked_optim, attr, None)
        if isinstance(obj, type) and attr.lower().endswith("engine") and attr != "VmapEngine" \
                and attr != "StatsEngine" and any(h in attr.lower() for h in hints):
            try:
                return obj(), f"masked_optim.{attr}()"
            except TypeError:
                continue
    return None, (f"engine {name!r} is not available in this masked_optim (neither engine={name!r} "
                  f"nor an exported engine class); masked_optim.__all__ = {sorted(masked_optim.__all__)}")


def engine_callable(engine: Any) -> Any:
    """An object ``engine(model, params, batch, loss_fn) -> GradStats`` for what ``resolve_engine``
    returned (a string engine is resolved through a throw-away optimizer)."""
    if not isinstance(engine, str):
        return engine
    import masked_optim

    tiny = nn.Linear(2, 2)
    return masked_optim.ProbablyAlignedSGD(tiny.parameters(), lr=0.1, model=tiny, engine=engine).engine


def add_common_args(p: Any) -> None:
    """Options every benchmark script takes."""
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--quick", action="store_true", help="a tiny run that only exercises the code (test suite)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (interleaved)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default); on a loaded machine 1 thread "
                        "is far less noisy than oversubscribed OpenMP")
    p.add_argument("--out", type=Path, default=None, help="results folder for the JSON file")
    p.add_argument("--verbose", action="store_true", help="log every repeat to stderr")


class torch_threads:
    """Set torch's intra-op thread count inside the block (``None``: leave it), restore it after."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self._old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._old)


def bench_payload(benchmark: str, machine: dict[str, Any], t_start: float, config: dict[str, Any],
                  **parts: Any) -> dict[str, Any]:
    """The JSON of a benchmark run: its name, ``machine`` (:func:`machine_info`, plus the load average at
    the end), its ``config``, its ``parts`` (in the order given) and the seconds since ``t_start``."""
    return {"benchmark": benchmark, "machine": {**machine, "loadavg_end": loadavg()}, "config": config,
            **parts, "seconds": time.perf_counter() - t_start}


def bench_parser(doc: str | None, *, child: bool = False) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script: its docstring as the help text, the options every
    script takes (:func:`add_common_args`) and, with ``child=True``, the hidden ``--child JSON`` option
    through which :func:`run_child` starts one fresh-process measurement."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    if child:
        p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def bench_main(
    argv: Sequence[str] | None,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    json_name: str,
    child: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``main()`` of a benchmark script: parse ``argv``; in ``--child JSON`` mode print
    ``child(spec)`` as one JSON line and return ``{}``; otherwise ``run(args)`` with ``--threads``
    torch threads (``--quick`` without ``--threads``: 1 thread), write the payload to
    ``--out/json_name`` when ``--out`` is given, print ``table(payload)`` and return the payload."""
    args = build_parser().parse_args(argv)
    if child is not None and args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    with torch_threads(args.threads if args.threads else (1 if args.quick else None)):
        payload = run(args)
    if args.out is not None:
        write_json(args.out / json_name, payload)
    print(table(payload))
    return payload


def parse_list(text: str | None, default: Sequence[str]) -> list[str]:
    if not text:
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loss_neggrad_plus(model: nn.Module, forget: Any, retain: Any) -> Tensor:
    """NegGrad+: descent on the retain batch, ascent on the forget batch (HF dict batches: the
    model's own loss)."""
    if isinstance(forget, dict):
        return model(**retain).loss - model(**forget).loss
    return F.cross_entropy(model(retain[0]), retain[1]) - F.cross_entropy(model(forget[0]), forget[1])
