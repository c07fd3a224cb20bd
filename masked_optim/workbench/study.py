"""A study: every method, masked and plain, at several learning rates and seeds, against retrain."""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from .data import load_dataset, make_split
from .methods import get_method
from .metrics import GAP_METRICS, avg_gap, evaluate, majority_rate
from .models import default_arch
from .runner import make_optimizer, run_unlearning
from .training import ModelCache, default_train_config, reference_model

__all__ = ["DEFAULT_FORGET", "DEFAULT_METHODS", "MAIN_JOB_LRS", "RECOMMENDED_MASK", "StudyConfig", "best_lr_table",
           "compare_masks", "cpu_model", "default_forget", "run_study", "summarise"]

DEFAULT_METHODS = ("RL", "NegGrad+", "GA", "FT", "SalUn", "l1-sparse", "SCRUB")
MASKS = ("plain", "masked")

#: The forget set of a data set's study when none is named (``masked-optim`` without
#: ``--forget``): a whole class of digits; a random 10 % of MNIST-1D, whose MLP memorises its
#: training set, so that forgetting random samples is measurable. Any other data set:
#: ``random:0.1`` (:func:`default_forget`).
DEFAULT_FORGET: dict[str, str] = {"digits": "class:3", "mnist1d": "random:0.1"}

#: Learning rates of the main job (``masked-optim`` without ``--lrs``), per data set and method:
#: the best learning rate of the plain method and of the default mask in the defaults study
#: (``benchmarks/results/defaults_study/final.json``, grid 0.0003 … 0.3), so that the main job's
#: best-lr comparison reruns the study's best cells in a few minutes. A data set not listed runs
#: :attr:`StudyConfig.lrs`.
MAIN_JOB_LRS: dict[str, dict[str, tuple[float, ...]]] = {
    "digits": {"RL": (0.003, 0.1), "NegGrad+": (0.01,), "GA": (0.01, 0.1), "FT": (0.1, 0.3),
              "SalUn": (0.003, 0.3), "l1-sparse": (0.03, 0.1), "SCRUB": (0.01,)},
    "mnist1d": {"RL": (0.01, 0.1), "NegGrad+": (0.1,), "GA": (0.01, 0.1), "FT": (0.1, 0.3),
               "SalUn": (0.01, 0.1), "l1-sparse": (0.03, 0.1), "SCRUB": (0.01, 0.03)},
}


#: Per method, the mask configuration with the lowest best-learning-rate gap to retrain averaged
#: over digits (class:3) and MNIST-1D (random:0.1) in ``benchmarks/defaults_study.py``'s screen, and
#: that configuration's best learning rate on each (SGD, momentum 0.9, weight decay 5e-4).
#: ``masked-optim methods`` shows them; the package default is the configuration that did best over
#: all methods (``{}``: ``confidence`` 0.95 forget / 0.05 retain, ``rescale="norm"``,
#: ``retain_guard=0.05``).
RECOMMENDED_MASK: dict[str, dict[str, Any]] = {
    "RL": {"options": {"confidence": 0.95, "retain_confidence": 0.05, "retain_guard": None, "rescale": "count",
                       "max_scale": 10.0}, "lr": {"digits": 0.001, "mnist1d": 0.03}},
    "NegGrad+": {"options": {}, "lr": {"digits": 0.01, "mnist1d": 0.1}},
    "GA": {"options": {}, "lr": {"digits": 0.1, "mnist1d": 0.1}},
    "FT": {"options": {"confidence": 0.95, "retain_confidence": 0.05, "retain_guard": 0.01, "rescale": "norm"},
           "lr": {"digits": 0.1, "mnist1d": 0.1}},
    "SalUn": {"options": {"confidence": 0.95, "retain_confidence": 0.05, "retain_guard": None, "rescale": "count",
                          "max_scale": 10.0}, "lr": {"digits": 0.0003, "mnist1d": 0.03}},
    "l1-sparse": {"options": {"confidence": 0.5, "rescale": "count", "retain_guard": None},
                  "lr": {"digits": 0.01, "mnist1d": 0.03}},
    "SCRUB": {"options": {}, "lr": {"digits": 0.01, "mnist1d": 0.03}},
}


def default_forget(dataset: str) -> str:
    """The forget spec of ``dataset``'s study when none is named (:data:`DEFAULT_FORGET`)."""
    return DEFAULT_FORGET.get(dataset, "random:0.1")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study of one data set. (``masked-optim`` without options runs
    two: digits and MNIST-1D, with :data:`MAIN_JOB_LRS` as ``method_lrs``, seeds 0, 1, 2 and 2
    workers; see :mod:`masked_optim.cli`.)

    ``lrs=None`` runs each method at its own recipe learning rate; ``batch_size=None`` uses each
    method's recipe batch size (256 for most), except on ``digits`` (64, the whole training set is
    only 1437 images) and ``mnist1d`` (128, of 4000). ``epochs=None`` keeps each method's recipe.
    ``method_lrs`` gives some methods their own learning rates, replacing ``lrs`` for them, as
    ``(method, lrs)`` pairs, e.g. ``(("RL", (0.003, 0.03)),)`` (a mapping is accepted and turned
    into pairs; a single number is one learning rate); entries of methods the study does not run
    are dropped by :meth:`resolved`.
    The first ``trace_seeds`` seeds record forget/retain accuracy at about ``trace_points``
    evenly spaced steps of each run, for the plots.

    ``mask_options`` are the keyword arguments of the masked runs' optimizer as ``(name, value)``
    pairs, e.g. ``(("confidence", 0.9), ("rescale", None))`` (a mapping is accepted and turned
    into pairs); empty means the optimizer's own defaults. The plain runs take none.

    ``workers > 1`` runs the unlearning runs in that many processes (spawned; each with one torch
    thread on the CPU), with the same results as ``workers=1`` at one thread: every run seeds
    itself. A script that calls :func:`run_study` with workers needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing.
    """

    dataset: str = "digits"
    data_root: str | None = None
    forget: str = "class:3"
    model: str | None = None
    norm: str = "batch"
    methods: tuple[str, ...] = DEFAULT_METHODS
    masks: tuple[str, ...] = MASKS
    lrs: tuple[float, ...] | None = (0.003, 0.01, 0.03, 0.1)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mask_options: tuple[tuple[str, Any], ...] = ()
    split_seed: int = 0
    test_fraction: float = 0.2
    train_epochs: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    trace_points: int = 50
    trace_seeds: int = 1
    device: str = "cpu"
    method_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()
    workers: int = 1

    def __post_init__(self) -> None:
        items = self.mask_options.items() if isinstance(self.mask_options, Mapping) else self.mask_options
        pairs = tuple((str(k), v) for k, v in items)
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"mask option given twice: {names}")
        object.__setattr__(self, "mask_options", pairs)
        items = self.method_lrs.items() if isinstance(self.method_lrs, Mapping) else self.method_lrs
        lr_pairs = tuple((str(k), (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v))
                         for k, v in items)
        object.__setattr__(self, "method_lrs", lr_pairs)

    def lrs_of(self, method: str) -> tuple[float | None, ...]:
        """The learning rates ``method`` runs at: its ``method_lrs`` entry, else ``lrs``; ``None``
        stands for the method's recipe learning rate."""
        name = get_method(method).name
        for key, lrs in self.method_lrs:
            if get_method(key).name == name:
                return lrs
        return self.lrs if self.lrs is not None else (None,)

    def resolved(self) -> StudyConfig:
        """Fill the data-dependent defaults (model, batch size) and validate the choices."""
        bad = [m for m in self.masks if m not in MASKS]
        if bad or not self.masks:
            raise ValueError(f"masks must be among {MASKS}, got {self.masks}")
        for name in self.methods:
            get_method(name)
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        _check_mask_options(self.optimizer, self.mask_options)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        running = {get_method(m).name for m in self.methods}
        seen: set[str] = set()
        method_lrs = []
        for key, lrs in self.method_lrs:
            name = get_method(key).name  # unknown names fail here
            if name in seen:
                raise ValueError(f"learning rates of {name} given twice in method_lrs")
            seen.add(name)
            if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
                raise ValueError(f"method_lrs of {name} must be positive learning rates, got {lrs}")
            if name in running:
                method_lrs.append((name, lrs))
        model = self.model or default_arch(self.dataset)
        batch = (self.batch_size if self.batch_size is not None
                 else {"digits": 64, "mnist1d": 128}.get(self.dataset))
        return replace(self, model=model, batch_size=batch, method_lrs=tuple(method_lrs))


def _check_mask_options(optimizer: str, options: tuple[tuple[str, Any], ...]) -> None:
    # Build the masked optimizer once on a one-weight model, so that a misspelt or invalid option
    # fails here and not after the reference models have been trained.
    try:
        make_optimizer(torch.nn.Linear(1, 1), optimizer, lr=0.1, masked=True, mask_options=dict(options))
    except TypeError as err:
        raise ValueError(f"invalid mask option for the {optimizer} optimizer: {err}") from err


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, mask, lr); ``diverged`` and
    ``collapsed`` count the seeds with that flag (a run without ``collapsed`` counts as not)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["mask"], r["lr"]), []).append(r)
    out = []
    for (method, mask, lr), rs in groups.items():
        row: dict[str, Any] = {"method": method, "mask": mask, "lr": lr, "n": len(rs)}
        for k in (*GAP_METRICS, "UA"):
            row[k], row[k + "_std"] = _mean_std([r["metrics"][k] for r in rs])
        row["gap"], row["gap_std"] = _mean_std([r["gap"] for r in rs])
        row["runtime_s"], _ = _mean_std([r["runtime_s"] for r in rs])
        row["kept_fraction"], _ = _mean_std([r["kept_fraction"] for r in rs])
        row["diverged"] = sum(bool(r["diverged"]) for r in rs)
        row["collapsed"] = sum(bool(r.get("collapsed", False)) for r in rs)
        out.append(row)
    return out


def _clean(row: Mapping[str, Any]) -> bool:
    # no seed of the cell diverged or collapsed
    return not row.get("diverged", 0) and not row.get("collapsed", 0)


def compare_masks(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, lr), the mean gap to retrain of the plain and the masked runs. ``clean``: no
    seed of either cell diverged or collapsed (otherwise ``masked_better`` may mislead)."""
    by_key = {(r["method"], r["lr"], r["mask"]): r for r in summary}
    rows = []
    for (method, lr, mask), r in by_key.items():
        if mask != "plain" or (method, lr, "masked") not in by_key:
            continue
        m = by_key[(method, lr, "masked")]
        rows.append({"method": method, "lr": lr, "gap_plain": r["gap"], "gap_masked": m["gap"],
                     "masked_better": m["gap"] < r["gap"], "clean": _clean(r) and _clean(m)})
    return rows


def best_lr_table(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's best learning rate, plain and masked (docs/design.md §6: compare at each method's
    best learning rate).

    One row per method (in the order of ``summary``): ``{"method", "plain", "masked",
    "masked_better"}``. ``row[mask]`` is ``None`` when the study did not run that mask, else
    ``{"lr", "gap", "gap_std", "n", "excluded"}``: the learning rate with the lowest mean gap
    over seeds among the cells where no seed diverged or collapsed (ties: the smaller lr), and
    the learning rates left out for a bad seed. When every learning rate has one, ``lr``,
    ``gap`` and ``gap_std`` are ``None`` and ``reason`` says ``"all collapsed"``, ``"all
    diverged"`` or ``"all diverged or collapsed"``. ``masked_better``: the masked best gap is
    smaller than the plain one; ``None`` unless both exist.
    """
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in summary:
        cells.setdefault(r["method"], {}).setdefault(r["mask"], []).append(r)
    table = []
    for method, by_mask in cells.items():
        row: dict[str, Any] = {"method": method}
        for mask in MASKS:
            rows = by_mask.get(mask)
            if not rows:
                row[mask] = None
                continue
            good = [r for r in rows if _clean(r)]
            excluded = sorted(r["lr"] for r in rows if not _clean(r))
            if good:
                best = min(good, key=lambda r: (math.isnan(r["gap"]), r["gap"], r["lr"]))
                row[mask] = {"lr": best["lr"], "gap": best["gap"], "gap_std": best["gap_std"],
                             "n": best["n"], "excluded": excluded}
            else:
                div = any(r.get("diverged", 0) for r in rows)
                col = any(r.get("collapsed", 0) for r in rows)
                reason = ("all diverged or collapsed" if div and col
                          else "all diverged" if div else "all collapsed")
                row[mask] = {"lr": None, "gap": None, "gap_std": None, "n": 0,
                             "excluded": excluded, "reason": reason}
        p, m = row["plain"], row["masked"]
        row["masked_better"] = (m["gap"] < p["gap"] if p is not None and m is not None
                                and p["gap"] is not None and m["gap"] is not None else None)
        table.append(row)
    return table


def cpu_model() -> str:
    """The CPU's model name: the "model name" line of /proc/cpuinfo on Linux, else
    :func:`platform.processor`, else ``"unknown CPU"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _unlearning_run(cfg: StudyConfig, split: Any, original: torch.nn.Module, retrain_metrics: Any,
                    name: str, lr: float | None, mask: str, seed: int) -> dict[str, Any]:
    # One run of the study, as recorded in result["runs"]; the same in the main process and in a
    # worker (run_unlearning seeds its batches and the module randomness from ``seed``).
    method = get_method(name, epochs=cfg.epochs, batch_size=cfg.batch_size)
    lr_used = method.lr if lr is None else lr
    model = copy.deepcopy(original).to(cfg.device)
    traced = seed in cfg.seeds[:cfg.trace_seeds]
    res = run_unlearning(
        model, method, split, masked=mask == "masked", lr=lr_used, optimizer=cfg.optimizer,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        mask_options=dict(cfg.mask_options), seed=seed,
        trace_points=cfg.trace_points if traced else 0)
    assert res.metrics is not None
    return {
        "method": method.name, "mask": mask, "lr": lr_used, "seed": seed,
        "hyperparameters": method.hyperparameters(), "steps": res.steps,
        "metrics": res.metrics.as_dict(), "gap": avg_gap(res.metrics, retrain_metrics),
        "runtime_s": res.runtime_s, "kept_fraction": res.kept_fraction,
        "skipped_steps": res.skipped_steps, "diverged": res.diverged,
        "collapsed": res.collapsed, "certificates": res.certificates,
        "trace": res.trace if traced else None, "kept": res.kept if traced else None,
    }


# What a worker process of run_study holds: set once by _init_worker, read by _worker_run.
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: StudyConfig, split: Any, originals: dict[int, torch.nn.Module],
                 retrain_metrics: dict[int, Any]) -> None:
    if torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, split=split, originals=originals, retrain=retrain_metrics)


def _worker_run(job: tuple[str, float | None, str, int]) -> dict[str, Any]:
    w = _WORKER
    seed = job[3]
    return _unlearning_run(w["cfg"], w["split"], w["originals"][seed], w["retrain"][seed], *job)


def _label(job: tuple[str, float | None, str, int]) -> str:
    name, lr, mask, seed = job
    return f"{name} {mask} lr={'recipe' if lr is None else f'{lr:g}'} seed={seed}"


def _run_parallel(cfg: StudyConfig, jobs: list[tuple[str, float | None, str, int]], split: Any,
                  originals: dict[int, torch.nn.Module], retrain_metrics: dict[int, Any],
                  workers: int, bar: Any) -> list[dict[str, Any]]:
    # The split and the original models travel once per worker (initializer); each job is a
    # tuple of four. Results come back in the order of ``jobs`` whatever order they finish in.
    cpu_models = {seed: copy.deepcopy(m).cpu() for seed, m in originals.items()}
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(cfg, split, cpu_models, retrain_metrics))
    try:
        pending = {pool.submit(_worker_run, job): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                results[i] = fut.result()
                bar.set_postfix_str(_label(jobs[i]), refresh=False)
                bar.update()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [r for r in results if r is not None]


def run_study(config: StudyConfig, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the original and retrained models for every seed, run every method with
    and without the mask at every learning rate (``lrs``, or its ``method_lrs``), and return a
    JSON-serialisable result. With ``workers > 1`` the unlearning runs go to worker processes;
    ``runs`` keeps the sequential order."""
    cfg = config.resolved()
    assert cfg.model is not None
    wall = time.perf_counter()
    device = torch.device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root, split_seed=cfg.split_seed,
                        test_fraction=cfg.test_fraction, cache_dir=cfg.cache_dir)
    split = make_split(data, cfg.forget, seed=cfg.split_seed)
    train_cfg = default_train_config(data.name)
    if cfg.train_epochs is not None:
        train_cfg = replace(train_cfg, epochs=cfg.train_epochs)
    cache = ModelCache(cfg.cache_dir, enabled=cfg.use_cache)
    log(f"{data.name}: {len(split.retain_idx)} retain, {len(split.forget_idx)} forget "
        f"({split.spec}), {len(split.test_idx)} test; model {cfg.model}; cache {cache.root}")

    reference: dict[str, list[dict[str, Any]]] = {"original": [], "retrain": []}
    originals, retrain_metrics = {}, {}
    for seed in cfg.seeds:
        for kind in ("original", "retrain"):
            model, rec = reference_model(kind, split, cfg.model, norm=cfg.norm, config=train_cfg,
                                         seed=seed, cache=cache, device=device, progress=progress)
            metrics = evaluate(model, split)
            if kind == "original":
                originals[seed] = model
            else:
                retrain_metrics[seed] = metrics
            reference[kind].append({"seed": seed, "metrics": metrics.as_dict(),
                                    "train_seconds": rec["seconds"], "cached": rec["cached"],
                                    "cache_key": rec["key"]})
    for rec in reference["original"]:
        rec["gap"] = avg_gap(rec["metrics"], retrain_metrics[rec["seed"]])
    for rec in reference["retrain"]:
        rec["gap"] = 0.0

    jobs = [(name, lr, mask, seed)
            for name in cfg.methods
            for lr in cfg.lrs_of(name)
            for mask in cfg.masks
            for seed in cfg.seeds]
    workers = min(cfg.workers, len(jobs))
    bar = tqdm(total=len(jobs), desc="unlearning runs", disable=not progress, unit="run")
    if workers > 1:
        runs = _run_parallel(cfg, jobs, split, originals, retrain_metrics, workers, bar)
    else:
        runs = []
        for job in jobs:
            bar.set_postfix_str(_label(job))
            seed = job[3]
            runs.append(_unlearning_run(cfg, split, originals[seed], retrain_metrics[seed], *job))
            bar.update()
    bar.close()
    summary = summarise(runs)
    parallel = workers > 1
    return {
        "config": asdict(cfg),
        "train_config": asdict(train_cfg),
        "environment": {
            "masked_optim": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "workers": workers,
            "worker_threads": (1 if device.type == "cpu" else None) if parallel else None,
            "cpu_count": os.cpu_count(), "cpu": cpu_model(),
        },
        "data": {"dataset": data.name, "forget": str(split.spec), "n_train": len(data.train),
                 "n_forget": len(split.forget_idx), "n_retain": len(split.retain_idx),
                 "n_test": len(split.test_idx), "n_classes": data.num_classes,
                 "retain_majority_rate": majority_rate(data.train.y[split.retain_idx])},
        "reference": reference,
        "runs": runs,
        "summary": summary,
        "best_lr": best_lr_table(summary),
        "comparison": compare_masks(summary),
        "wall_time_s": time.perf_counter() - wall,
    }
