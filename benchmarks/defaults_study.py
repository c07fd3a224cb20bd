"""The study that chooses the mask's defaults: step-length options × test settings × methods ×
learning rates × seeds, on digits (forget class 3) and MNIST-1D (forget a random 10 %).

    python benchmarks/defaults_study.py                 # screen + final, both data sets (~1 h, 2 cores)
    python benchmarks/defaults_study.py --stage final   # only the package's defaults against plain
    python benchmarks/defaults_study.py --quick         # a smoke run (the tests use it)

Every unlearning run starts from the cached original model of its seed and uses the workbench's
public API (``run_unlearning``, ``evaluate``, ``avg_gap``), one torch thread per worker process, so
a run's result does not depend on how the runs are scheduled. Runs are appended to
``runs.jsonl`` as they finish (a killed study resumes where it stopped); ``screen.json``,
``final.json`` and ``tables.md`` are written at the end.

Stage ``screen`` sweeps every configuration of :data:`CONFIGS`; :func:`choose` picks the package
default (the configuration that meets the acceptance rule on the most (data set, method) pairs,
then wins strictly on the most MNIST-1D methods, then has the lowest mean best-lr gap) and a
recommended configuration per method. Stage ``final`` runs the optimizer *as constructed with no
mask option* against plain at every learning rate, and both at three times each method's best
plain learning rate.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "defaults_study"
DATASETS = {"digits": ("digits", "class:3"), "mnist1d": ("mnist1d", "random:0.1")}
METHODS = ("RL", "NegGrad+", "GA", "FT", "SalUn", "l1-sparse", "SCRUB")
LRS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
SEEDS = (0, 1, 2)
BATCH = {"digits": 64, "mnist1d": 128}

# the configurations without a guard ran before retain_guard existed: they say so explicitly
_STRICT = {"confidence": 0.95, "retain_guard": None}
_LENIENT = {"confidence": 0.95, "retain_confidence": 0.05, "retain_guard": None}  # retain side: "not probably harmful"
#: name -> mask options (None: the plain optimizer). Step length: none / count or norm per tensor /
#: count over all tensors; tests: strict (both c = 0.95), lenient retain test, a laxer forget test,
#: plain sign agreement (c = 0.5), soft weights, Student-t.
CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "strict/none": {**_STRICT, "rescale": None},
    "lenient/none": {**_LENIENT, "rescale": None},
    "strict/count": {**_STRICT, "rescale": "count"},
    "lenient/count": {**_LENIENT, "rescale": "count"},
    "lenient-f0.8/count": {"confidence": 0.8, "retain_confidence": 0.05, "rescale": "count", "retain_guard": None},
    "sign/count": {"confidence": 0.5, "rescale": "count", "retain_guard": None},
    "soft/count": {**_STRICT, "soft": True, "rescale": "count"},
    "t/count": {**_STRICT, "quantile": "t", "rescale": "count"},
    "lenient/count-cap10": {**_LENIENT, "rescale": "count", "max_scale": 10.0},
    "lenient/count-global": {**_LENIENT, "rescale": "count", "rescale_scope": "global"},
    "strict/norm": {**_STRICT, "rescale": "norm"},
    "lenient/norm": {**_LENIENT, "rescale": "norm"},
    "sign/norm": {"confidence": 0.5, "rescale": "norm", "retain_guard": None},
    # a step whose retain-batch loss rises by more than the guard is halved (up to 4 times), then undone
    "lenient/norm/guard0.05": {**_LENIENT, "rescale": "norm", "retain_guard": 0.05},
    "lenient/norm/guard0.01": {**_LENIENT, "rescale": "norm", "retain_guard": 0.01},
}
DEFAULT = "default"  # the final stage's name for the optimizer constructed with no mask option

_STATE: dict[str, Any] = {}


def cpu_name() -> str:
    from masked_optim.workbench.study import cpu_model

    return cpu_model()


def _setup(dataset: str, seeds: tuple[int, ...], cache_dir: str | None, train_epochs: int | None) -> dict:
    """Data, split, retrain metrics and original weights of ``dataset`` (trained once, cached)."""
    from dataclasses import replace

    from masked_optim.workbench.data import load_dataset, make_split
    from masked_optim.workbench.metrics import evaluate
    from masked_optim.workbench.models import default_arch
    from masked_optim.workbench.training import ModelCache, default_train_config, reference_model

    name, forget = DATASETS[dataset]
    data = load_dataset(name)
    split = make_split(data, forget, seed=0)
    cfg = default_train_config(name)
    if train_epochs:
        cfg = replace(cfg, epochs=train_epochs)
    cache = ModelCache(cache_dir)
    arch = default_arch(name)
    out = {"split": split, "originals": {}, "retrain": {}, "reference": {}}
    for seed in seeds:
        for kind in ("original", "retrain"):
            model, rec = reference_model(kind, split, arch, config=cfg, seed=seed, cache=cache, progress=False)
            m = evaluate(model, split)
            out["reference"].setdefault(kind, []).append({"seed": seed, "metrics": m.as_dict(),
                                                          "train_seconds": rec["seconds"]})
            if kind == "original":
                out["originals"][seed] = model
            else:
                out["retrain"][seed] = m
    return out


def _worker_init(seeds, cache_dir, train_epochs, threads=1) -> None:
    import torch

    torch.set_num_threads(threads)
    _STATE.update(seeds=seeds, cache_dir=cache_dir, train_epochs=train_epochs)


def _run(job: tuple[str, str, str, float, int, dict | None, int | None]) -> dict[str, Any]:
    """One unlearning run; ``job`` = (dataset, config name, method, lr, seed, mask options, epochs)."""
    from masked_optim.workbench.methods import get_method
    from masked_optim.workbench.metrics import avg_gap
    from masked_optim.workbench.runner import run_unlearning

    dataset, config, method_name, lr, seed, options, epochs = job
    if dataset not in _STATE:
        _STATE[dataset] = _setup(dataset, _STATE["seeds"], _STATE["cache_dir"], _STATE["train_epochs"])
    st = _STATE[dataset]
    method = get_method(method_name, batch_size=BATCH[dataset], epochs=epochs)
    model = copy.deepcopy(st["originals"][seed])
    res = run_unlearning(model, method, st["split"], masked=options is not None, lr=lr, seed=seed,
                         mask_options=options or None)
    m = res.metrics
    return {"dataset": dataset, "config": config, "method": method.name, "lr": lr, "seed": seed, "epochs": epochs,
            "options": options, "metrics": m.as_dict(), "gap": avg_gap(m, st["retrain"][seed]),
            "collapsed": bool(m.collapsed), "diverged": bool(res.diverged), "kept_fraction": res.kept_fraction,
            "steps": res.steps, "runtime_s": res.runtime_s}


def _key(dataset: str, config: str, method: str, lr: float, seed: int, options: dict | None, epochs: int | None) -> str:
    """What identifies a run: also its mask options and epochs, so that a record of other settings
    (a quick run, or a configuration whose options changed) is never reused."""
    if options is not None and options.get("retain_guard", 0) is None:  # recorded before the key existed
        options = {k: v for k, v in options.items() if k != "retain_guard"}
    return json.dumps([dataset, config, method, round(lr, 12), seed, options, epochs], sort_keys=True)


def _record_key(r: dict[str, Any]) -> str:
    return _key(r["dataset"], r["config"], r["method"], r["lr"], r["seed"], r["options"], r.get("epochs"))


def _execute(jobs: list[tuple], log: Path, workers: int, seeds, cache_dir, train_epochs, threads: int = 1) -> list[dict]:
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[_record_key(r)] = r
    todo = [j for j in jobs if _key(*j) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {log.name}", file=sys.stderr, flush=True)
    # the reference models are trained (or loaded) once here, so workers only ever read the cache
    for ds in sorted({j[0] for j in todo}):
        _setup(ds, seeds, cache_dir, train_epochs)
    start = time.perf_counter()
    init = (seeds, cache_dir, train_epochs, threads)
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(log.open("a"))
        if workers > 1:
            # spawned workers: a fork after the parent trained with several threads can hang
            ex = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                         initializer=_worker_init, initargs=init))
            results = ex.map(_run, todo, chunksize=4)
        else:  # in this process (a forked worker can hang in a multithreaded OpenMP runtime)
            _worker_init(*init)
            results = map(_run, todo)
        for i, r in enumerate(results):
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            done[_record_key(r)] = r
            if (i + 1) % 50 == 0 or i + 1 == len(todo):
                el = time.perf_counter() - start
                print(f"  {i + 1}/{len(todo)} runs, {el:.0f} s, ~{el / (i + 1) * (len(todo) - i - 1):.0f} s left",
                      file=sys.stderr, flush=True)
    return [done[_key(*j)] for j in jobs]


# ---- aggregation (pure functions of the run records) ----------------------------------------------
def cells(runs: list[dict]) -> dict[tuple, dict[str, Any]]:
    """Mean ± std over seeds per (dataset, config, method, lr); ``bad`` counts collapsed or diverged seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["config"], r["method"], round(r["lr"], 12)), []).append(r)
    out = {}
    for k, rs in groups.items():
        gaps = [r["gap"] for r in rs]
        out[k] = {"gap": statistics.fmean(gaps), "std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                  "n": len(rs), "collapsed": sum(r["collapsed"] for r in rs),
                  "diverged": sum(r["diverged"] for r in rs),
                  "bad": sum(r["collapsed"] or r["diverged"] for r in rs),
                  "kept": statistics.fmean(r["kept_fraction"] for r in rs),
                  **{m: statistics.fmean(r["metrics"][m] for r in rs) for m in ("FA", "RA", "TA", "MIA")}}
    return out


def best_lr(cs: dict[tuple, dict], dataset: str, config: str, method: str) -> dict[str, Any] | None:
    """The learning rate with the lowest mean gap among cells with no collapsed or diverged seed."""
    ok = [(k[3], c) for k, c in cs.items() if k[:3] == (dataset, config, method) and not c["bad"]]
    if not ok:
        return None
    lr, c = min(ok, key=lambda t: (t[1]["gap"], t[0]))
    return {"lr": lr, **c}


def verdicts(cs: dict[tuple, dict], config: str, datasets, methods) -> dict[str, Any]:
    """Per (data set, method): masked best-lr gap against plain's; ``ok``: masked ≤ plain + plain's std."""
    out: dict[str, Any] = {"ok": 0, "wins_mnist1d": 0, "mean_gap": 0.0, "rows": []}
    gaps = []
    for ds in datasets:
        for m in methods:
            p, q = best_lr(cs, ds, "plain", m), best_lr(cs, ds, config, m)
            ok = p is not None and q is not None and q["gap"] <= p["gap"] + p["std"]
            win = p is not None and q is not None and q["gap"] < p["gap"]
            out["ok"] += ok
            out["wins_mnist1d"] += win and ds == "mnist1d"
            gaps.append(q["gap"] if q is not None else 100.0)
            out["rows"].append({"dataset": ds, "method": m, "plain": p, "masked": q, "ok": ok, "win": win})
    out["mean_gap"] = statistics.fmean(gaps)
    return out


def choose(cs: dict[tuple, dict], datasets, methods) -> dict[str, Any]:
    """The default (most acceptance passes, then most strict MNIST-1D wins, then lowest mean best-lr
    gap) and, per method, the configuration with the lowest best-lr gap averaged over the data sets."""
    configs = sorted({k[1] for k in cs} - {"plain", DEFAULT})
    scored = {c: verdicts(cs, c, datasets, methods) for c in configs}
    ranking = sorted(configs, key=lambda c: (-scored[c]["ok"], -scored[c]["wins_mnist1d"], scored[c]["mean_gap"]))
    per_method = {}
    for m in methods:
        def score(c: str) -> float:
            bs = [best_lr(cs, ds, c, m) for ds in datasets]
            return statistics.fmean(b["gap"] if b else 100.0 for b in bs)
        best = min(configs, key=score)
        per_method[m] = {"config": best, "options": CONFIGS.get(best),
                         "best_lr": {ds: (best_lr(cs, ds, best, m) or {}).get("lr") for ds in datasets},
                         "mean_best_gap": score(best)}
    return {"ranking": [{"config": c, "ok": scored[c]["ok"], "wins_mnist1d": scored[c]["wins_mnist1d"],
                         "mean_gap": scored[c]["mean_gap"]} for c in ranking],
            "default": ranking[0], "per_method": per_method}


def _fmt(c: dict | None) -> str:
    return "all collapsed" if c is None else f"{c['lr']:g}: {c['gap']:.2f} ± {c['std']:.2f}"


def best_table(cs: dict[tuple, dict], config: str, datasets, methods) -> str:
    v = verdicts(cs, config, datasets, methods)
    lines = [f"| data | method | plain (lr: gap) | {config} (lr: gap) | masked ≤ plain + std | kept |",
             "|---|---|---|---|---|---|"]
    for row in v["rows"]:
        q = row["masked"]
        mark = "**win**" if row["win"] else ("ok" if row["ok"] else "**loses**")
        kept = "" if q is None else f"{q['kept']:.1%}"
        lines.append(f"| {row['dataset']} | {row['method']} | {_fmt(row['plain'])} | {_fmt(q)} | {mark} | {kept} |")
    return "\n".join(lines)


def lr_table(cs: dict[tuple, dict], dataset: str, configs, methods) -> str:
    lines = ["| method | lr | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    lrs = sorted({k[3] for k in cs if k[0] == dataset})
    for m in methods:
        for lr in lrs:
            row = []
            for c in configs:
                cell = cs.get((dataset, c, m, lr))
                if cell is None:
                    row.append("")
                    continue
                mark = "‡" if cell["collapsed"] else ("†" if cell["diverged"] else "")
                row.append(f"{cell['gap']:.1f}{mark}")
            lines.append(f"| {m} | {lr:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def rounding_check(final: dict, out: Path, seeds, cache_dir, train_epochs, epochs) -> dict[str, Any]:
    """Each best-lr cell of the final stage (plain and default), rerun with 2 torch threads in one
    process: the same arithmetic in another summation order, as another CPU or thread count gives."""
    jobs = []
    for row in final["final"]["rows"]:
        for side, config in (("plain", "plain"), ("masked", DEFAULT)):
            if row[side] is not None:
                jobs += [(row["dataset"], config, row["method"], row[side]["lr"], s,
                          None if config == "plain" else {}, epochs) for s in seeds]
    base = {(r["dataset"], r["config"], r["method"], round(r["lr"], 12), r["seed"]): r
            for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines()) if r}
    again = _execute(jobs, out / "runs_threads2.jsonl", 1, seeds, cache_dir, train_epochs, threads=2)
    cells_moved = []
    for ds, config, method, lr in sorted({j[:4] for j in jobs}):
        a = [base[(ds, config, method, round(lr, 12), s)] for s in seeds]
        b = [r for r in again if (r["dataset"], r["config"], r["method"], r["lr"]) == (ds, config, method, lr)]
        ga, gb = statistics.fmean(r["gap"] for r in a), statistics.fmean(r["gap"] for r in b)
        cells_moved.append({"dataset": ds, "config": config, "method": method, "lr": lr, "gap_1thread": ga,
                            "gap_2threads": gb, "identical_runs": sum(x["metrics"] == y["metrics"] for x, y in zip(a, b)),
                            "bad_1thread": sum(r["collapsed"] or r["diverged"] for r in a),
                            "bad_2threads": sum(r["collapsed"] or r["diverged"] for r in b)})
    return {"cells": cells_moved, "runs": len(jobs)}


def rounding_table(rounding: dict[str, Any]) -> str:
    lines = ["| data | config | method | lr | gap, 1 thread | gap, 2 threads | runs identical | bad seeds 1 → 2 |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rounding["cells"]:
        lines.append(f"| {c['dataset']} | {c['config']} | {c['method']} | {c['lr']:g} | {c['gap_1thread']:.2f} | "
                     f"{c['gap_2threads']:.2f} | {c['identical_runs']} | {c['bad_1thread']} → {c['bad_2threads']} |")
    return "\n".join(lines)


def environment(threads: int = 1) -> dict[str, Any]:
    import torch

    import masked_optim

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "masked_optim": masked_optim.__version__, "threads_per_worker": threads}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("screen", "final", "all", "rounding", "report"), default="all",
                    help="rounding: rerun the final stage's best-lr cells with 2 torch threads in one process "
                         "(another summation order, as on another CPU) and report how much they move")
    ap.add_argument("--datasets", default="digits,mnist1d")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--configs", default=None, help="comma-separated names of CONFIGS (screen stage)")
    ap.add_argument("--lrs", default=",".join(map(str, LRS)))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help=f"results folder (default {OUT}; --quick: a temporary folder)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="digits, 2 methods, 2 lrs, 1 seed, 1 epoch, 3 configs")
    args = ap.parse_args(argv)
    datasets = tuple(args.datasets.split(","))
    methods = tuple(args.methods.split(","))
    lrs = tuple(float(x) for x in args.lrs.split(","))
    seeds = tuple(int(x) for x in args.seeds.split(","))
    configs = tuple(args.configs.split(",")) if args.configs else tuple(CONFIGS)
    epochs, train_epochs = None, None
    if args.quick:
        datasets, methods, lrs, seeds, epochs, train_epochs = ("digits",), ("NegGrad+", "RL"), (0.01, 0.1), (0,), 1, 3
        configs = ("plain", "strict/none", "lenient/count")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="defaults_study_")) if args.quick else OUT
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"environment": environment(), "datasets": {d: DATASETS[d] for d in datasets},
                              "methods": methods, "lrs": lrs, "seeds": seeds, "batch": BATCH, "configs": {}}
    wall = time.perf_counter()
    if args.stage in ("screen", "all"):
        jobs = [(ds, c, m, lr, s, CONFIGS[c], epochs) for ds in datasets for c in configs for m in methods
                for lr in lrs for s in seeds]
        runs = _execute(jobs, out / "runs.jsonl", args.workers, seeds, args.cache_dir, train_epochs)
        cs = cells(runs)
        pick = choose(cs, datasets, methods)
        result["screen"] = {"configs": {c: CONFIGS[c] for c in configs}, "choice": pick,
                            "cells": [{"dataset": k[0], "config": k[1], "method": k[2], "lr": k[3], **v}
                                      for k, v in cs.items()],
                            "wall_time_s": time.perf_counter() - wall}
        (out / "screen.json").write_text(json.dumps(result, indent=1))
        print(f"default: {pick['default']}  ranking: {pick['ranking'][:5]}", file=sys.stderr)
    if args.stage in ("final", "all"):
        t0 = time.perf_counter()
        jobs = [(ds, c, m, lr, s, None if c == "plain" else {}, epochs) for ds in datasets
                for c in ("plain", DEFAULT) for m in methods for lr in lrs for s in seeds]
        runs = _execute(jobs, out / "runs.jsonl", args.workers, seeds, args.cache_dir, train_epochs)
        cs = cells(runs)
        # both at three times each method's best plain learning rate
        triples = [(ds, m, round(3 * b["lr"], 12)) for ds in datasets for m in methods
                   if (b := best_lr(cs, ds, "plain", m)) is not None]
        extra = [(ds, c, m, lr3, s, None if c == "plain" else {}, epochs)
                 for ds, m, lr3 in triples for c in ("plain", DEFAULT) for s in seeds]
        cs3 = cells(_execute(extra, out / "runs.jsonl", args.workers, seeds, args.cache_dir, train_epochs))
        at3 = []
        for ds, m, lr3 in triples:
            p, q = cs3[(ds, "plain", m, lr3)], cs3[(ds, DEFAULT, m, lr3)]
            at3.append({"dataset": ds, "method": m, "lr": lr3, "plain_bad": p["bad"], "masked_bad": q["bad"],
                        "plain_gap": p["gap"], "masked_gap": q["gap"], "plain_RA": p["RA"], "masked_RA": q["RA"]})
        v = verdicts(cs, DEFAULT, datasets, methods)
        result["final"] = {"rows": v["rows"], "ok": v["ok"], "wins_mnist1d": v["wins_mnist1d"], "at_3x": at3,
                           "cells": [{"dataset": k[0], "config": k[1], "method": k[2], "lr": k[3], **c}
                                     for k, c in cs.items()],
                           "wall_time_s": time.perf_counter() - t0}
        (out / "final.json").write_text(json.dumps(result, indent=1))
    if args.stage == "report":
        print(report(out))
        return result
    if args.stage == "rounding":
        final = json.loads((out / "final.json").read_text())
        rounding = rounding_check(final, out, seeds, args.cache_dir, train_epochs, epochs)
        (out / "rounding.json").write_text(json.dumps({"environment": environment(threads=2), **rounding}, indent=1))
        print(report(out))
        return rounding
    text = report(out)
    print(text)
    return result


def plot(out: Path) -> Path | None:
    """``gap_vs_lr.png``: per data set and method, the gap to retrain against the learning rate for
    plain, the default mask and two screen configurations (no guard; the previous default), collapsed
    or diverged cells marked with x."""
    if not ((out / "screen.json").is_file() and (out / "final.json").is_file()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = {(c["dataset"], c["config"], c["method"], c["lr"]): c
          for name in ("screen", "final") for c in json.loads((out / f"{name}.json").read_text())[name]["cells"]}
    datasets = sorted({k[0] for k in cs})
    methods = [m for m in METHODS if any(k[2] == m for k in cs)]
    lines = [("plain", "plain", "k"), (DEFAULT, "default mask", "tab:red"),
             ("lenient/norm", "default without guard", "tab:orange"), ("strict/none", "previous default", "tab:blue")]
    fig, axes = plt.subplots(len(datasets), len(methods), figsize=(2.6 * len(methods), 2.4 * len(datasets)),
                             squeeze=False, sharey="row")
    for r, ds in enumerate(datasets):
        for c, m in enumerate(methods):
            ax = axes[r][c]
            for config, label, color in lines:
                pts = sorted((k[3], v) for k, v in cs.items() if k[:3] == (ds, config, m))
                if not pts:
                    continue
                ax.plot([lr for lr, _ in pts], [v["gap"] for _, v in pts], "-o", ms=3, color=color, label=label)
                bad = [(lr, v["gap"]) for lr, v in pts if v["bad"]]
                if bad:
                    ax.plot(*zip(*bad), "x", ms=8, color=color)
            ax.set_xscale("log")
            ax.set_title(f"{ds}: {m}", fontsize=9)
            if c == 0:
                ax.set_ylabel("Avg. Gap to retrain")
            if r == len(datasets) - 1:
                ax.set_xlabel("learning rate")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Gap to retrain vs learning rate (mean over seeds; x: a seed collapsed or diverged)", fontsize=10)
    fig.tight_layout()
    path = out / "gap_vs_lr.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(out: Path) -> str:
    """``tables.md`` from the stages' JSON files in ``out`` (those that exist); returns its text."""
    parts = {name: json.loads((out / f"{name}.json").read_text())
             for name in ("screen", "final", "rounding") if (out / f"{name}.json").is_file()}
    if not parts:
        return ""
    env = next(iter(parts.values()))["environment"]
    md = [f"# Defaults study\n\nMeasured on {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, one torch "
          "thread per worker process. Avg. Gap to retrain (lower is better), mean ± std over the seeds; best lr = the "
          "lowest mean gap among the learning rates where no seed collapsed (‡: retain accuracy within 10 points of the "
          "majority-class rate) or diverged (†). Rerun: `python benchmarks/defaults_study.py` (the stages resume from "
          "`runs.jsonl`).\n"]
    if "screen" in parts:
        sc = parts["screen"]
        datasets, methods = tuple(sc["datasets"]), tuple(sc["methods"])
        pick = sc["screen"]["choice"]
        cs = {(c["dataset"], c["config"], c["method"], c["lr"]): c for c in sc["screen"]["cells"]}
        md.append(f"## Screen: configurations ranked\n\nSeeds {sc['seeds']}, learning rates {sc['lrs']} for every "
                  f"method (runs resume from `runs.jsonl`; the last invocation took {sc['screen']['wall_time_s']:.0f} s). A pass: the configuration's best-lr gap ≤ "
                  "plain's best-lr gap + plain's seed std.\n\n| config | options | passes (of "
                  f"{len(datasets) * len(methods)}) | strict wins on MNIST-1D | mean best-lr gap |\n|---|---|---|---|---|")
        md += [f"| {r['config']} | `{sc['screen']['configs'][r['config']]}` | {r['ok']} | {r['wins_mnist1d']} | "
               f"{r['mean_gap']:.2f} |" for r in pick["ranking"]]
        md.append("\n## Recommended per method\n\n| method | config | best lr per data set | mean best-lr gap |\n"
                  "|---|---|---|---|")
        md += [f"| {m} | {p['config']} | {p['best_lr']} | {p['mean_best_gap']:.2f} |" for m, p in pick["per_method"].items()]
        for c in [r["config"] for r in pick["ranking"][:3]]:
            md.append(f"\n## Screen: {c} against plain, each method's best lr\n\n" + best_table(cs, c, datasets, methods))
        configs = list(sc["screen"]["configs"])
        for ds in datasets:
            md.append(f"\n## Screen, {ds}: gap per learning rate\n\n" + lr_table(cs, ds, configs, methods))
    if "final" in parts:
        fi = parts["final"]
        datasets, methods = tuple(fi["datasets"]), tuple(fi["methods"])
        cs = {(c["dataset"], c["config"], c["method"], c["lr"]): c for c in fi["final"]["cells"]}
        md.append("\n## Final: the optimizer constructed with no mask option against plain, each method's best lr\n\n"
                  + best_table(cs, DEFAULT, datasets, methods)
                  + "\n\nBoth sides were rerun for this stage after SGD's momentum buffer was made torch.optim's "
                  "bit for bit (buf·m, then + g, instead of one fused multiply-add): the screen's runs, plain "
                  "included, are from the code before that change and differ in the last bits, which the "
                  "unlearning dynamics amplify; the default's runs are the optimizer with no mask option.")
        md.append("\n## At three times each method's best plain learning rate\n\n| data | method | lr | plain gap "
                  "(RA) | default gap (RA) | plain collapsed/diverged seeds | default collapsed/diverged seeds |\n"
                  "|---|---|---|---|---|---|---|")
        md += [f"| {r['dataset']} | {r['method']} | {r['lr']:g} | {r['plain_gap']:.1f} ({r['plain_RA']:.0f}) | "
               f"{r['masked_gap']:.1f} ({r['masked_RA']:.0f}) | {r['plain_bad']} | {r['masked_bad']} |"
               for r in fi["final"]["at_3x"]]
        at3 = fi["final"]["at_3x"]
        md.append(f"\nPlain has a collapsed or diverged seed in {sum(r['plain_bad'] > 0 for r in at3)} of {len(at3)} "
                  f"cells, the default in {sum(r['masked_bad'] > 0 for r in at3)}; cells where plain has one and the "
                  f"default none: {sum(r['plain_bad'] > 0 and r['masked_bad'] == 0 for r in at3)}; the reverse: "
                  f"{sum(r['masked_bad'] > 0 and r['plain_bad'] == 0 for r in at3)}.")
    if "rounding" in parts:
        md.append("\n## How much cells move with the arithmetic's rounding\n\nThe final stage's best-lr cells rerun "
                  "with 2 torch threads in one process (another summation order, as another CPU gives):\n\n"
                  + rounding_table(parts["rounding"]))
    if plot(out) is not None:
        md.append("\n![gap to retrain vs learning rate](gap_vs_lr.png)")
    text = "\n".join(md) + "\n"
    (out / "tables.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
