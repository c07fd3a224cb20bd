"""The benchmarks cannot rot: their quick mode runs here (no timing is asserted, ever)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **kw.pop("env", {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_run_all_quick_writes_json_and_summary(tmp_path):
    proc = _run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(tmp_path)])
    for name in ("step", "stats", "kernel", "quality", "run_all"):
        assert (tmp_path / f"{name}.json").exists(), name
    summary = (tmp_path / "SUMMARY.md").read_text()
    cpu = C.cpu_model()
    assert cpu in summary and cpu in proc.stdout
    run_info = json.loads((tmp_path / "run_all.json").read_text())
    assert all(s["ok"] for s in run_info["status"].values()), run_info["status"]

    step = json.loads((tmp_path / "step.json").read_text())
    m = step["machine"]
    assert m["cpu_model"] == cpu and m["torch"] and m["torch_threads"] >= 1 and m["date"] and m["noise"]
    assert step["engines"]["vmap"]["available"]
    for model in step["models"].values():
        r = model["ratios"]["vmap"]
        assert math.isfinite(r["b/a"]["median"]) and r["b/a"]["median"] > 0
        assert math.isfinite(r["c/a"]["median"]) and r["c/a"]["median"] > 0
    first = next(iter(step["models"].values()))
    assert first["memory"]["a"]["peak_delta_mib"] >= 0  # fresh-subprocess measurement ran

    stats = json.loads((tmp_path / "stats.json").read_text())
    for model in stats["models"].values():
        # correctness, not speed: our engine agrees with the float64 per-sample loop
        err = model["errors_vs_float64_loop"]["vmap"]
        assert err["mean_max_rel_err"] < 1e-4 and err["m2_max_rel_err"] < 1e-4
        assert err["covered_params"].split("/")[0] == err["covered_params"].split("/")[1]

    kernel = json.loads((tmp_path / "kernel.json").read_text())
    entry = next(iter(kernel["sizes"].values()))
    assert not entry["errors"], entry["errors"]
    assert 0.0 <= entry["kept_fraction"] <= 1.0
    assert "sgd_traffic" in entry["timing"] and "sgd_fused/sgd_traffic" in entry["ratios"]
    assert "sgd_traffic/sgd_traffic_base" in entry["ratios"] and "sgd_traffic_base" in entry["cold"]["timing"]
    cold = entry["cold"]  # the cold-cache timing of the acceptance pairs ran
    assert {"copy", "sgd_torch_fused", "adam_torch_fused"} <= set(cold["timing"])
    assert all(t > 0 for v in cold["timing"].values() for t in v["times_s"])

    quality = json.loads((tmp_path / "quality.json").read_text())
    if "skipped" not in quality:
        variants = {(s["method"], s["variant"]) for s in quality["summary"]}
        assert {v for _, v in variants} == {"plain", "masked"}
        assert all(s["gap"]["mean"] is not None for s in quality["summary"])


def test_gpu_script_dry_run_on_cpu(tmp_path):
    _run(["bash", str(BENCH / "gpu.sh"), "--quick", "--only", "kernel"],
         env={"DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable})
    kernel = json.loads((tmp_path / "kernel.json").read_text())
    assert kernel["machine"]["device"] == "cpu"
    assert (tmp_path / "SUMMARY.md").exists()


def test_step_reports_unknown_engine_and_runs_the_rest(tmp_path, capsys):
    import bench_step

    payload = bench_step.main(["--quick", "--models", "mlp", "--engine", "vmap,no-such-engine",
                               "--no-memory", "--out", str(tmp_path)])
    assert payload["engines"]["no-such-engine"]["available"] is False
    assert "vmap" in payload["models"]["mlp"]["ratios"]
    assert "no-such-engine" in capsys.readouterr().out  # listed as not run in the table
    assert (tmp_path / "step.json").exists()


def test_quality_skips_cleanly_without_workbench(tmp_path, monkeypatch):
    import bench_quality

    def missing():
        raise ImportError("No module named 'masked_optim.workbench'")

    monkeypatch.setattr(bench_quality, "_workbench", missing)
    monkeypatch.setattr(bench_quality, "_cli_available", lambda: False)
    payload = bench_quality.main(["--quick", "--out", str(tmp_path)])
    assert "skipped" in payload
    assert "skipped" in bench_quality.table(payload)
    assert json.loads((tmp_path / "quality.json").read_text())["skipped"]


def test_interleaved_timing_and_ratios():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    res = C.interleaved_timing(fns, device=C.torch.device("cpu"), repeats=3, warmup=1, target_s=0.0)
    assert all(r["repeats"] == 3 and len(r["times_s"]) == 3 for r in res.values())
    timed = calls[3:]  # after one warm-up (calibration) call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated order in each repeat
    fake = {"x": {"times_s": [2.0, 4.0, 6.0], "median_s": 4.0}, "y": {"times_s": [1.0, 1.0, 2.0], "median_s": 1.0}}
    r = C.ratio_stats(fake, "x", "y")
    assert r["median"] == 3.0 and r["of_medians"] == 4.0


def test_engine_resolution():
    eng, desc = C.resolve_engine("vmap")
    assert eng is not None and "VmapEngine" in desc
    eng, why = C.resolve_engine("no-such-engine")
    assert eng is None and "not available" in why


def test_step_phases_reports_each_phase_share(tmp_path):
    """benchmarks/step_phases.py: the phases' shares of one masked step are fractions that do not
    exceed the step (they are measured inside it) and the wrapped functions are restored."""
    import importlib.util
    import pathlib

    from masked_optim.optim import base

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "step_phases.py"
    spec = importlib.util.spec_from_file_location("step_phases", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = base.ProbablyAlignedOptimizer._statistics
    out = mod.main(["--models", "mlp", "--repeats", "2", "--out", str(tmp_path)])
    shares = out["models"]["mlp"]["share_of_step"]
    assert "statistics (forward, δ backward, layer rules)" in shares
    assert all(0.0 < v for v in shares.values()) and sum(shares.values()) <= 1.0 + 1e-9
    assert base.ProbablyAlignedOptimizer._statistics is before
    assert (tmp_path / "step_phases.json").is_file()


def test_bench_workspace_quick_reports_both_settings(tmp_path):
    """benchmarks/bench_workspace.py: each step timed with and without the workspace, and every
    fresh-process measurement present (no number is asserted but the workspace's own bytes)."""
    _run([sys.executable, str(BENCH / "bench_workspace.py"), "--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "workspace.json").read_text())
    m = payload["models"]["mlp"]
    assert set(m["memory"]) == {"b[reuse]", "b[fresh]", "c[reuse]", "c[fresh]"}
    assert all(v["peak_rss_mib"] > 0 and v["minor_page_faults_per_step"] >= 0 for v in m["memory"].values())
    assert m["memory"]["b[fresh]"]["workspace_mib_between_steps"] == 0  # nothing held when off
    assert all(math.isfinite(r["median"]) for r in m["ratios_reuse_over_fresh"].values())


def test_kernel_cold_timing_times_single_calls_interleaved():
    import bench_kernel

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = bench_kernel.cold_timing(fns, torch.device("cpu"), repeats=2, evict_bytes=1 << 12)
    assert calls.count("a") == calls.count("b") == 2 * bench_kernel.COLD_CALLS
    # rotated: a first in the first repeat, b first in the second
    assert calls[: bench_kernel.COLD_CALLS] == ["a"] * bench_kernel.COLD_CALLS
    assert calls[2 * bench_kernel.COLD_CALLS] == "b"
    assert all(len(v["times_s"]) == 2 * bench_kernel.COLD_CALLS for v in out.values())


@pytest.mark.parametrize("name, n_lists", [("traffic_sgd_", 7), ("traffic_adam_", 8), ("traffic_sgd_base_", 3),
                                           ("traffic_adam_base_", 4)])
def test_kernel_traffic_pass_reads_every_input(name, n_lists):
    # the byte floor is only a floor if no input can be dropped: changing any one input must change
    # a written tensor
    import bench_kernel
    fn = getattr(bench_kernel, name)
    g = torch.Generator().manual_seed(0)
    base = [[torch.randn(5, generator=g)] for _ in range(n_lists)]
    c = torch.tensor([0.9, 0.1, 0.99])
    written = {"traffic_sgd_": (0, 2), "traffic_adam_": (0, 2, 3), "traffic_sgd_base_": (0, 2),
               "traffic_adam_base_": (0, 2, 3)}[name]

    def outputs(lists):
        lists = [[t.clone() for t in col] for col in lists]
        fn(*lists, c)
        return [lists[k][0] for k in written]

    ref = outputs(base)
    for k in range(n_lists):
        changed = [[t.clone() for t in col] for col in base]
        changed[k][0][2] += 1.0
        out = outputs(changed)
        assert any(not torch.equal(a, b) for a, b in zip(out, ref)), f"input {k} reaches no output"


def test_kernel_last_level_cache_from_sysfs(tmp_path):
    import bench_kernel

    for i, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "491520K"), (1, "32K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert bench_kernel.last_level_cache_bytes(torch.device("cpu"), tmp_path) == 491520 * 1024
    assert bench_kernel.last_level_cache_bytes(torch.device("cpu"), tmp_path / "missing") is None


def test_ab_step_paired_summary_matches_the_t_interval_by_hand():
    import ab_step

    base, head = [2.0, 2.1, 1.9, 2.0], [2.2, 2.2, 2.0, 2.2]
    s = ab_step.paired_summary(base, head)
    d = [0.2, 0.1, 0.1, 0.2]  # head − base
    mean, sd = 0.15, math.sqrt(sum((x - 0.15) ** 2 for x in d) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3 df) · sd / √4
    assert s["head_over_base"] == pytest.approx(2.15 / 2.0)
    assert s["relative_diff_interval"] == pytest.approx([(mean - half) / 2.0, (mean + half) / 2.0])
    assert s["worse_beyond_noise"] is True
    # the same runs the other way round: faster, not worse
    assert ab_step.paired_summary(head, base)["worse_beyond_noise"] is False
    with pytest.raises(ValueError, match="equally long"):
        ab_step.paired_summary([1.0], [1.0, 2.0])
    # runs in flipped order per pair are matched by pair; a ratio only one harness has is left out
    def run(i, side, v):
        return {"pair": i, "side": side, "models": {"mlp": {"b/a": v, **({"c/af": 3.0} if side == "head" else {})}}}

    runs = [run(i, side, v) for i, (b, h) in enumerate(zip(base, head))
            for side, v in ((("base", b), ("head", h)) if i % 2 == 0 else (("head", h), ("base", b)))]
    summary = ab_step.summarise(runs, ["mlp"], len(base))
    assert set(summary["mlp"]) == {"b/a"}
    assert summary["mlp"]["b/a"] == s


def test_ab_step_one_harness_times_each_sides_package(tmp_path):
    import ab_step

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = ab_step.resolve("HEAD", ROOT)
    roots = {side: ab_step.export(head, ROOT, tmp_path / side) for side in ("base", "head")}
    for harness, script_side in (("base", "base"), ("head", "head"), ("own", "head")):
        cmd, cwd, env = ab_step.bench_command(roots, "head", harness, ["mlp"], tmp_path / "out", threads=2)
        assert pathlib.Path(cmd[1]) == roots[script_side] / "benchmarks" / "bench_step.py"
        assert cmd[cmd.index("--threads") + 1] == "2" and cmd[cmd.index("--models") + 1] == "mlp"
        assert cwd == roots["head"] and env["PYTHONPATH"] == str(roots["head"])
    # the package imported there is the side's, not the installed (editable) one
    cmd, cwd, env = ab_step.bench_command(roots, "head", "base", ["mlp"], tmp_path / "out")
    where = subprocess.run([sys.executable, "-c", "import masked_optim; print(masked_optim.__file__)"], cwd=cwd,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert pathlib.Path(where).resolve().is_relative_to(roots["head"].resolve())
    with pytest.raises(ValueError, match="harness"):
        ab_step.bench_command(roots, "head", "theirs", ["mlp"], tmp_path / "out")


def test_ab_step_exports_a_commit_and_reads_bench_step_json(tmp_path):
    import ab_step

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = ab_step.resolve("HEAD", ROOT)
    root = ab_step.export(head, ROOT, tmp_path / "tree")
    assert (root / "benchmarks" / "bench_step.py").exists() and (root / "masked_optim" / "__init__.py").exists()
    step = {"models": {"mlp": {"ratios": {"hooks": {"b/a": {"median": 2.0}, "c/a": {"median": 3.0}}},
                               "timing": {"a": {"median_s": 0.002}, "b[hooks]": {"median_s": 0.004}}}}}
    assert ab_step.extract(step, "mlp") == pytest.approx({"b/a": 2.0, "c/a": 3.0, "a_ms": 2.0, "b_ms": 4.0})
