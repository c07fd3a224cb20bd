"""Study bookkeeping and the report: collapse counts, best learning rates, header, marks."""
import json
import re

import pytest

from masked_optim.workbench import study
from masked_optim.workbench.report import markdown_report
from masked_optim.workbench.study import StudyConfig, best_lr_table, compare_masks, cpu_model, summarise


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
