"""The results folder of a study: ``results.md``, ``results.json`` and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["markdown_report", "plot_gap_vs_lr", "plot_trajectories", "write_results"]


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _reference_row(name: str, recs: list[dict[str, Any]]) -> str:
    def ms(key: str) -> tuple[float, float]:
        vals = [r["metrics"][key] if key in r["metrics"] else r[key] for r in recs]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return mean, std
    cells = [_pm(*ms(k)) for k in ("FA", "UA", "RA", "TA", "MIA")]
    return f"| {name} | " + " | ".join(cells) + f" | {_pm(*ms('gap'), digits=2)} |"


def markdown_report(result: dict[str, Any]) -> str:
    """The study as Markdown: set-up, reference models, gap table, full table, notes."""
    cfg, data = result["config"], result["data"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines = [
        f"# Unlearning study: {data['dataset']}, forget `{data['forget']}`",
        "",
        f"Model `{cfg['model']}`; {data['n_retain']} retain, {data['n_forget']} forget, "
        f"{data['n_test']} test samples. Optimizer {cfg['optimizer'].upper()} (momentum "
        f"{cfg['momentum']:g}, weight decay {cfg['weight_decay']:g}); *masked* = probably-aligned "
        f"at confidence {cfg['confidence']:g}, *plain* = the same optimizer with "
        f"`confidence=None`. Seeds {seeds}; mean ± std over seeds. "
        f"Wall time {result['wall_time_s']:.0f} s ({result['environment']['device']}, "
        f"{result['environment']['torch_threads']} threads).",
        "",
        "## Reference models",
        "",
        "| model | FA | UA | RA | TA | MIA | Avg. Gap |",
        "|---|---|---|---|---|---|---|",
        _reference_row("Original", result["reference"]["original"]),
        _reference_row("Retrain", result["reference"]["retrain"]),
        "",
        "## Avg. Gap to retrain (lower is better)",
        "",
    ]
    comparison = result["comparison"]
    if comparison:
        n_better = sum(r["masked_better"] for r in comparison)
        lines += [
            f"Masked has the smaller mean gap in {n_better} of {len(comparison)} "
            f"(method, learning rate) cells.",
            "",
            "| method | lr | plain | masked |",
            "|---|---|---|---|",
        ]
        by_key = {(r["method"], r["mask"], r["lr"]): r for r in result["summary"]}
        for c in comparison:
            p, m = by_key[(c["method"], "plain", c["lr"])], by_key[(c["method"], "masked", c["lr"])]
            cells = []
            for row, better in ((p, not c["masked_better"]), (m, c["masked_better"])):
                text = _pm(row["gap"], row["gap_std"], 2) + (" †" if row["diverged"] else "")
                cells.append(f"**{text}**" if better else text)
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
        gap = _pm(r["gap"], r["gap_std"], 2) + (" †" if r["diverged"] else "")
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
        "confidence 0).",
    ]
    if data["forget"].startswith("class"):
        lines += ["", "Class-wise forgetting: the forgotten classes are removed from the test set "
                      "(TA and the MIA non-members), as SalUn does."]
    return "\n".join(lines) + "\n"


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
    lrs = sorted({r["lr"] for r in traced})
    fig, axes = plt.subplots(len(methods), len(lrs), figsize=(2.8 * len(lrs), 2.2 * len(methods)),
                             squeeze=False, sharey=True)
    for i, method in enumerate(methods):
        for j, lr in enumerate(lrs):
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
