"""A study: every method, masked and plain, at several learning rates and seeds, against retrain."""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from .data import load_dataset, make_split
from .methods import get_method
from .metrics import GAP_METRICS, avg_gap, evaluate
from .models import default_arch
from .runner import run_unlearning
from .training import ModelCache, default_train_config, reference_model

__all__ = ["DEFAULT_METHODS", "StudyConfig", "run_study", "summarise"]

DEFAULT_METHODS = ("RL", "NegGrad+", "GA", "FT", "SalUn", "l1-sparse", "SCRUB")
MASKS = ("plain", "masked")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study. The defaults are the digits study of ``masked-optim``.

    ``lrs=None`` runs each method at its own recipe learning rate; ``batch_size=None`` uses each
    method's recipe batch size (256 for most), except on ``digits`` where 64 is used because the
    whole training set is only 1437 images. ``epochs=None`` keeps each method's recipe.
    The first ``trace_seeds`` seeds record forget/retain accuracy at about ``trace_points``
    evenly spaced steps of each run, for the plots.
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
    confidence: float = 0.95
    split_seed: int = 0
    test_fraction: float = 0.2
    train_epochs: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    trace_points: int = 50
    trace_seeds: int = 1
    device: str = "cpu"

    def resolved(self) -> StudyConfig:
        """Fill the data-dependent defaults (model, batch size) and validate the choices."""
        bad = [m for m in self.masks if m not in MASKS]
        if bad or not self.masks:
            raise ValueError(f"masks must be among {MASKS}, got {self.masks}")
        for name in self.methods:
            get_method(name)
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        model = self.model or default_arch(self.dataset)
        batch = self.batch_size if self.batch_size is not None else (64 if self.dataset == "digits"
                                                                     else None)
        return replace(self, model=model, batch_size=batch)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, mask, lr)."""
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
        out.append(row)
    return out


def compare_masks(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, lr), the mean gap to retrain of the plain and the masked runs."""
    by_key = {(r["method"], r["lr"], r["mask"]): r for r in summary}
    rows = []
    for (method, lr, mask), r in by_key.items():
        if mask != "plain" or (method, lr, "masked") not in by_key:
            continue
        m = by_key[(method, lr, "masked")]
        rows.append({"method": method, "lr": lr, "gap_plain": r["gap"], "gap_masked": m["gap"],
                     "masked_better": m["gap"] < r["gap"]})
    return rows


def run_study(config: StudyConfig, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the original and retrained models for every seed, run every method with
    and without the mask at every learning rate, and return a JSON-serialisable result."""
    cfg = config.resolved()
    assert cfg.model is not None
    wall = time.perf_counter()
    device = torch.device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root, split_seed=cfg.split_seed,
                        test_fraction=cfg.test_fraction)
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
            for lr in (cfg.lrs if cfg.lrs is not None else (None,))
            for mask in cfg.masks
            for seed in cfg.seeds]
    runs: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="unlearning runs", disable=not progress, unit="run")
    for name, lr, mask, seed in bar:
        method = get_method(name, epochs=cfg.epochs, batch_size=cfg.batch_size)
        lr_used = method.lr if lr is None else lr
        bar.set_postfix_str(f"{method.name} {mask} lr={lr_used:g} seed={seed}")
        model = copy.deepcopy(originals[seed])
        traced = seed in cfg.seeds[:cfg.trace_seeds]
        res = run_unlearning(
            model, method, split, masked=mask == "masked", lr=lr_used, optimizer=cfg.optimizer,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, confidence=cfg.confidence,
            seed=seed, trace_points=cfg.trace_points if traced else 0)
        assert res.metrics is not None
        runs.append({
            "method": method.name, "mask": mask, "lr": lr_used, "seed": seed,
            "hyperparameters": method.hyperparameters(), "steps": res.steps,
            "metrics": res.metrics.as_dict(), "gap": avg_gap(res.metrics, retrain_metrics[seed]),
            "runtime_s": res.runtime_s, "kept_fraction": res.kept_fraction,
            "skipped_steps": res.skipped_steps, "diverged": res.diverged,
            "trace": res.trace if traced else None, "kept": res.kept if traced else None,
        })
    bar.close()
    summary = summarise(runs)
    return {
        "config": asdict(cfg),
        "train_config": asdict(train_cfg),
        "environment": {
            "masked_optim": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "data": {"dataset": data.name, "forget": str(split.spec), "n_train": len(data.train),
                 "n_forget": len(split.forget_idx), "n_retain": len(split.retain_idx),
                 "n_test": len(split.test_idx), "n_classes": data.num_classes},
        "reference": reference,
        "runs": runs,
        "summary": summary,
        "comparison": compare_masks(summary),
        "wall_time_s": time.perf_counter() - wall,
    }
