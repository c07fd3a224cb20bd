#!/usr/bin/env python
"""Calibration study of the feasibility mask and of the whole-update certificate (issue #6).

Measures, against the nominal levels, on problems where the truth is known exactly:

(a) per-coordinate test (docs/design.md §3): how often a coordinate that is truly *misaligned*
    (``sign(u_i)·G_i ≤ 0`` for the retain constraint, ``−sign(u_i)·G_i ≤ 0`` for the forget one, with
    ``G`` the true full-data mean gradient: the null hypothesis of the one-sided test) is kept by the
    mask, for c in {0.5, 0.8, 0.9, 0.95, 0.99}, with the normal and the Student-t quantile:
      (i)  synthetic per-sample gradients with chosen means (a third exactly 0) — Gaussian, and a
           skewed (centred exponential) variant — and a multinomial logistic regression on a large
           finite data set whose full-data gradient is computed exactly, at θ = 0 and at the
           full-data optimum (where every coordinate sits on the boundary G ≈ 0);
      (ii) the digits data (sklearn), a small MLP trained a few epochs, forget = a random 10 % of the
           training set; truth = the gradient of the full retain (forget) set, the mask from
           mini-batches; the direction u either independent of the test batches or the optimizer's
           own same-batch direction ``μ_r − μ_f``.
(b) whole-update certificate (``certify=c``): on the digits, how often a certified step truly raises
    the full retain loss, with an independent check batch and reusing the mask's retain batch;
    reported as P(certified | truly raises) (the test's guarantee: ≤ 1 − c) and
    P(truly raises | certified); plus how often a step the "tighten" policy applied raises it.
(c) kept fraction and unlearning speed vs confidence on the digits (random-sample and one-class
    forgetting): forget-loss increase, forget-accuracy drop, retain-loss change after K masked steps.

Writes ``calibration.json``, ``calibration.md`` and ``calibration_{a,b,c}.png`` into ``--out``.
The parts live in ``benchmarks/calibration_study/`` (a module per part, the report, the plots); this
file is the entry point: the study's sizes (full and quick), the machine description and the command.
``--quick`` is a seconds-long smoke run (used by tests/test_calibration.py).

Usage::

    python benchmarks/calibration.py            # full study (a few minutes on 2 CPU cores)
    python benchmarks/calibration.py --quick --out /tmp/cal
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402  (benchmarks/ is not a package)
from calibration_study.certificate import certification  # noqa: E402
from calibration_study.core import CONFIDENCES  # noqa: E402
from calibration_study.digits import digits_problem, evaluate  # noqa: E402
from calibration_study.per_coordinate import digits_mask, logistic, synthetic  # noqa: E402
from calibration_study.plots import plots  # noqa: E402
from calibration_study.report import markdown  # noqa: E402
from calibration_study.unlearning import unlearning  # noqa: E402

import masked_optim  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

FULL = dict(
    synth_P=30_000, synth_n=(5, 10, 30, 100), synth_trials=8,
    lr_N=20_000, lr_d=20, lr_K=4, lr_n=(5, 10, 30, 100), lr_trials=150,
    digits_epochs=5, digits_scenarios=("random", "class"), digits_n=(8, 32), digits_trials=60,
    cert_trials=500, cert_n=32, cert_lr=0.05, cert_mask_conf=0.5,
    unlearn_seeds=(0, 1, 2, 3, 4), unlearn_scenarios=("random", "class"), unlearn_steps=40, unlearn_lr=0.2,
    unlearn_nf=32, unlearn_nr=64,
)
QUICK = dict(
    synth_P=6_000, synth_n=(5, 100), synth_trials=2,
    lr_N=2_000, lr_d=10, lr_K=3, lr_n=(10,), lr_trials=10,
    digits_epochs=3, digits_scenarios=("random",), digits_n=(16,), digits_trials=6,
    cert_trials=10, cert_n=32, cert_lr=0.05, cert_mask_conf=0.5,
    unlearn_seeds=(0,), unlearn_scenarios=("random",), unlearn_steps=4, unlearn_lr=0.2,
    unlearn_nf=32, unlearn_nr=64,
)


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------
def lscpu_fields() -> dict[str, str]:
    keep = ("Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Thread(s) per core", "Hypervisor vendor",
            "L2 cache", "L3 cache")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in keep:
            fields[key.strip()] = val.strip()
    return fields


def machine() -> dict[str, Any]:
    return dict(
        cpu_model=cpu_model(), lscpu=lscpu_fields(), cpu_count=os.cpu_count(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), python=platform.python_version(),
        masked_optim=masked_optim.__version__, platform=platform.platform(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are tiny)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    res: dict[str, Any] = dict(
        machine=machine(), mode="quick" if args.quick else "full",
        command="python benchmarks/calibration.py" + (" --quick" if args.quick else "")
        + (f" --out {args.out}" if args.out != DEFAULT_OUT else ""),
        config=cfg, confidences=list(CONFIDENCES), timings_s={},
    )

    def part(name, fn, *a):
        t = time.perf_counter()
        res[name] = fn(*a)
        res["timings_s"][name] = round(time.perf_counter() - t, 2)
        print(f"[calibration] {name}: {res['timings_s'][name]:.1f} s", flush=True)

    part("a_synthetic", synthetic, cfg)
    part("a_logistic", logistic, cfg)
    res["skipped"] = []
    try:
        import sklearn  # noqa: F401  (the digits data ship with scikit-learn)
    except ImportError:
        res["skipped"].append("(a)(ii), (b), (c): scikit-learn is not installed (the digits data)")
    else:
        probs = {scen: digits_problem(0, scen, cfg["digits_epochs"]) for scen in cfg["digits_scenarios"]}
        res["digits_models"] = {scen: dict(
            epochs=cfg["digits_epochs"], forget=len(p["yf"]), retain=len(p["yr"]), test=len(p["yt"]),
            **{f"{name}_loss_acc": evaluate(p["model"], p[f"X{k}"], p[f"y{k}"])
               for k, name in (("f", "forget"), ("r", "retain"), ("t", "test"))})
            for scen, p in probs.items()}
        part("a_digits", digits_mask, cfg, probs)
        part("b_certification", certification, cfg, probs["random"])
        part("c_unlearning", unlearning, cfg)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        res["plots"] = []
        res["skipped"].append("plots: matplotlib is not installed")
    else:
        res["plots"] = plots(res, args.out, dpi=60 if args.quick else 110)
    (args.out / "calibration.json").write_text(json.dumps(res, indent=1))
    (args.out / "calibration.md").write_text(markdown(res))
    for note in res["skipped"]:
        print(f"[calibration] skipped {note}", flush=True)
    written = ", ".join(["calibration.json", "calibration.md", *res["plots"]])
    print(f"[calibration] wrote {written} into {args.out} ({res['wall_s']:.1f} s of study) on "
          f"{res['machine']['cpu_model']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
