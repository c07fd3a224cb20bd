"""The study's figures (``calibration_{a,b,c}.png``) from its results (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core import CONFIDENCES

NOMINAL = [1 - c for c in CONFIDENCES]
LO, HI = 0.004, 1.0  # the rate axes (a rate of 0 is drawn at the bottom edge)
KIND_MARKERS = {"normal": "o", "t": "s"}
KIND_LEGEND = {"normal q": "o", "Student-t q": "s"}


def plots(res: dict[str, Any], out: Path, dpi: int = 110) -> list[str]:
    """Draw the figures of the parts ``res`` holds into ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    npanel = 4 if "a_digits" in res else 2
    figures = [("calibration_a.png", npanel, (5 * npanel, 4.8), _figure_a)]
    if "b_certification" in res:
        figures.append(("calibration_b.png", 2, (12, 4.8), _figure_b))
    if "c_unlearning" in res:
        figures.append(("calibration_c.png", 4, (20, 4.5), _figure_c))
    files = []
    for name, ncols, size, draw in figures:
        fig, axes = plt.subplots(1, ncols, figsize=size)
        draw(fig, axes, res)
        fig.tight_layout()
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        files.append(name)
    return files


def _diag(ax) -> None:
    """Log-log rate axes against the nominal level, with the diagonal rate = 1 − c."""
    ax.plot([LO, 0.6], [LO, 0.6], "k--", lw=1, label="nominal 1−c")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(LO, 0.7)
    ax.set_ylim(LO, HI)
    ax.set_xlabel("nominal 1 − c")
    ax.grid(alpha=0.3, which="both")


def _clip(v: float | None) -> float:
    return max(v, LO * 1.05) if v is not None else float("nan")


def _proxies(ax, colors: dict, markers: dict, styles: dict, loc="lower right") -> None:
    """A legend that names what the colours, the markers and the line styles stand for."""
    from matplotlib.lines import Line2D

    h = [Line2D([], [], color=c, lw=2, label=k) for k, c in colors.items()]
    h += [Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()]
    h += [Line2D([], [], color="gray", ls=ls, label=k) for k, ls in styles.items()]
    h.append(Line2D([], [], color="k", ls="--", lw=1, label="nominal 1−c"))
    ax.legend(handles=h, fontsize=7, ncol=2, loc=loc)


def _rates(cells: list[dict], key: str | Callable[[dict], Any], **match: Any) -> list[Any]:
    """``key`` (a field, or a function of the cell) of the cell at each confidence, among the cells whose
    fields equal ``match``."""
    get = key if callable(key) else (lambda cell: cell[key])
    return [get(next(c for c in cells if c["c"] == cc and all(c[k] == v for k, v in match.items())))
            for cc in CONFIDENCES]


def _rate_panel(ax, curves, title: str, legend: tuple[dict, dict, dict], alpha: float | None = None) -> None:
    """One panel of rates against the nominal level 1 − c: ``curves`` are (rate per confidence, line style,
    colour, marker); ``legend`` is (colours, markers, line styles) by label."""
    for rates, ls, color, marker in curves:
        ax.plot(NOMINAL, [_clip(r) for r in rates], ls, color=color, marker=marker, ms=4, alpha=alpha)
    _diag(ax)
    ax.set_title(title, fontsize=10)
    _proxies(ax, *legend)


def _n_colours(cells: list[dict]) -> dict[int, str]:
    return {n: f"C{i}" for i, n in enumerate(sorted({c["n"] for c in cells}))}


def _figure_a(fig, axes, res: dict[str, Any]) -> None:
    """(a) per-coordinate misaligned-kept rates: synthetic, logistic regression and, with the digits,
    one panel per direction (independent of the test batches / the same batches)."""
    s = res["a_synthetic"]
    ncol = _n_colours(s["cells"])
    styles = {"gaussian": "-", "skewed": ":"}

    def worse_tail(cell: dict) -> float:
        return max(cell["per_tail_zero_kept_rate"].values())

    curves = [(_rates(s["cells"], worse_tail, dist=dist, n=n, kind=kind), ls, col, mk)
              for dist, ls in styles.items() for n, col in ncol.items() for kind, mk in KIND_MARKERS.items()]
    _rate_panel(axes[0], curves, "synthetic, zero-mean coordinates kept (worse of u=±1)",
                ({f"n={n}": c for n, c in ncol.items()}, KIND_LEGEND, styles))
    axes[0].set_ylabel("misaligned-kept rate")
    lr_ = res["a_logistic"]
    ncol = _n_colours(lr_["cells"])
    styles = dict(zip(lr_["thetas"], ("-", "--")))
    curves = [(_rates(lr_["cells"], "misaligned_kept_rate", theta=th, n=n, kind=kind), ls, col, mk)
              for th, ls in styles.items() for n, col in ncol.items() for kind, mk in KIND_MARKERS.items()]
    _rate_panel(axes[1], curves, "logistic regression, exact full-data G",
                ({f"n={n}": c for n, c in ncol.items()}, KIND_LEGEND, styles))
    if "a_digits" not in res:
        return
    dg = res["a_digits"]
    colours = dict(zip(dg["scenarios"], ("C0", "C3")))
    markers = dict(zip(sorted({c["n"] for c in dg["cells"]}), ("o", "^", "s")))
    sides = {"retain": "-", "forget": "--"}
    legend = ({f"forget set: {k}": c for k, c in colours.items()}, {f"n={n}": m for n, m in markers.items()},
              {f"{side} side": ls for side, ls in sides.items()})
    for ax, um in zip(axes[2:], ("independent", "same batch")):
        curves = [(_rates(dg["cells"], "rate", scenario=scen, u=um, n=n, side=side, kind="normal"),
                   ls, col, mk)
                  for scen, col in colours.items() for n, mk in markers.items() for side, ls in sides.items()]
        _rate_panel(ax, curves, f"digits MLP, u {um} (normal quantile)", legend, alpha=0.85)


def _figure_b(fig, axes, res: dict[str, Any]) -> None:
    """(b) the certificate: P(certified | truly raises) and P(truly raises | certified) per mask design and
    check batch."""
    ce = res["b_certification"]
    keys = ("p_certified_given_raises", "p_raises_given_certified")
    for dname, col in zip(ce["designs"], ("C0", "C2")):
        for mode, mk, ls in (("independent check batch", "o", "-"), ("same batch", "s", "--")):
            cells = [x for x in ce["cells"] if x["check"] == mode and x["mask"] == dname]
            for ax, key in zip(axes, keys):
                ax.plot(NOMINAL, [_clip(x[key]) for x in cells], ls, color=col, marker=mk,
                        label=f"{dname}, {mode}")
        axes[1].axhline(ce["designs"][dname]["base_rate_raises"], color=col, lw=1, ls=":",
                        label=f"{dname}: uncertified steps")
    titles = ("P(certified | step truly raises the full retain loss)", "P(step truly raises | certified)")
    for ax, title in zip(axes, titles):
        _diag(ax)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.set_xlabel("nominal 1 − c   (rates of 0 are drawn at the bottom edge)")
    axes[0].set_ylabel("rate")


def _figure_c(fig, axes, res: dict[str, Any]) -> None:
    """(c) kept fraction and loss / accuracy changes against the confidence, per forget set."""
    ul = res["c_unlearning"]
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
