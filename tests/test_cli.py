"""The ``masked-optim`` command end to end on a tiny configuration."""
import json
import subprocess
import sys

import pytest

from masked_optim.cli import build_parser, main


TINY = ["--methods", "RL,GA", "--lrs", "0.01,0.05", "--seeds", "0", "--epochs", "1",
        "--train-epochs", "3", "--trace-points", "4", "-q"]


def test_unlearn_end_to_end_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["unlearn", *TINY, "--forget", "random:0.05", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "gap_vs_lr.png", "trajectories.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    # 2 methods x 2 learning rates x {plain, masked} x 1 seed
    assert len(runs) == 8
    assert {(r["method"], r["mask"], r["lr"]) for r in runs} == {
        (m, k, lr) for m in ("RL", "GA") for k in ("plain", "masked") for lr in (0.01, 0.05)}
    for r in runs:
        assert set(r["metrics"]) == {"FA", "RA", "TA", "MIA", "UA"}
        assert r["metrics"]["UA"] == pytest.approx(100 - r["metrics"]["FA"])
        assert r["kept_fraction"] == 1.0 if r["mask"] == "plain" else 0.0 <= r["kept_fraction"] <= 1.0
        assert r["trace"][0]["step"] == 0 and r["trace"][-1]["step"] == r["steps"]
        assert len(r["trace"]) <= 6 and r["hyperparameters"]["epochs"] == 1
    retrain = result["reference"]["retrain"][0]
    assert retrain["gap"] == 0.0 and not retrain["cached"]
    assert result["data"] == {"dataset": "digits", "forget": "random:0.05", "n_train": 1437,
                              "n_forget": 72, "n_retain": 1365, "n_test": 360, "n_classes": 10}
    md = (out / "results.md").read_text()
    assert "| RL | masked | 0.01 |" in md and "Avg. Gap" in md
    assert md.strip() in printed

    # A second run finds both reference models in the cache.
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(r["cached"] for kind in ("original", "retrain") for r in again["reference"][kind])


def test_no_subcommand_means_unlearn():
    args = build_parser().parse_args(["unlearn"])
    assert args.dataset == "digits" and args.forget == "class:3" and args.mask == "both"
    assert args.lrs == (0.003, 0.01, 0.03, 0.1) and args.seeds == (0, 1)
    assert build_parser().parse_args(["unlearn", "--lrs", "recipe"]).lrs is None


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("FT", "GA", "NegGrad+", "RL", "SalUn", "l1-sparse", "SCRUB"):
        assert name in out


def test_errors_exit_with_status_2(tmp_path, capsys):
    assert main(["unlearn", "--dataset", "cifar10", "--data-root", str(tmp_path), "-q"]) == 2
    assert str(tmp_path / "cifar-10-batches-py") in capsys.readouterr().err
    assert main(["--forget", "half", "-q"]) == 2
    assert "forget spec" in capsys.readouterr().err
    assert main(["--methods", "Nope", "-q"]) == 2


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "masked_optim", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "masked-optim" in done.stdout
