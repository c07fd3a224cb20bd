"""Study bookkeeping and the report: collapse counts, best learning rates, header, marks;
per-method learning rates, batch sizes per data set, parallel runs equal to sequential ones."""
import copy
import json
import re
from dataclasses import replace

import pytest
import torch

from masked_optim.workbench import study
from masked_optim.workbench.data import load_dataset, make_split
from masked_optim.workbench.methods import get_method
from masked_optim.workbench.metrics import avg_gap, evaluate
from masked_optim.workbench.report import combined_report, markdown_report
from masked_optim.workbench.runner import run_unlearning
from masked_optim.workbench.study import StudyConfig, best_lr_table, compare_masks, cpu_model, run_study, \
    summarise
from masked_optim.workbench.training import ModelCache, default_train_config, reference_model


def _run(method, mask, lr, seed, gap, diverged=False, collapsed=False):
    metrics = {"FA": gap, "RA": 90.0, "TA": 80.0, "MIA": 10.0, "UA": 100 - gap}
    return {"method": method, "mask": mask, "lr": lr, "seed": seed, "metrics": metrics, "gap": gap,
            "runtime_s": 1.0, "kept_fraction": 0.5 if mask == "masked" else 1.0,
            "diverged": diverged, "collapsed": collapsed}


def _cell(method, mask, lr, gap, gap_std=0.0, diverged=0, collapsed=0, n=2):
    return {"method": method, "mask": mask, "lr": lr, "n": n, "gap": gap, "gap_std": gap_std,
            "diverged": diverged, "collapsed": collapsed}


def test_summarise_counts_collapsed_and_diverged_seeds_per_cell():
    runs = [_run("RL", "plain", 0.1, 0, 3.0, collapsed=True), _run("RL", "plain", 0.1, 1, 5.0),
            _run("RL", "plain", 0.1, 2, 7.0, diverged=True, collapsed=True),
            _run("RL", "masked", 0.1, 0, 6.0), _run("RL", "masked", 0.1, 1, 8.0)]
    del runs[-1]["collapsed"]  # results written before the flag existed count as not collapsed
    rows = {r["mask"]: r for r in summarise(runs)}
    assert rows["plain"]["collapsed"] == 2 and rows["plain"]["diverged"] == 1 and rows["plain"]["n"] == 3
    assert rows["plain"]["gap"] == pytest.approx(5.0) and rows["plain"]["gap_std"] == pytest.approx(2.0)
    assert rows["masked"]["collapsed"] == 0 and rows["masked"]["diverged"] == 0


HAND_SUMMARY = [
    # RL plain: the collapsed cell has the lowest gap and must not be chosen; 0.1 diverged.
    _cell("RL", "plain", 0.003, 9.5, 0.5),
    _cell("RL", "plain", 0.01, 8.61, 1.2),
    _cell("RL", "plain", 0.03, 1.0, 0.1, collapsed=1),
    _cell("RL", "plain", 0.1, 0.5, 0.1, diverged=2),
    _cell("RL", "masked", 0.003, 9.0, 0.3),
    _cell("RL", "masked", 0.01, 7.0, 0.8),
    _cell("RL", "masked", 0.03, 6.6, 0.9),
    _cell("RL", "masked", 0.1, 6.6, 0.4),  # tie with 0.03: the smaller lr wins
    # GA: every plain lr collapsed; masked has one diverged and one collapsed cell.
    _cell("GA", "plain", 0.01, 2.0, collapsed=1),
    _cell("GA", "plain", 0.1, 3.0, collapsed=2),
    _cell("GA", "masked", 0.01, 4.0, diverged=1),
    _cell("GA", "masked", 0.1, 5.0, collapsed=1),
    # FT: plain better; SalUn: only masked was run; NegGrad+: all diverged.
    _cell("FT", "plain", 0.01, 2.0), _cell("FT", "masked", 0.01, 2.5),
    _cell("SalUn", "masked", 0.01, 4.0),
    _cell("NegGrad+", "plain", 0.1, 4.0, diverged=1), _cell("NegGrad+", "masked", 0.1, 4.0, diverged=2),
]


def test_best_lr_table_on_a_hand_made_summary():
    table = {r["method"]: r for r in best_lr_table(HAND_SUMMARY)}
    assert list(table) == ["RL", "GA", "FT", "SalUn", "NegGrad+"]
    rl = table["RL"]
    assert rl["plain"] == {"lr": 0.01, "gap": 8.61, "gap_std": 1.2, "n": 2, "excluded": [0.03, 0.1]}
    assert rl["masked"] == {"lr": 0.03, "gap": 6.6, "gap_std": 0.9, "n": 2, "excluded": []}
    assert rl["masked_better"] is True
    ga = table["GA"]
    assert ga["plain"]["lr"] is None and ga["plain"]["gap"] is None
    assert ga["plain"]["reason"] == "all collapsed" and ga["plain"]["excluded"] == [0.01, 0.1]
    assert ga["masked"]["reason"] == "all diverged or collapsed" and ga["masked_better"] is None
    assert table["FT"]["plain"]["lr"] == 0.01 and table["FT"]["masked_better"] is False
    assert table["SalUn"]["plain"] is None and table["SalUn"]["masked"]["gap"] == 4.0
    assert table["SalUn"]["masked_better"] is None
    assert table["NegGrad+"]["plain"]["reason"] == "all diverged"


def test_compare_masks_marks_cells_with_a_bad_seed():
    rows = {(r["method"], r["lr"]): r for r in compare_masks(HAND_SUMMARY)}
    assert rows[("RL", 0.01)]["clean"] and rows[("RL", 0.01)]["masked_better"]
    assert not rows[("RL", 0.03)]["clean"] and not rows[("RL", 0.03)]["masked_better"]
    assert ("SalUn", 0.01) not in rows


def _result(mask_options=()):
    summary = [dict(c, **{k: 50.0 for k in ("FA", "UA", "RA", "TA", "MIA")},
                    **{k + "_std": 1.0 for k in ("FA", "UA", "RA", "TA", "MIA")},
                    kept_fraction=0.5, runtime_s=1.0) for c in HAND_SUMMARY]
    ref = [{"seed": 0, "metrics": {"FA": 0.0, "UA": 100.0, "RA": 99.0, "TA": 97.0, "MIA": 100.0}, "gap": 0.0}]
    return {
        "config": {"seeds": [0, 1], "model": "mlp", "optimizer": "sgd", "momentum": 0.9,
                   "weight_decay": 5e-4, "mask_options": mask_options},
        "data": {"dataset": "digits", "forget": "class:3", "n_retain": 1291, "n_forget": 146,
                 "n_test": 360, "retain_majority_rate": 11.23},
        "environment": {"cpu": "Test CPU 9000", "torch": "9.9.9", "torch_threads": 3, "device": "cpu"},
        "wall_time_s": 12.0,
        "reference": {"original": ref, "retrain": ref},
        "summary": summary,
        "best_lr": best_lr_table(summary),
        "comparison": compare_masks(summary),
    }


def test_report_shows_best_lr_first_and_marks_bad_cells():
    md = markdown_report(_result((("confidence", 0.9), ("rescale", None))))
    assert "measured on Test CPU 9000, torch 9.9.9, 3 threads" in md
    assert "*masked* = ProbablyAlignedSGD(confidence=0.9, rescale=None)" in md
    best = md.index("## Best learning rate per method: digits, forget `class:3`")
    assert best < md.index("## Avg. Gap to retrain at every learning rate") < md.index("## All metrics")
    assert "| RL | 0.01: 8.61 ± 1.20 | **0.03: 6.60 ± 0.90** |" in md
    assert "| GA | all collapsed | all diverged or collapsed |" in md
    assert "| FT | **0.01: 2.00 ± 0.00** | 0.01: 2.50 ± 0.00 |" in md
    assert "| SalUn | not run | 0.01: 4.00 ± 0.00 |" in md
    assert "Masked is better at its best learning rate for 1 of 2 methods." in md
    # per-lr tables: ‡ collapsed, † diverged, and the marks explained with the threshold
    assert "| RL | 0.03 | 1.00 ± 0.10 ‡ | 6.60 ± 0.90 |" in md
    assert re.search(r"\| RL \| plain \| 0\.1 \|.*\| 0\.50 ± 0\.10 † \|", md)
    assert "‡ = at least one seed collapsed (retain accuracy ≤ 11.2 %" in md
    assert "† = at least one seed diverged" in md
    # only the cells without a bad seed are counted: RL 0.003, 0.01; FT 0.01
    assert "in 2 of 3 (method, learning rate) cells where no seed diverged or collapsed" in md


def test_report_defaults_and_results_read_back_from_json():
    result = json.loads(json.dumps(_result()))
    del result["best_lr"]  # written before the table existed: computed from the summary
    md = markdown_report(result)
    assert "*masked* = ProbablyAlignedSGD(defaults)" in md
    assert "| RL | 0.01: 8.61 ± 1.20 | **0.03: 6.60 ± 0.90** |" in md
    result["config"]["mask_options"] = [["quantile", "t"], ["soft", True]]  # pairs after JSON
    assert "ProbablyAlignedSGD(quantile='t', soft=True)" in markdown_report(result)


def test_cpu_model_reads_proc_cpuinfo_or_falls_back(monkeypatch, tmp_path):
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
    if found:
        assert cpu_model() == " ".join(found.group(1).split())

    def missing(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(study, "open", missing, raising=False)
    monkeypatch.setattr(study.platform, "processor", lambda: "fallback-cpu")
    assert cpu_model() == "fallback-cpu"
    monkeypatch.setattr(study.platform, "processor", lambda: "")
    assert cpu_model() == "unknown CPU"


def test_study_config_mask_options():
    cfg = StudyConfig(mask_options={"confidence": 0.9, "quantile": "t"})
    assert cfg.mask_options == (("confidence", 0.9), ("quantile", "t"))
    assert hash(cfg) == hash(StudyConfig(mask_options=(("confidence", 0.9), ("quantile", "t"))))
    assert StudyConfig().mask_options == ()
    assert cfg.resolved().mask_options == cfg.mask_options
    with pytest.raises(ValueError, match="twice"):
        StudyConfig(mask_options=(("confidence", 0.9), ("confidence", 0.8)))
    # checked before any model is trained
    with pytest.raises(ValueError, match="confidenc"):
        StudyConfig(mask_options={"confidenc": 0.9}).resolved()
    with pytest.raises(ValueError):
        StudyConfig(mask_options={"quantile": "cauchy"}).resolved()


def test_study_config_method_lrs():
    cfg = StudyConfig(methods=("RL", "GA", "FT"), lrs=(0.1,),
                      method_lrs={"rl": [0.003, 0.03], "GA": 0.001, "SCRUB": (0.5,)})
    # normalised to pairs of float tuples (hashable), a single number is one learning rate
    assert cfg.method_lrs == (("rl", (0.003, 0.03)), ("GA", (0.001,)), ("SCRUB", (0.5,)))
    assert hash(cfg) == hash(StudyConfig(methods=("RL", "GA", "FT"), lrs=(0.1,), method_lrs=(
        ("rl", (0.003, 0.03)), ("GA", (0.001,)), ("SCRUB", (0.5,)))))
    assert cfg.lrs_of("RL") == (0.003, 0.03) and cfg.lrs_of("ga") == (0.001,)
    assert cfg.lrs_of("FT") == (0.1,)  # no entry: lrs
    assert StudyConfig(lrs=None).lrs_of("FT") == (None,)  # the recipe's
    # resolved: canonical names, entries of methods not run dropped
    assert cfg.resolved().method_lrs == (("RL", (0.003, 0.03)), ("GA", (0.001,)))
    assert StudyConfig().method_lrs == ()
    with pytest.raises(ValueError, match="unknown method"):
        StudyConfig(method_lrs={"Nope": (0.1,)}).resolved()
    with pytest.raises(ValueError, match="twice"):
        StudyConfig(method_lrs=(("RL", (0.1,)), ("rl", (0.2,)))).resolved()
    with pytest.raises(ValueError, match="positive"):
        StudyConfig(method_lrs={"RL": ()}).resolved()
    with pytest.raises(ValueError, match="positive"):
        StudyConfig(method_lrs={"RL": (0.1, -1.0)}).resolved()
    with pytest.raises(ValueError, match="workers"):
        StudyConfig(workers=0).resolved()


def test_batch_size_and_forget_defaults_per_data_set():
    assert StudyConfig(dataset="digits").resolved().batch_size == 64
    assert StudyConfig(dataset="mnist1d").resolved().batch_size == 128
    assert StudyConfig(dataset="cifar10").resolved().batch_size is None  # each method's recipe
    assert StudyConfig(dataset="mnist1d", batch_size=32).resolved().batch_size == 32
    assert study.default_forget("digits") == "class:3"
    assert study.default_forget("mnist1d") == "random:0.1"
    assert study.default_forget("cifar10") == "random:0.1"
    # the main job has learning rates for every default method on both data sets
    for dataset in ("digits", "mnist1d"):
        assert set(study.MAIN_JOB_LRS[dataset]) == set(study.DEFAULT_METHODS)
        assert all(lrs and all(lr > 0 for lr in lrs) for lrs in study.MAIN_JOB_LRS[dataset].values())


def _comparable(run):
    # everything a run records except its timing
    return {k: v for k, v in run.items() if k != "runtime_s"}


def test_parallel_runs_equal_sequential_runs_and_method_lrs_are_honoured(tmp_path, monkeypatch):
    # The suite runs with one torch thread (conftest), as every worker does: floats can differ
    # across thread counts, not across processes.
    assert torch.get_num_threads() == 1
    cfg = StudyConfig(dataset="digits", forget="class:3", methods=("RL", "GA"), lrs=(0.01,),
                      method_lrs={"GA": (0.002, 0.005)}, seeds=(0, 1), epochs=1, train_epochs=2,
                      cache_dir=str(tmp_path / "cache"), trace_points=3)
    seq = run_study(cfg, progress=False, log=lambda s: None)
    par = run_study(replace(cfg, workers=2), progress=False, log=lambda s: None)
    assert seq["environment"]["workers"] == 1 and par["environment"]["workers"] == 2
    assert par["environment"]["worker_threads"] == 1
    # the sequential order: method, lr, mask, seed, with GA at exactly its own learning rates
    expected = [(m, lr, mask, seed) for m, lrs in (("RL", (0.01,)), ("GA", (0.002, 0.005)))
                for lr in lrs for mask in ("plain", "masked") for seed in (0, 1)]
    for result in (seq, par):
        assert [(r["method"], r["lr"], r["mask"], r["seed"]) for r in result["runs"]] == expected
    assert [_comparable(r) for r in par["runs"]] == [_comparable(r) for r in seq["runs"]]
    assert [_comparable(r) for r in par["summary"]] == [_comparable(r) for r in seq["summary"]]

    # One run recomputed by hand from the cached reference models: the GA masked run of seed 1.
    data = load_dataset("digits")
    split = make_split(data, "class:3")
    cache = ModelCache(tmp_path / "cache")
    train = replace(default_train_config("digits"), epochs=2)
    original, rec = reference_model("original", split, "mlp", config=train, seed=1, cache=cache,
                                    progress=False)
    retrain, rec2 = reference_model("retrain", split, "mlp", config=train, seed=1, cache=cache,
                                    progress=False)
    assert rec["cached"] and rec2["cached"]  # the study's own models
    res = run_unlearning(copy.deepcopy(original), get_method("GA", epochs=1, batch_size=64), split,
                         masked=True, lr=0.005, seed=1)
    run = next(r for r in par["runs"]
               if (r["method"], r["lr"], r["mask"], r["seed"]) == ("GA", 0.005, "masked", 1))
    assert run["metrics"] == res.metrics.as_dict()
    assert run["gap"] == avg_gap(res.metrics, evaluate(retrain, split))
    assert run["steps"] == res.steps == 3  # 146 forget samples in batches of 64
    assert run["trace"] is None  # only the first seed is traced
    first = next(r for r in par["runs"] if r["seed"] == 0)
    assert first["trace"][0]["step"] == 0 and first["trace"][-1]["step"] == first["steps"]


def test_report_header_names_each_methods_learning_rates_and_workers():
    result = _result()
    md = markdown_report(result)
    assert ("Learning rates per method: RL 0.003, 0.01, 0.03, 0.1; GA 0.01, 0.1; FT 0.01; "
            "SalUn 0.01; NegGrad+ 0.1.") in md
    at_001 = [r for r in result["summary"] if r["lr"] == 0.01]
    same = dict(result, summary=at_001, best_lr=best_lr_table(at_001), comparison=compare_masks(at_001))
    assert "Learning rates 0.01 for every method." in markdown_report(same)
    result["environment"].update(workers=2, worker_threads=1)
    assert "torch 9.9.9, 2 worker processes of 1 thread each." in markdown_report(result)
    # the first table is the best-learning-rate comparison
    first_table = md.index("\n|")
    assert md.index("## Best learning rate per method") < first_table < md.index("## Reference models")


def test_combined_report_has_one_section_per_data_set_best_lr_table_first():
    digits = _result()
    other = json.loads(json.dumps(_result()))
    other["data"].update(dataset="mnist1d", forget="random:0.1")
    md = combined_report({"digits": digits, "mnist1d": other}, wall_time_s=42.0)
    assert md.startswith("# Unlearning studies: digits (forget `class:3`), mnist1d (forget `random:0.1`)\n")
    assert "2 studies in 42 s." in md
    # RL and FT are compared (GA has no masked best; SalUn no plain; NegGrad+ all diverged)
    assert "- digits, forget `class:3`: masked is better at its best learning rate for 1 of 2 methods." in md
    starts = [md.index("\n## Unlearning study: digits, forget `class:3`\n"),
              md.index("\n## Unlearning study: mnist1d, forget `random:0.1`\n")]
    assert starts[0] < starts[1]
    for start, end, name in ((starts[0], starts[1], "digits"), (starts[1], len(md), "mnist1d")):
        section = md[start:end]
        assert section.index("\n|") > section.index("\n### Best learning rate per method: " + name)
        assert section.index("\n|") < section.index("\n### Reference models")
        assert "\n# " not in section and "\n## Reference" not in section
    assert md.count("| RL | 0.01: 8.61 ± 1.20 | **0.03: 6.60 ± 0.90** |") == 2
