"""The ``masked-optim`` command end to end on a tiny configuration."""
import json
import os
import subprocess
import sys

import pytest

from masked_optim.cli import build_parser, config_from_args, configs_from_args, main
from masked_optim.workbench.data import load_dataset
from masked_optim.workbench.study import MAIN_JOB_LRS


TINY = ["--dataset", "digits", "--methods", "RL,GA", "--lrs", "0.01,0.05", "--seeds", "0", "--epochs", "1",
        "--train-epochs", "3", "--trace-points", "4", "--workers", "1", "-q"]


def test_unlearn_end_to_end_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["unlearn", *TINY, "--forget", "random:0.05", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "gap_vs_lr.png", "trajectories.png"):
        assert (out / "digits" / name).stat().st_size > 0, name
    result = json.loads((out / "digits" / "results.json").read_text())
    assert json.loads((out / "results.json").read_text()) == {"digits": result}
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
    md = (out / "digits" / "results.md").read_text()
    assert "| RL | masked | 0.01 |" in md and "Avg. Gap" in md
    combined = (out / "results.md").read_text()
    assert combined.strip() in printed and "## Unlearning study: digits, forget `random:0.05`" in combined
    assert f"Results in {out}: results.md, results.json, digits/ (" in printed

    # A second run finds both reference models in the cache.
    assert main(args) == 0
    again = json.loads((out / "digits" / "results.json").read_text())
    assert all(r["cached"] for kind in ("original", "retrain") for r in again["reference"][kind])


def test_no_subcommand_means_unlearn_the_main_job():
    args = build_parser().parse_args(["unlearn"])
    assert args.dataset == ("digits", "mnist1d") and args.forget is None and args.mask == "both"
    assert args.lrs is None and args.seeds == (0, 1, 2)
    assert args.workers == min(2, os.cpu_count() or 1)
    digits, mnist1d = configs_from_args(args)
    assert (digits.dataset, digits.forget, mnist1d.dataset, mnist1d.forget) == (
        "digits", "class:3", "mnist1d", "random:0.1")
    assert config_from_args(args) == digits
    for cfg in (digits, mnist1d):
        assert cfg.seeds == (0, 1, 2) and cfg.workers == args.workers
        assert cfg.methods == ("RL", "NegGrad+", "GA", "FT", "SalUn", "l1-sparse", "SCRUB")
        assert dict(cfg.method_lrs) == MAIN_JOB_LRS[cfg.dataset]
        for method in cfg.methods:
            assert cfg.lrs_of(method) == MAIN_JOB_LRS[cfg.dataset][method]
    assert digits.resolved().batch_size == 64 and mnist1d.resolved().batch_size == 128


def test_lrs_and_forget_flags_apply_to_every_data_set():
    parse = build_parser().parse_args
    for cfg in configs_from_args(parse(["unlearn", "--lrs", "recipe"])):
        assert cfg.lrs is None and cfg.method_lrs == () and cfg.lrs_of("GA") == (None,)
    cfgs = configs_from_args(parse(["unlearn", "--lrs", "0.2,0.4", "--forget", "random:7",
                                    "--dataset", "mnist1d,digits", "--methods", "RL"]))
    assert [(c.dataset, c.forget, c.lrs, c.method_lrs) for c in cfgs] == [
        ("mnist1d", "random:7", (0.2, 0.4), ()), ("digits", "random:7", (0.2, 0.4), ())]
    # a data set without main-job learning rates runs StudyConfig's
    (cifar,) = configs_from_args(parse(["unlearn", "--dataset", "cifar10"]))
    assert cifar.forget == "random:0.1" and cifar.method_lrs == () and cifar.lrs == (0.003, 0.01, 0.03, 0.1)
    # only the methods run get their main-job entries
    (one,) = configs_from_args(parse(["unlearn", "--dataset", "digits", "--methods", "ga"]))
    assert one.method_lrs == (("GA", MAIN_JOB_LRS["digits"]["GA"]),)


@pytest.mark.parametrize("flags", [["--dataset", "digits,nope"], ["--dataset", "digits,digits"],
                                   ["--dataset", ","], ["--workers", "0"], ["--workers", "two"],
                                   ["--lrs", ","]])
def test_bad_dataset_workers_and_lrs_values_are_rejected(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["unlearn", *flags])


def test_two_data_sets_write_both_folders_and_a_combined_report(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    base = ["--dataset", "digits,mnist1d", "--methods", "GA", "--seeds", "0", "--epochs", "1",
            "--train-epochs", "2", "--trace-points", "0", "--workers", "1", "-q",
            "--cache-dir", str(cache), "--out", str(out)]
    # Expected sizes from the data alone: digits' train split holds 146 threes; MNIST-1D has
    # 4000 training signals, 10 % of which are forgotten.
    digits = load_dataset("digits")
    n_threes = int((digits.train.y == 3).sum())
    assert n_threes == 146

    assert main(base) == 0
    printed = capsys.readouterr().out
    combined = json.loads((out / "results.json").read_text())
    assert list(combined) == ["digits", "mnist1d"]
    for name in ("digits", "mnist1d"):
        for f in ("results.md", "results.json", "gap_vs_lr.png"):
            assert (out / name / f).stat().st_size > 0, (name, f)
        assert not (out / name / "trajectories.png").exists()  # --trace-points 0
        assert json.loads((out / name / "results.json").read_text()) == combined[name]
    assert combined["digits"]["data"]["forget"] == "class:3"
    assert combined["digits"]["data"]["n_forget"] == n_threes
    assert combined["mnist1d"]["data"]["forget"] == "random:0.1"
    assert combined["mnist1d"]["data"]["n_forget"] == 400 and combined["mnist1d"]["data"]["n_train"] == 4000
    assert combined["mnist1d"]["config"]["batch_size"] == 128
    assert combined["digits"]["config"]["batch_size"] == 64
    for name in ("digits", "mnist1d"):
        runs = combined[name]["runs"]
        # no --lrs: GA at exactly its main-job learning rates, plain and masked
        assert sorted((r["lr"], r["mask"]) for r in runs) == sorted(
            (lr, mask) for lr in MAIN_JOB_LRS[name]["GA"] for mask in ("plain", "masked"))
        assert all(r["hyperparameters"]["batch_size"] == combined[name]["config"]["batch_size"] for r in runs)
    md = (out / "results.md").read_text()
    assert md.strip() in printed
    sections = [md.index("\n## Unlearning study: digits, forget `class:3`\n"),
                md.index("\n## Unlearning study: mnist1d, forget `random:0.1`\n")]
    assert sections[0] < sections[1]
    for start, end, name in ((sections[0], sections[1], "digits"), (sections[1], len(md), "mnist1d")):
        section = md[start:end]
        # the section's first table is its best-learning-rate comparison
        assert section.index("\n### Best learning rate per method: " + name) < section.index("\n|")
        assert section.index("\n|") < section.index("\n### Reference models")
    assert f"Results in {out}: results.md, results.json, digits/, mnist1d/ (" in printed

    # --forget and --lrs apply to both data sets; the original models come from the cache.
    assert main([*base, "--forget", "random:0.05", "--lrs", "0.02"]) == 0
    combined = json.loads((out / "results.json").read_text())
    assert [combined[n]["data"]["forget"] for n in ("digits", "mnist1d")] == ["random:0.05"] * 2
    assert combined["digits"]["data"]["n_forget"] == round(0.05 * 1437)
    assert combined["mnist1d"]["data"]["n_forget"] == 200
    for name in ("digits", "mnist1d"):
        assert {r["lr"] for r in combined[name]["runs"]} == {0.02}
        assert combined[name]["reference"]["original"][0]["cached"]
        assert not combined[name]["reference"]["retrain"][0]["cached"]


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
    (["--retain-guard", "0.1"], (("retain_guard", 0.1),)),
    (["--retain-guard", "none"], (("retain_guard", None),)),
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
    args = ["unlearn", "--dataset", "digits", "--methods", "RL", "--lrs", "0.02", "--seeds", "0",
            "--epochs", "1", "--train-epochs", "2", "--trace-points", "0", "-q", "--threads", "1",
            "--workers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--confidence", "0.6", "--quantile", "t", "--certify", "0.5", "--certify-policy", "skip"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "digits" / "results.json").read_text())
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
    md = (out / "digits" / "results.md").read_text()
    assert ("ProbablyAlignedSGD(confidence=0.6, quantile='t', certify=0.5, certify_policy='skip')"
            in md)
    assert f"measured on {result['environment']['cpu']}, torch " in md
    assert md.index("## Best learning rate per method") < md.index("## Reference models")
    assert md.index("## Best learning rate per method") < md.index("## All metrics")
    assert (out / "results.md").read_text().strip() in printed
