"""The study's figures (``calibration_{a,b,c}.png``) from its results (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core import CONFIDENCES


def plots(res: dict[str, Any], out: Path, dpi: int = 110) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nominal = [1 - c for c in CONFIDENCES]
    lo, hi = 0.004, 1.0

    def diag(ax):
        ax.plot([lo, 0.6], [lo, 0.6], "k--", lw=1, label="nominal 1−c")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 0.7)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("nominal 1 − c")
        ax.grid(alpha=0.3, which="both")

    def clip(v):
        return max(v, lo * 1.05) if v is not None else float("nan")

    from matplotlib.lines import Line2D

    def proxies(ax, colors: dict, markers: dict, styles: dict, loc="lower right"):
        h = [Line2D([], [], color=c, lw=2, label=k) for k, c in colors.items()]
        h += [Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()]
        h += [Line2D([], [], color="gray", ls=ls, label=k) for k, ls in styles.items()]
        h.append(Line2D([], [], color="k", ls="--", lw=1, label="nominal 1−c"))
        ax.legend(handles=h, fontsize=7, ncol=2, loc=loc)

    files = []
    npanel = 4 if "a_digits" in res else 2
    fig, axes = plt.subplots(1, npanel, figsize=(5 * npanel, 4.8))
    s = res["a_synthetic"]
    ax = axes[0]
    ns = sorted({c["n"] for c in s["cells"]})
    ncol = {f"n={n}": f"C{i}" for i, n in enumerate(ns)}
    for dist, ls in (("gaussian", "-"), ("skewed", ":")):
        for n in ns:
            for kind, mk in (("normal", "o"), ("t", "s")):
                ys = [clip(max(next(c["per_tail_zero_kept_rate"] for c in s["cells"] if c["dist"] == dist
                                    and c["n"] == n and c["kind"] == kind and c["c"] == cc).values()))
                      for cc in CONFIDENCES]
                ax.plot(nominal, ys, ls, color=ncol[f"n={n}"], marker=mk, ms=4)
    diag(ax)
    ax.set_title("synthetic, zero-mean coordinates kept (worse of u=±1)", fontsize=10)
    ax.set_ylabel("misaligned-kept rate")
    proxies(ax, ncol, {"normal q": "o", "Student-t q": "s"}, {"gaussian": "-", "skewed": ":"})
    lr_ = res["a_logistic"]
    ax = axes[1]
    ns = sorted({c["n"] for c in lr_["cells"]})
    ncol = {f"n={n}": f"C{i}" for i, n in enumerate(ns)}
    for th, ls in zip(lr_["thetas"], ("-", "--")):
        for n in ns:
            for kind, mk in (("normal", "o"), ("t", "s")):
                ys = [clip(next(c["misaligned_kept_rate"] for c in lr_["cells"] if c["theta"] == th and c["n"] == n
                                and c["kind"] == kind and c["c"] == cc)) for cc in CONFIDENCES]
                ax.plot(nominal, ys, ls, color=ncol[f"n={n}"], marker=mk, ms=4)
    diag(ax)
    ax.set_title("logistic regression, exact full-data G", fontsize=10)
    proxies(ax, ncol, {"normal q": "o", "Student-t q": "s"}, dict(zip(lr_["thetas"], ("-", "--"))))
    if "a_digits" in res:
        dg = res["a_digits"]
        for ax, um in zip(axes[2:], ("independent", "same batch")):
            for scen, col in zip(dg["scenarios"], ("C0", "C3")):
                for n, mk in zip(sorted({c["n"] for c in dg["cells"]}), ("o", "^", "s")):
                    for side, ls in (("retain", "-"), ("forget", "--")):
                        ys = [clip(next(x["rate"] for x in dg["cells"] if x["scenario"] == scen and x["u"] == um
                                        and x["n"] == n and x["side"] == side and x["kind"] == "normal" and x["c"] == cc))
                              for cc in CONFIDENCES]
                        ax.plot(nominal, ys, ls, color=col, marker=mk, ms=4, alpha=0.85)
            diag(ax)
            ax.set_title(f"digits MLP, u {um} (normal quantile)", fontsize=10)
            proxies(ax, {f"forget set: {k}": c for k, c in zip(dg["scenarios"], ("C0", "C3"))},
                    {f"n={n}": m for n, m in zip(sorted({c["n"] for c in dg["cells"]}), ("o", "^", "s"))},
                    {"retain side": "-", "forget side": "--"})
    fig.tight_layout()
    p = out / "calibration_a.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    files.append(p.name)

    if "b_certification" in res:
        ce = res["b_certification"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for dname, col in zip(ce["designs"], ("C0", "C2")):
            for mode, mk, ls in (("independent check batch", "o", "-"), ("same batch", "s", "--")):
                cells = [x for x in ce["cells"] if x["check"] == mode and x["mask"] == dname]
                axes[0].plot(nominal, [clip(x["p_certified_given_raises"]) for x in cells], ls, color=col, marker=mk,
                             label=f"{dname}, {mode}")
                axes[1].plot(nominal, [clip(x["p_raises_given_certified"]) for x in cells], ls, color=col, marker=mk,
                             label=f"{dname}, {mode}")
            axes[1].axhline(ce["designs"][dname]["base_rate_raises"], color=col, lw=1, ls=":",
                            label=f"{dname}: uncertified steps")
        diag(axes[0])
        axes[0].set_title("P(certified | step truly raises the full retain loss)", fontsize=10)
        axes[0].set_ylabel("rate")
        axes[0].legend(fontsize=7)
        diag(axes[1])
        axes[1].set_title("P(step truly raises | certified)", fontsize=10)
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("nominal 1 − c   (rates of 0 are drawn at the bottom edge)")
        fig.tight_layout()
        p = out / "calibration_b.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(p.name)

    if "c_unlearning" in res:
        ul = res["c_unlearning"]
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        panels = (("mean_kept_fraction", "mean kept fraction"),
                  ("forget_loss_change", "Δ forget loss (full forget set)"),
                  ("forget_acc_drop", "forget accuracy drop"),
                  ("retain_loss_change", "Δ retain loss (full retain set)"))
        for scen, mk, col in (("random", "o", "C0"), ("class", "s", "C1")):
            rows = [r for r in ul["summary"] if r["scenario"] == scen and r["c"] is not None]
            if not rows:
                continue
            unm = next(r for r in ul["summary"] if r["scenario"] == scen and r["c"] is None)
            cs = [r["c"] for r in rows]
            for ax, (key, title) in zip(axes, panels):
                ax.errorbar(cs, [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows], marker=mk, color=col,
                            capsize=3, label=f"forget set '{scen}' (unmasked: {unm[key]:+.3g})")
                ax.set_title(title, fontsize=10)
                ax.set_xlabel("confidence c")
                ax.grid(alpha=0.3)
        for ax in axes[1:]:
            ax.axhline(0.0, color="k", lw=0.8)
        axes[0].set_yscale("log")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(f"digits: {ul['steps']} steps of ProbablyAlignedSGD, lr {ul['lr']}, mean ± sd over "
                     f"{len(ul['seeds'])} seed(s); unmasked values (same lr) in the legends", fontsize=10)
        fig.tight_layout()
        p = out / "calibration_c.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(p.name)
    return files
