"""Quality sweep: unlearning methods × {plain, masked} × learning rates × seeds, on the workbench.

The workbench study trains (or loads from its cache) the original model on all training data and
the retrained gold standard on the retain set alone, for every seed; then every method runs from the
original weights with the plain optimizer (``confidence=None``, i.e. torch.optim SGD) and with the
masked one (``--confidence``, default 0.95 on both tests, with the optimizer's default step length;
the package's own defaults are studied by ``defaults_study.py``), at every learning rate, drawing the same batches for a given seed.
Reported per (method, lr, plain/masked): mean ± std over seeds of FA, RA, TA, MIA-efficacy
(SalUn's SVC recipe), UA and the average gap to retrain over FA/RA/TA/MIA, and the mean kept
fraction and runtime.

How it runs (``--via``):
  cli   the workbench's command, ``python -m masked_optim unlearn --out DIR ...`` in a subprocess;
        its ``results.json`` is aggregated here (the default when the CLI exists);
  api   the workbench's public functions in this process (load_dataset, make_split,
        reference_model, get_method, run_unlearning, evaluate, avg_gap);
  skip  with a message (and a JSON recording why) when neither is installed.

    python benchmarks/bench_quality.py [--quick] [--dataset digits] [--forget class:3]
        [--methods FT,GA,...] [--lrs 0.01,0.03,0.1] [--seeds 0,1,2] [--via auto|cli|api]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

QUICK_METHODS = ("NegGrad+", "RL")
METRIC_KEYS = ("FA", "RA", "TA", "MIA", "UA", "gap")


def _workbench() -> dict[str, Any]:
    """The workbench's public functions, or ImportError naming what is missing."""
    from masked_optim.workbench.data import load_dataset, make_split
    from masked_optim.workbench.methods import METHODS, get_method
    from masked_optim.workbench.metrics import avg_gap, evaluate
    from masked_optim.workbench.models import default_arch
    from masked_optim.workbench.runner import run_unlearning
    from masked_optim.workbench.training import ModelCache, TrainConfig, default_train_config, reference_model

    return dict(load_dataset=load_dataset, make_split=make_split, METHODS=METHODS, get_method=get_method,
                avg_gap=avg_gap, evaluate=evaluate, default_arch=default_arch, run_unlearning=run_unlearning,
                ModelCache=ModelCache, TrainConfig=TrainConfig, default_train_config=default_train_config,
                reference_model=reference_model)


def mean_std(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def _metrics_dict(m: Any) -> dict[str, float]:
    return dict(m.as_dict()) if hasattr(m, "as_dict") else dict(m)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's grid, with the quick-mode reductions."""
    quick = args.quick
    return {
        "methods": C.parse_list(args.methods, QUICK_METHODS if quick else []) or None,  # None: all
        "lrs": [float(v) for v in C.parse_list(args.lrs, ["0.03"] if quick else ["0.01", "0.03", "0.1"])],
        "seeds": [int(v) for v in C.parse_list(args.seeds, ["0"] if quick else ["0", "1", "2"])],
        "epochs": args.epochs if args.epochs is not None else (1 if quick else None),
        "train_epochs": args.train_epochs if args.train_epochs is not None else (3 if quick else None),
    }


def _cli_available() -> bool:
    return importlib.util.find_spec("masked_optim.cli") is not None


def _cli_options() -> set[str] | None:
    """The long options of ``masked-optim unlearn`` (None when they cannot be read)."""
    import contextlib
    import io
    import re

    try:
        from masked_optim.cli import build_parser

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            build_parser().parse_args(["unlearn", "--help"])
        return set(re.findall(r"--[a-z][a-z0-9-]*", buf.getvalue())) or None
    except Exception:  # noqa: BLE001 - then every option is passed and the CLI says what it rejects
        return None


def run_cli(args: argparse.Namespace, grid: dict[str, Any], cache_dir: str | None, out_dir: Path) -> dict[str, Any]:
    """``python -m masked_optim unlearn`` into ``out_dir``; returns its results.json."""
    supported = _cli_options()
    cmd = [sys.executable, "-m", "masked_optim", "unlearn", "--out", str(out_dir),
           "--device", args.device, "--dataset", args.dataset,
           "--lrs", ",".join(f"{v:g}" for v in grid["lrs"]), "--seeds", ",".join(map(str, grid["seeds"])),
           "--optimizer", args.optimizer, "--confidence", str(args.confidence)]
    if grid["methods"]:
        cmd += ["--methods", ",".join(grid["methods"])]
    for flag, value in (("--forget", args.forget), ("--data-root", args.data_root), ("--model", args.arch),
                        ("--epochs", grid["epochs"]), ("--train-epochs", grid["train_epochs"]),
                        ("--batch-size", args.batch_size), ("--cache-dir", cache_dir)):
        if value is not None:
            cmd += [flag, str(value)]
    # options that only save time or noise: passed when this version of the CLI has them
    for flag, value in (("--threads", str(args.threads or C.torch.get_num_threads())), ("--quiet", None),
                        ("--track-every", "0")):
        if supported is None or flag in supported:
            cmd += [flag] + ([value] if value is not None else [])
    C.log_to_stderr("[quality] " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"masked-optim unlearn exited {proc.returncode}: " + " | ".join(tail))
    # the CLI writes one folder per dataset (OUT/<dataset>/results.json) beside a combined index
    per_dataset = out_dir / args.dataset / "results.json"
    result = json.loads((per_dataset if per_dataset.is_file() else out_dir / "results.json").read_text())
    result["_command"] = cmd
    return result


def _from_cli(result: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Runs and per-seed references in this script's format from the CLI's results.json."""
    runs = []
    for r in result["runs"]:
        met = dict(r["metrics"])
        met["gap"] = r["gap"]
        runs.append({"method": r["method"], "lr": float(r["lr"]), "variant": r["mask"], "seed": r["seed"],
                     "metrics": met, "kept_fraction": r["kept_fraction"], "runtime_s": r["runtime_s"],
                     "steps": r.get("steps"), "diverged": r.get("diverged", False),
                     "skipped_steps": r.get("skipped_steps", 0)})
    refs: dict[str, Any] = {}
    for kind in ("original", "retrain"):
        for rec in result["reference"][kind]:
            met = dict(rec["metrics"])
            met["gap"] = rec.get("gap", 0.0)
            refs.setdefault(str(rec["seed"]), {})[kind] = met
    info = {"study_config": result.get("config"), "train_config": result.get("train_config"),
            "data": result.get("data"), "study_environment": result.get("environment"),
            "command": result.get("_command"), "study_wall_time_s": result.get("wall_time_s")}
    return runs, refs, info


def run_api(args: argparse.Namespace, grid: dict[str, Any], cache_dir: str | None, device: torch.device,
            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The same sweep through the workbench's public functions, in this process."""
    W = _workbench()
    methods = grid["methods"] or list(W["METHODS"])
    arch = args.arch or W["default_arch"](args.dataset)
    train_cfg = W["default_train_config"](args.dataset)
    if grid["train_epochs"] is not None:
        train_cfg = W["TrainConfig"](**{**train_cfg.__dict__, "epochs": grid["train_epochs"]})
    cache = W["ModelCache"](cache_dir)
    opt_kwargs = {"engine": args.engine} if args.engine else None
    data = W["load_dataset"](args.dataset, args.data_root) if args.data_root else W["load_dataset"](args.dataset)
    split = W["make_split"](data, args.forget or "class:3", seed=0)
    runs: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    for seed in grid["seeds"]:
        orig, _ = W["reference_model"]("original", split, arch, config=train_cfg, seed=seed, cache=cache,
                                       device=device, progress=False)
        retr, _ = W["reference_model"]("retrain", split, arch, config=train_cfg, seed=seed, cache=cache,
                                       device=device, progress=False)
        m_orig, m_retr = _metrics_dict(W["evaluate"](orig, split)), _metrics_dict(W["evaluate"](retr, split))
        m_orig["gap"], m_retr["gap"] = W["avg_gap"](m_orig, m_retr), 0.0
        refs[str(seed)] = {"original": m_orig, "retrain": m_retr}
        for name in methods:
            for lr in grid["lrs"]:
                for masked in (False, True):
                    method = W["get_method"](name, epochs=grid["epochs"])
                    r = W["run_unlearning"](copy.deepcopy(orig), method, split, masked=masked, lr=lr,
                                            batch_size=args.batch_size or 64, optimizer=args.optimizer,
                                            mask_options={"confidence": args.confidence} if masked else None,
                                            seed=seed, optimizer_kwargs=opt_kwargs)
                    met = _metrics_dict(r.metrics)
                    met["gap"] = W["avg_gap"](met, m_retr)
                    runs.append({"method": method.name, "lr": lr, "variant": "masked" if masked else "plain",
                                 "seed": seed, "metrics": met, "kept_fraction": r.kept_fraction,
                                 "runtime_s": r.runtime_s, "steps": r.steps, "diverged": r.diverged,
                                 "skipped_steps": r.skipped_steps})
    info = {"arch": arch, "train_config": train_cfg.__dict__, "forget": str(split.spec),
            "n_forget": len(split.forget_idx), "n_retain": len(split.retain_idx), "n_test": len(split.test_idx)}
    return runs, refs, info


def aggregate(runs: list[dict[str, Any]], refs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    summary = []
    keys = []
    for r in runs:
        k = (r["method"], r["lr"])
        if k not in keys:
            keys.append(k)
    for name, lr in keys:
        for variant in ("plain", "masked"):
            rs = [r for r in runs if r["method"] == name and r["lr"] == lr and r["variant"] == variant]
            if not rs:
                continue
            row: dict[str, Any] = {"method": name, "lr": lr, "variant": variant, "seeds": len(rs)}
            for k in METRIC_KEYS:
                row[k] = mean_std([r["metrics"].get(k) for r in rs])
            row["kept_fraction"] = mean_std([r["kept_fraction"] for r in rs])
            row["runtime_s"] = mean_std([r["runtime_s"] for r in rs])
            row["diverged"] = sum(bool(r["diverged"]) for r in rs)
            summary.append(row)
    references = {kind: {k: mean_std([refs[s][kind].get(k) for s in refs]) for k in METRIC_KEYS}
                  for kind in ("original", "retrain")}
    return summary, references


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    base: dict[str, Any] = {"benchmark": "quality", "machine": C.machine_info(device)}
    via = args.via
    if via == "auto":
        via = "cli" if _cli_available() and not args.engine else "api"
    if via == "api":
        try:
            _workbench()
        except ImportError as err:
            msg = f"the workbench (masked_optim.workbench) is not available: {err}"
            C.log_to_stderr(f"[quality] skipped: {msg}")
            return {**base, "skipped": msg, "seconds": time.perf_counter() - t_start}
    elif not _cli_available():
        msg = "the workbench command (masked_optim.cli) is not available"
        C.log_to_stderr(f"[quality] skipped: {msg}")
        return {**base, "skipped": msg, "seconds": time.perf_counter() - t_start}

    grid = _settings(args)
    tmp = None
    cache_dir = args.cache
    if cache_dir is None and args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="mo_bench_")
        cache_dir = str(Path(tmp.name) / "cache")
    try:
        cli_error = None
        if via == "cli":
            study_dir = (args.out / "quality_study") if args.out is not None and not args.quick else None
            if study_dir is None:
                tmp = tmp or tempfile.TemporaryDirectory(prefix="mo_bench_")
                study_dir = Path(tmp.name) / "study"
            try:
                runs, refs, info = _from_cli(run_cli(args, grid, cache_dir, study_dir))
                info["study_folder"] = str(study_dir) if not args.quick else None
            except (RuntimeError, KeyError, OSError, json.JSONDecodeError, subprocess.TimeoutExpired) as err:
                if args.via == "cli":
                    raise
                # the CLI is younger than the workbench's functions: fall back to them, say so
                cli_error = f"{type(err).__name__}: {err}"
                C.log_to_stderr(f"[quality] the CLI study failed ({cli_error}); using the workbench API")
                via = "api"
        if via == "api":
            runs, refs, info = run_api(args, grid, cache_dir, device)
            if cli_error:
                info["cli_error"] = cli_error
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary, references = aggregate(runs, refs)
    config = {
        "quick": args.quick, "via": via, "dataset": args.dataset,
        "forget": (info.get("data") or {}).get("forget") or info.get("forget") or args.forget,
        "methods": sorted({r["method"] for r in runs}, key=[r["method"] for r in runs].index),
        "lrs": grid["lrs"], "seeds": grid["seeds"],
        "epochs": grid["epochs"] if grid["epochs"] is not None else "method default",
        "batch_size": args.batch_size or 64, "optimizer": args.optimizer, "momentum": 0.9, "weight_decay": 5e-4,
        "confidence": args.confidence, "engine": args.engine or "optimizer default",
        "seed_controls": "original and retrain training, unlearning batch order (the forget set is fixed)",
        "gap": "Avg. Gap = mean |metric - retrain metric| over FA, RA, TA, MIA (percentage points)",
        **info,
    }
    return C.bench_payload("quality", base["machine"], t_start, config, references=references,
                           per_seed_references=refs, summary=summary, runs=runs)


def _fmt(ms: dict[str, Any], digits: int = 1) -> str:
    if ms.get("mean") is None:
        return "–"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def table(payload: dict[str, Any]) -> str:
    if "skipped" in payload:
        return f"Quality sweep skipped: {payload['skipped']}"
    cfg = payload["config"]
    study = cfg.get("study_config") or {}
    arch = cfg.get("arch") or study.get("model") or "?"
    batch = study.get("batch_size") or cfg["batch_size"]
    data = cfg.get("data") or {}
    sizes = (f" ({data['n_forget']} forget / {data['n_retain']} retain / {data['n_test']} test)"
             if data.get("n_forget") is not None else "")
    via = "`masked-optim unlearn`" if cfg.get("via") == "cli" else "the workbench API"
    rows = [f"{cfg['dataset']} / {arch}, forget {cfg['forget']}{sizes}, {len(cfg['seeds'])} seed(s), "
            f"batch {batch}, {cfg['optimizer'].upper()} (momentum 0.9, weight decay 5e-4), masked at "
            f"confidence {cfg['confidence']}; via {via}; mean ± std over seeds, in %. "
            "Avg. Gap = mean |Δ| to retrain over FA, RA, TA, MIA.", "",
            "| method | lr | optimizer | FA | RA | TA | MIA | Avg. Gap ↓ | kept | time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("original", "retrain"):
        r = payload["references"][kind]
        rows.append(f"| {kind} | – | – | {_fmt(r['FA'])} | {_fmt(r['RA'])} | {_fmt(r['TA'])} | {_fmt(r['MIA'])} | "
                    f"{_fmt(r['gap'], 2)} | – | – |")
    for s in payload["summary"]:
        div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        rows.append(f"| {s['method']} | {s['lr']:g} | {s['variant']}{div} | {_fmt(s['FA'])} | {_fmt(s['RA'])} | "
                    f"{_fmt(s['TA'])} | {_fmt(s['MIA'])} | {_fmt(s['gap'], 2)} | "
                    f"{_fmt(s['kept_fraction'], 3)} | {_fmt(s['runtime_s'], 2)} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = C.bench_parser(__doc__)
    p.add_argument("--dataset", default="digits", help="a workbench dataset (digits needs no download)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default=None, help="mlp, cnn or resnet18 (default: the workbench's choice)")
    p.add_argument("--forget", default=None, help="forget spec, e.g. random:0.1 or class:3 (default: the workbench's)")
    p.add_argument("--methods", default=None, help="comma-separated workbench methods (default: all)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default 0.01,0.03,0.1)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: the workbench's (64 on digits)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs of the original/retrained models")
    p.add_argument("--via", choices=("auto", "cli", "api"), default="auto",
                   help="run the study through the workbench's CLI or its public functions")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to the CLI study")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--engine", default=None,
                   help="statistics engine of the masked optimizer (default: its own; implies --via api)")
    p.add_argument("--cache", default=None, help="model cache folder (default: the workbench's)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return C.bench_main(argv, build_parser, run, table, "quality.json")


if __name__ == "__main__":
    main()
