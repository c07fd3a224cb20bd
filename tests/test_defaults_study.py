"""benchmarks/defaults_study.py: its selection rules on hand-made runs, and its quick mode end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import defaults_study as S  # noqa: E402


def _run(config, method, lr, seed, gap, collapsed=False, dataset="mnist1d"):
    return {"dataset": dataset, "config": config, "method": method, "lr": lr, "seed": seed, "gap": gap,
            "collapsed": collapsed, "diverged": False, "kept_fraction": 0.5,
            "metrics": {"FA": 0.0, "RA": 90.0, "TA": 80.0, "MIA": 50.0}}


def test_best_lr_never_picks_a_cell_with_a_collapsed_seed():
    runs = [_run("m", "RL", 0.1, s, g, collapsed=(s == 1)) for s, g in enumerate((0.5, 0.6, 0.7))]
    runs += [_run("m", "RL", 0.01, s, g) for s, g in enumerate((3.0, 5.0, 4.0))]
    best = S.best_lr(S.cells(runs), "mnist1d", "m", "RL")
    assert best["lr"] == 0.01 and abs(best["gap"] - 4.0) < 1e-12 and abs(best["std"] - 1.0) < 1e-12
    only_bad = [_run("m", "GA", 0.1, s, 1.0, collapsed=True) for s in range(3)]
    assert S.best_lr(S.cells(only_bad), "mnist1d", "m", "GA") is None


def test_verdict_rule_is_masked_at_most_plain_plus_plain_std():
    # plain best: mean 4, std 1 (3, 4, 5); masked 4.9 passes without winning, 5.1 fails, 3.9 wins
    plain = [_run("plain", "RL", 0.01, s, g) for s, g in enumerate((3.0, 4.0, 5.0))]
    for masked_gap, ok, win in ((4.9, True, False), (5.1, False, False), (3.9, True, True)):
        runs = plain + [_run("m", "RL", 0.03, s, masked_gap) for s in range(3)]
        v = S.verdicts(S.cells(runs), "m", ("mnist1d",), ("RL",))
        assert (v["ok"], v["wins_mnist1d"]) == (int(ok), int(win)), masked_gap


def test_choose_ranks_by_passes_then_mnist1d_wins():
    plain = [_run("plain", m, 0.01, s, 10.0 + s) for m in ("RL", "GA") for s in range(3)]  # mean 11, std 1
    a = [_run("a", "RL", 0.01, s, 11.5) for s in range(3)] + [_run("a", "GA", 0.01, s, 11.5) for s in range(3)]
    b = [_run("b", "RL", 0.01, s, 5.0) for s in range(3)] + [_run("b", "GA", 0.01, s, 30.0) for s in range(3)]
    c = [_run("c", "RL", 0.01, s, 10.5) for s in range(3)] + [_run("c", "GA", 0.01, s, 11.9) for s in range(3)]
    pick = S.choose(S.cells(plain + a + b + c), ("mnist1d",), ("RL", "GA"))
    # a and c pass both; c also wins once (10.5 < 11), a never; b passes one (GA fails)
    assert [r["config"] for r in pick["ranking"]] == ["c", "a", "b"]
    assert pick["default"] == "c" and pick["per_method"]["RL"]["config"] == "b"


def test_quick_study_writes_json_and_tables(tmp_path):
    env = {**os.environ, "MASKED_OPTIM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "defaults_study.py"), "--quick", "--workers", "1",
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    screen = json.loads((tmp_path / "out" / "screen.json").read_text())
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    # screen: 3 configs x 2 methods x 2 lrs x 1 seed; final adds the default at both lrs and the 3x runs
    assert sum(r["config"] != "default" for r in runs) >= 12
    assert {r["config"] for r in runs} >= {"plain", "strict/none", "lenient/count", "default"}
    assert all(r["options"] == {} for r in runs if r["config"] == "default")
    assert screen["screen"]["choice"]["default"] in ("strict/none", "lenient/count")
    assert len(final["final"]["at_3x"]) == 2
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "Screen: configurations ranked" in tables and "three times" in tables
    assert S.cpu_name() in tables


def test_recommended_settings_are_the_committed_study_choice():
    """``masked-optim methods`` shows what the committed screen chose, not numbers typed by hand."""
    from masked_optim.workbench.study import RECOMMENDED_MASK

    screen = json.loads((BENCH / "results" / "defaults_study" / "screen.json").read_text())
    choice = screen["screen"]["choice"]
    default = screen["screen"]["configs"][choice["default"]]
    assert set(RECOMMENDED_MASK) == set(choice["per_method"])
    for method, rec in RECOMMENDED_MASK.items():
        picked = choice["per_method"][method]
        options = screen["screen"]["configs"][picked["config"]]
        # {} stands for the package default, which is the screen's overall choice
        assert rec["options"] == options or (rec["options"] == {} and options == default), method
        assert rec["lr"] == picked["best_lr"], method


def test_package_default_is_the_screen_choice():
    import torch

    from masked_optim import ProbablyAlignedSGD

    screen = json.loads((BENCH / "results" / "defaults_study" / "screen.json").read_text())
    chosen = screen["screen"]["configs"][screen["screen"]["choice"]["default"]]
    model = torch.nn.Linear(3, 2)
    explicit_opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model, **chosen)
    default_opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model)
    explicit, default = explicit_opt.param_groups[0], default_opt.param_groups[0]
    assert {k: v for k, v in explicit.items() if k != "params"} == {k: v for k, v in default.items() if k != "params"}
    assert explicit_opt.retain_guard == default_opt.retain_guard


def test_main_job_learning_rates_are_the_final_stage_best():
    """The main job reruns each side's best cell of the committed final stage."""
    from masked_optim.workbench.study import MAIN_JOB_LRS

    final = json.loads((BENCH / "results" / "defaults_study" / "final.json").read_text())
    for row in final["final"]["rows"]:
        expected = {row["plain"]["lr"], row["masked"]["lr"]}
        assert set(MAIN_JOB_LRS[row["dataset"]][row["method"]]) == expected, (row["dataset"], row["method"])
