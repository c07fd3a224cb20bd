"""The calibration study (benchmarks/calibration.py) in its quick mode: it runs, writes well-formed
outputs, and the properties that must hold do hold (no timing is asserted)."""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

# the digits parts need scikit-learn and the plots matplotlib (not in the package's test extras): without
# them the script still runs the synthetic and logistic-regression parts and says what it skipped


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAVE_SKLEARN = _importable("sklearn")
HAVE_MPL = _importable("matplotlib")
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed (digits data)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "calibration.py"
CONFIDENCES = (0.5, 0.8, 0.9, 0.95, 0.99)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, json.loads((out / "calibration.json").read_text()), proc.stdout


def _rate_ok(x):
    return x is None or (isinstance(x, float) and 0.0 <= x <= 1.0)


def test_outputs_exist_and_are_well_formed(quick):
    out, res, stdout = quick
    assert res["mode"] == "quick"
    m = res["machine"]
    assert m["cpu_model"] and m["cpu_model"] in stdout and m["torch"] and m["date"]
    plots = ["calibration_a.png"] + (["calibration_b.png", "calibration_c.png"] if HAVE_SKLEARN else [])
    assert res["plots"] == (plots if HAVE_MPL else [])
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    md = (out / "calibration.md").read_text()
    assert m["cpu_model"] in md
    sections = ["(a)(i) Synthetic", "(a)(i) Logistic"]
    if HAVE_SKLEARN:
        sections += ["(a)(ii) Digits", "(b) Whole-update", "(c) Kept fraction"]
    for section in sections:
        assert section in md, section
    width = None
    for line in md.splitlines():  # every table row has as many cells as its header
        if not line.startswith("|"):
            width = None
            continue
        assert "nan" not in line.lower(), line
        cols = line.count("|")
        width = cols if width is None else width
        assert cols == width, line
    parts = ["a_synthetic", "a_logistic"] + (["a_digits", "b_certification", "c_unlearning"] if HAVE_SKLEARN else [])
    for part in parts:
        assert part in res and res["timings_s"][part] >= 0
    assert bool(res["skipped"]) == (not (HAVE_SKLEARN and HAVE_MPL))
    for c in res["a_synthetic"]["cells"]:
        assert _rate_ok(c["misaligned_kept_rate"]) and _rate_ok(c["zero_mean_kept_rate"])
    for c in res["a_logistic"]["cells"] + res.get("a_digits", {}).get("cells", []):
        assert _rate_ok(c.get("misaligned_kept_rate", c.get("rate")))
    if not HAVE_SKLEARN:
        return
    for c in res["b_certification"]["cells"]:
        assert _rate_ok(c["p_certified_given_raises"]) and _rate_ok(c["p_raises_given_certified"])
        assert sum(c["actions"].values()) == c["trials"]
    for r in res["c_unlearning"]["summary"]:
        assert 0.0 <= r["mean_kept_fraction"] <= 1.0 and math.isfinite(r["forget_loss_change"])


def test_gaussian_per_coordinate_rate_within_nominal(quick):
    """Exact property: for Gaussian per-sample gradients the Student-t test has level exactly 1 − c, so
    the kept-but-misaligned rate is ≤ 1 − c up to binomial error (and ≈ 1 − c on the zero means, so
    the test is not vacuous); the normal quantile is only asymptotically right (checked at n = 100)."""
    _, res, _ = quick
    cells = [c for c in res["a_synthetic"]["cells"] if c["dist"] == "gaussian"]
    assert cells
    for c in cells:
        if c["kind"] == "t" or c["n"] >= 100:
            nominal = 1 - c["c"]
            slack = 4 * math.sqrt(nominal * (1 - nominal) / c["misaligned_count"])
            assert c["misaligned_kept_rate"] <= nominal + slack, c
            slack0 = 4 * math.sqrt(nominal * (1 - nominal) / c["zero_count"])
            assert abs(c["zero_mean_kept_rate"] - nominal) <= slack0 + 0.003, c


def test_nested_masks_make_rates_monotone(quick):
    """Same data, higher threshold: the masks are nested, so every rate is non-increasing in c and the
    Student-t rate never exceeds the normal one (q_t ≥ q_normal for c ≥ 0.5)."""
    _, res, _ = quick

    def check(cells, key, group):
        rows: dict = {}
        for c in cells:
            rows.setdefault(group(c), {})[c["c"]] = c[key]
        for g, by_c in rows.items():
            vals = [by_c[c] for c in CONFIDENCES if by_c.get(c) is not None]
            assert all(a >= b for a, b in zip(vals, vals[1:])), (g, vals)
        return rows

    syn = check(res["a_synthetic"]["cells"], "misaligned_kept_rate", lambda c: (c["dist"], c["n"], c["kind"]))
    for (dist, n, kind), by_c in syn.items():
        if kind == "t":
            assert all(by_c[c] <= syn[(dist, n, "normal")][c] for c in CONFIDENCES)
    check(res["a_logistic"]["cells"], "misaligned_kept_rate", lambda c: (c["theta"], c["n"], c["kind"]))
    if not HAVE_SKLEARN:
        return
    dig = [c for c in res["a_digits"]["cells"] if not c["side"].startswith("fdp")]
    check(dig, "rate", lambda c: (c["scenario"], c["u"], c["side"], c["n"], c["kind"]))
    cert = res["b_certification"]["cells"]
    check(cert, "certified", lambda c: (c["mask"], c["check"]))
    first = {}  # the first unlearning step sees the same batches at every confidence
    for r in res["c_unlearning"]["runs"]:
        first.setdefault((r["scenario"], r["seed"]), {})[r["c"]] = r["first_step_kept_fraction"]
    for by_c in first.values():
        assert by_c[None] == 1.0
        vals = [by_c[c] for c in CONFIDENCES]
        assert all(a >= b for a, b in zip(vals, vals[1:])), vals


@needs_sklearn
def test_certificate_is_consistent(quick):
    """An accepted step is exactly the uncertified masked step, and with an independent check batch the
    share of truly-raising steps that get certified is not grossly above 1 − c."""
    _, res, _ = quick
    ce = res["b_certification"]
    assert ce["accepted_step_mismatches"] == 0
    for d in ce["designs"].values():  # the study has truly-raising steps to measure
        assert 0.0 < d["base_rate_raises"] < 1.0
    for c in ce["cells"]:
        if c["check"].startswith("independent") and c["truly_raising"] >= 5:
            nominal = 1 - c["c"]
            slack = 3 * math.sqrt(nominal * (1 - nominal) / c["truly_raising"]) + 0.05
            assert c["p_certified_given_raises"] <= nominal + slack, c
