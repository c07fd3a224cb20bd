"""The ``masked-optim`` command end to end on a tiny configuration."""
import json
import subprocess
import sys

import pytest

from masked_optim.cli import build_parser, config_from_args, main


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
    majority = result["data"].pop("retain_majority_rate")
    assert result["data"] == {"dataset": "digits", "forget": "random:0.05", "n_train": 1437,
                              "n_forget": 72, "n_retain": 1365, "n_test": 360, "n_classes": 10}
    assert 100 / 10 <= majority < 100 / 10 + 2  # ten nearly balanced classes
    for r in runs:
        assert isinstance(r["collapsed"], bool) and isinstance(r["diverged"], bool)
    assert {r["method"] for r in result["best_lr"]} == {"RL", "GA"}
    assert result["config"]["mask_options"] == [] and "ProbablyAlignedSGD(defaults)" in printed
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


@pytest.mark.parametrize("flags, options", [
    ([], ()),
    (["--confidence", "0.9"], (("confidence", 0.9),)),
    (["--forget-confidence", "0.8"], (("forget_confidence", 0.8),)),
    (["--retain-confidence", "0.7"], (("retain_confidence", 0.7),)),
    (["--quantile", "t"], (("quantile", "t"),)),
    (["--quantile", "normal"], (("quantile", "normal"),)),
    (["--soft"], (("soft", True),)),
    (["--no-soft"], (("soft", False),)),
    (["--rescale", "none"], (("rescale", None),)),
    (["--rescale", "count"], (("rescale", "count"),)),
    (["--rescale", "norm"], (("rescale", "norm"),)),
    (["--rescale-scope", "global"], (("rescale_scope", "global"),)),
    (["--max-scale", "20"], (("max_scale", 20.0),)),
    (["--certify", "0.9"], (("certify", 0.9),)),
    (["--certify-policy", "skip"], (("certify_policy", "skip"),)),
    (["--certify-policy", "tighten", "--soft", "--confidence", "0.6"],
     (("confidence", 0.6), ("soft", True), ("certify_policy", "tighten"))),
])
def test_each_mask_flag_lands_in_the_study_config(flags, options):
    cfg = config_from_args(build_parser().parse_args(["unlearn", *flags]))
    assert cfg.mask_options == options
    assert dict(cfg.mask_options) == dict(options)


@pytest.mark.parametrize("flags", [["--quantile", "cauchy"], ["--rescale", "huge"],
                                   ["--rescale-scope", "layer"], ["--certify-policy", "retry"],
                                   ["--max-scale", "big"]])
def test_mask_flags_reject_bad_values(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["unlearn", *flags])


def test_invalid_mask_option_fails_before_training(tmp_path, capsys):
    # --confidence 1.5 is rejected by the optimizer, before any model is trained or cached
    assert main(["--confidence", "1.5", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"),
                 "-q"]) == 2
    assert "confidence" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unlearn_with_mask_flags_records_them(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["unlearn", "--methods", "RL", "--lrs", "0.02", "--seeds", "0", "--epochs", "1",
            "--train-epochs", "2", "--trace-points", "0", "-q", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--confidence", "0.6", "--quantile", "t", "--certify", "0.5", "--certify-policy", "skip"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["mask_options"] == [["confidence", 0.6], ["quantile", "t"], ["certify", 0.5],
                                                ["certify_policy", "skip"]]
    runs = {r["mask"]: r for r in result["runs"]}
    assert set(runs) == {"plain", "masked"}
    # the masked run was certified at every step, on its own check batches; the plain one not
    assert sum(runs["masked"]["certificates"].values()) == runs["masked"]["steps"]
    assert runs["masked"]["skipped_steps"] == runs["masked"]["certificates"].get("skipped", 0)
    assert runs["plain"]["certificates"] == {} and runs["plain"]["kept_fraction"] == 1.0
    assert result["environment"]["cpu"]
    assert [r["method"] for r in result["best_lr"]] == ["RL"]
    md = (out / "results.md").read_text()
    assert ("ProbablyAlignedSGD(confidence=0.6, quantile='t', certify=0.5, certify_policy='skip')"
            in md)
    assert f"measured on {result['environment']['cpu']}, torch " in md
    assert md.index("## Best learning rate per method") < md.index("## All metrics")
    assert md.strip() in printed
