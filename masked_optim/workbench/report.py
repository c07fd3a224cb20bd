"""The results folder of a study: ``results.md``, ``results.json`` and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["combined_report", "markdown_report", "plot_gap_vs_lr", "plot_trajectories", "write_combined",
           "write_results"]


def _pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _reference_row(name: str, recs: list[dict[str, Any]]) -> str:
    def ms(key: str) -> tuple[float, float]:
        vals = [r["metrics"][key] if key in r["metrics"] else r[key] for r in recs]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return mean, std
    cells = [_pm(*ms(k)) for k in ("FA", "UA", "RA", "TA", "MIA")]
    return f"| {name} | " + " | ".join(cells) + f" | {_pm(*ms('gap'), digits=2)} |"


def _pairs(options: Any) -> list[tuple[str, Any]]:
    # config["mask_options"]: pairs (a tuple of tuples, or lists of two after JSON), or a mapping
    return [tuple(p) for p in (options.items() if isinstance(options, dict) else options or ())]


def _mask_options_text(options: Any) -> str:
    pairs = _pairs(options)  # empty = the optimizer's defaults
    return ", ".join(f"{k}={v!r}" for k, v in pairs) if pairs else "defaults"


def _marks(row: dict[str, Any]) -> str:
    return (" †" if row.get("diverged") else "") + (" ‡" if row.get("collapsed") else "")


def _best_cell(entry: dict[str, Any] | None, bold: bool) -> str:
    if entry is None:
        return "not run"
    if entry["lr"] is None:
        return entry.get("reason", "all diverged or collapsed")
    text = f"{entry['lr']:g}: {_pm(entry['gap'], entry['gap_std'], 2)}"
    return f"**{text}**" if bold else text


def _best_lr_section(result: dict[str, Any]) -> list[str]:
    from .study import best_lr_table

    data = result["data"]
    table = result.get("best_lr")
    if table is None:  # results written before the table existed
        table = best_lr_table(result["summary"])
    lines = [
        f"## Best learning rate per method: {data['dataset']}, forget `{data['forget']}`",
        "",
        "Each method at the learning rate with its lowest mean Avg. Gap to retrain (lower is "
        "better), over the learning rates at which no seed diverged or collapsed; cells read "
        "`lr: gap mean ± std`, the better of plain and masked in bold.",
        "",
    ]
    if not table:
        return lines
    compared = [r for r in table if r["masked_better"] is not None]
    if compared:
        n_better = sum(bool(r["masked_better"]) for r in compared)
        lines += [f"Masked is better at its best learning rate for {n_better} of {len(compared)} "
                  "methods.", ""]
    lines += ["| method | plain | masked |", "|---|---|---|"]
    for r in table:
        better = r["masked_better"]
        plain = _best_cell(r["plain"], better is False)
        masked = _best_cell(r["masked"], better is True)
        lines.append(f"| {r['method']} | {plain} | {masked} |")
    excluded = [f"{r['method']} {mask} at lr {', '.join(f'{lr:g}' for lr in r[mask]['excluded'])}"
                for r in table for mask in ("plain", "masked")
                if r[mask] is not None and r[mask]["excluded"]]
    if excluded:
        lines += ["", "Left out for a diverged or collapsed seed: " + "; ".join(excluded) + "."]
    lines.append("")
    return lines


def _lrs_text(summary: list[dict[str, Any]]) -> str:
    # The learning rates each method ran at: one list when every method ran the same ones.
    per_method: dict[str, set[float]] = {}
    for r in summary:
        per_method.setdefault(r["method"], set()).add(r["lr"])
    if not per_method:
        return ""
    lists = {m: ", ".join(f"{lr:g}" for lr in sorted(lrs)) for m, lrs in per_method.items()}
    if len(set(lists.values())) == 1:
        return f"Learning rates {next(iter(lists.values()))} for every method."
    return "Learning rates per method: " + "; ".join(f"{m} {t}" for m, t in lists.items()) + "."


def _threads_text(env: dict[str, Any]) -> str:
    workers = env.get("workers") or 1
    if workers > 1:
        per = env.get("worker_threads")
        return (f"{workers} worker processes" + (f" of {per} thread{'s' if per != 1 else ''} each"
                                                 if per else ""))
    return f"{env['torch_threads']} threads"


def markdown_report(result: dict[str, Any], level: int = 1) -> str:
    """The study as Markdown: set-up, each method's best-learning-rate gap (plain versus
    masked, the first table), reference models, the gap at every learning rate, the full table
    and notes. ``level`` is the level of the title heading (2 to nest the report in another)."""
    cfg, data, env = result["config"], result["data"], result["environment"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    opt_name = {"sgd": "ProbablyAlignedSGD", "adam": "ProbablyAlignedAdam"}.get(cfg["optimizer"],
                                                                              cfg["optimizer"])
    base = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam"}.get(cfg["optimizer"], "torch.optim")
    cpu = env.get("cpu") or "an unrecorded CPU"
    device = "" if env.get("device", "cpu") == "cpu" else f", device {env['device']}"
    majority = data.get("retain_majority_rate")
    collapse_rule = (f"retain accuracy ≤ {majority:.1f} % (the majority-class share of the retain "
                     f"set) + 10 points" if majority is not None else
                     "retain accuracy within 10 points of the majority-class share of the retain set")
    lines = [
        f"# Unlearning study: {data['dataset']}, forget `{data['forget']}`",
        "",
        f"Model `{cfg['model']}`; {data['n_retain']} retain, {data['n_forget']} forget, "
        f"{data['n_test']} test samples. Optimizer {cfg['optimizer'].upper()} (momentum "
        f"{cfg['momentum']:g}, weight decay {cfg['weight_decay']:g}); *masked* = "
        f"{opt_name}({_mask_options_text(cfg.get('mask_options'))}), *plain* = the same optimizer "
        f"with `confidence=None, forget_confidence=None, retain_confidence=None` ({base}). "
        f"Seeds {seeds}; mean ± std over seeds. {_lrs_text(result['summary'])} "
        f"Wall time {result['wall_time_s']:.0f} s, "
        f"measured on {cpu}, torch {env['torch']}, {_threads_text(env)}{device}."
        + (" Whole-update test (`certify`): each masked step is checked on an independent retain "
           "batch of the step's size, disjoint from the step's retain batch."
           if any(k == "certify" and v is not None for k, v in _pairs(cfg.get("mask_options")))
           else ""),
        "",
        *_best_lr_section(result),
        "## Reference models",
        "",
        "| model | FA | UA | RA | TA | MIA | Avg. Gap |",
        "|---|---|---|---|---|---|---|",
        _reference_row("Original", result["reference"]["original"]),
        _reference_row("Retrain", result["reference"]["retrain"]),
        "",
        "## Avg. Gap to retrain at every learning rate (lower is better)",
        "",
    ]
    comparison = result["comparison"]
    if comparison:
        clean = [c for c in comparison if c.get("clean", True)]
        n_better = sum(c["masked_better"] for c in clean)
        left = len(comparison) - len(clean)
        lines += [
            f"Masked has the smaller mean gap in {n_better} of {len(clean)} (method, learning "
            f"rate) cells where no seed diverged or collapsed"
            + (f" ({left} {'cell' if left == 1 else 'cells'} with such a seed not counted)."
               if left else "."),
            "",
            "| method | lr | plain | masked |",
            "|---|---|---|---|",
        ]
        by_key = {(r["method"], r["mask"], r["lr"]): r for r in result["summary"]}
        for c in comparison:
            p, m = by_key[(c["method"], "plain", c["lr"])], by_key[(c["method"], "masked", c["lr"])]
            cells = []
            for row, better in ((p, not c["masked_better"]), (m, c["masked_better"])):
                text = _pm(row["gap"], row["gap_std"], 2)
                cells.append((f"**{text}**" if better and c.get("clean", True) else text) + _marks(row))
            lines.append(f"| {c['method']} | {c['lr']:g} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += [
        "## All metrics",
        "",
        "| method | mask | lr | FA | UA | RA | TA | MIA | Avg. Gap | kept | runtime (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        cells = [_pm(r[k], r[k + "_std"]) for k in ("FA", "UA", "RA", "TA", "MIA")]
        gap = _pm(r["gap"], r["gap_std"], 2) + _marks(r)
        lines.append(f"| {r['method']} | {r['mask']} | {r['lr']:g} | " + " | ".join(cells)
                     + f" | {gap} | {r['kept_fraction']:.4f} | {r['runtime_s']:.2f} |")
    lines += [
        "",
        "FA/RA/TA: accuracy (%) on the forget, retain and test sets; UA = 100 − FA. "
        "MIA: MIA-efficacy (%), SalUn's recipe — an SVC on the true-label confidence, fit on the "
        "first N retain samples (members) versus the test set (non-members), N = test-set size; "
        "the share of forget samples it calls non-members (higher = more forgotten). "
        "Avg. Gap: mean |metric − retrain metric| over FA, RA, TA and MIA, paired by seed. "
        "kept: mean fraction of coordinates the mask kept per step (1 for plain). "
        "runtime: unlearning only, without evaluation. † = at least one seed diverged "
        "(non-finite weights or outputs; a non-finite output counts as a wrong prediction with true-label "
        f"confidence 0). ‡ = at least one seed collapsed ({collapse_rule}): the model predicts "
        "near chance, its MIA lands near 0 or 100 and its gap can look deceptively good. "
        "A cell marked † or ‡ is never a method's best learning rate.",
    ]
    if data["forget"].startswith("class"):
        lines += ["", "Class-wise forgetting: the forgotten classes are removed from the test set "
                      "(TA and the MIA non-members), as SalUn does."]
    if level > 1:
        lines = [("#" * (level - 1) + line) if line.startswith("#") else line for line in lines]
    return "\n".join(lines) + "\n"


def combined_report(results: dict[str, dict[str, Any]], wall_time_s: float | None = None) -> str:
    """The studies of several data sets (name -> result of
    :func:`~masked_optim.workbench.study.run_study`) as one Markdown document: a title, one line
    per data set with the count of methods where masked wins at its best learning rate, then each
    study's report one heading level down (its first table: the best-learning-rate comparison)."""
    from .study import best_lr_table

    titles = [f"{name} (forget `{r['data']['forget']}`)" for name, r in results.items()]
    lines = [f"# Unlearning studies: {', '.join(titles)}", ""]
    if wall_time_s is not None:
        lines += [f"{len(results)} {'study' if len(results) == 1 else 'studies'} in "
                  f"{wall_time_s:.0f} s. Each data set's folder holds its results.md, results.json "
                  "and plots.", ""]
    for name, r in results.items():
        table = r.get("best_lr") or best_lr_table(r["summary"])
        compared = [row for row in table if row["masked_better"] is not None]
        n_better = sum(bool(row["masked_better"]) for row in compared)
        lines.append(f"- {name}, forget `{r['data']['forget']}`: masked is better at its best "
                     f"learning rate for {n_better} of {len(compared)} methods.")
    lines.append("")
    text = "\n".join(lines) + "\n"
    return text + "\n".join(markdown_report(r, level=2) for r in results.values())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_gap_vs_lr(result: dict[str, Any], path: str | Path) -> Path:
    """Avg. Gap against the learning rate, masked versus plain, one panel per method."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in result["summary"]))
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    orig = [r["gap"] for r in result["reference"]["original"]]
    for ax, method in zip(axes.flat, methods):
        for mask, style in (("plain", dict(color="tab:orange", ls="--", marker="o")),
                            ("masked", dict(color="tab:blue", ls="-", marker="s"))):
            rows = sorted((r for r in result["summary"]
                           if r["method"] == method and r["mask"] == mask), key=lambda r: r["lr"])
            if rows:
                ax.errorbar([r["lr"] for r in rows], [r["gap"] for r in rows],
                            yerr=[r["gap_std"] for r in rows], label=mask, capsize=2, **style)
        ax.axhline(sum(orig) / len(orig), color="grey", ls=":", label="original")
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("Avg. Gap to retrain")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{result['data']['dataset']}, forget {result['data']['forget']}: "
                 f"gap to retrain (lower is better)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(result: dict[str, Any], path: str | Path) -> Path | None:
    """Forget and retain accuracy per step (masked solid, plain dashed) with the mask's kept
    fraction (grey, right axis), one panel per method and learning rate, first traced seed."""
    traced = [r for r in result["runs"] if r.get("trace")]
    if not traced:
        return None
    plt = _pyplot()
    seed = traced[0]["seed"]
    traced = [r for r in traced if r["seed"] == seed]
    methods = list(dict.fromkeys(r["method"] for r in traced))
    # each method's row holds its own learning rates (they may differ per method)
    method_lrs = {m: sorted({r["lr"] for r in traced if r["method"] == m}) for m in methods}
    ncols = max(len(v) for v in method_lrs.values())
    fig, axes = plt.subplots(len(methods), ncols, figsize=(2.8 * ncols, 2.2 * len(methods)),
                             squeeze=False, sharey=True)
    for i, method in enumerate(methods):
        for j in range(len(method_lrs[method]), ncols):
            axes[i, j].axis("off")
        for j, lr in enumerate(method_lrs[method]):
            ax = axes[i, j]
            for r in traced:
                if r["method"] != method or r["lr"] != lr:
                    continue
                ls = "-" if r["mask"] == "masked" else "--"
                steps = [t["step"] for t in r["trace"]]
                ax.plot(steps, [t["FA"] for t in r["trace"]], ls=ls, color="tab:red",
                        label=f"FA {r['mask']}")
                ax.plot(steps, [t["RA"] for t in r["trace"]], ls=ls, color="tab:green",
                        label=f"RA {r['mask']}")
                if r["mask"] == "masked" and r.get("kept"):
                    ax2 = ax.twinx()
                    ax2.plot(range(1, len(r["kept"]) + 1), r["kept"], color="grey", lw=0.7,
                             label="kept fraction")
                    ax2.set_ylim(0, max(0.05, 1.1 * max(r["kept"])))
                    ax2.tick_params(labelsize=6, colors="grey")
            ax.set_ylim(-3, 103)
            ax.set_title(f"{method}, lr {lr:g}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == len(methods) - 1:
                ax.set_xlabel("step", fontsize=7)
            if j == 0:
                ax.set_ylabel("accuracy (%)", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="grey", lw=0.7)]
    labels += ["kept fraction (masked, right axis)"]
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(f"Forget (FA) and retain (RA) accuracy per step, seed {seed}: "
                 f"masked solid, plain dashed", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _json_safe(obj: Any) -> Any:
    # JSON has no NaN/Infinity; a missing number is null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.md``, ``results.json``, ``gap_vs_lr.png`` and ``trajectories.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(markdown_report(result))
    paths["json"].write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    paths["gap_plot"] = plot_gap_vs_lr(result, out / "gap_vs_lr.png")
    traj = plot_trajectories(result, out / "trajectories.png")
    if traj is not None:
        paths["trajectory_plot"] = traj
    return paths


def write_combined(results: dict[str, dict[str, Any]], out_dir: str | Path,
                   wall_time_s: float | None = None) -> dict[str, Path]:
    """Write the combined ``results.md`` (:func:`combined_report`) and ``results.json`` (the
    results under their data sets' names) of several studies into ``out_dir``. Each study's own
    folder is :func:`write_results`'s business (``out_dir/<name>/`` in ``masked-optim``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(combined_report(results, wall_time_s))
    paths["json"].write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n")
    return paths
