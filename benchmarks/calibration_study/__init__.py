"""The parts of the calibration study run by ``benchmarks/calibration.py`` (its entry point):

    core.py            confidence levels, quantiles, the pooled rate counter, the mask of one constraint
    digits.py          the digits problems (data, trained MLP, splits, batch sampling, evaluation)
    per_coordinate.py  (a) the per-coordinate test: synthetic, logistic regression, digits
    certificate.py     (b) the whole-update certificate
    unlearning.py      (c) kept fraction and unlearning speed vs confidence
    report.py          calibration.md
    plots.py           calibration_{a,b,c}.png
"""
