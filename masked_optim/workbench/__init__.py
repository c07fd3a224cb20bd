"""Unlearning workbench: data, models, methods, metrics and studies around the masked optimizers.

It uses only the public API of :mod:`masked_optim`. Typical use::

    from masked_optim.workbench import load_dataset, make_split, get_method, run_unlearning
    split = make_split(load_dataset("digits"), "class:3")
    result = run_unlearning(model, get_method("RL"), split, masked=True, lr=0.01)
    print(result.metrics, result.kept_fraction)

The ``masked-optim`` command (:mod:`masked_optim.cli`) runs whole studies.
"""
from .data import DATASETS, ForgetSpec, ImageDataset, ImageSet, UnlearningSplit, load_dataset, \
    make_split, select_forget
from .methods import FT, GA, METHODS, RL, SCRUB, L1Sparse, NegGradPlus, Phase, SalUn, UnlearningMethod, \
    distill_kl, get_method, saliency_mask
from .metrics import Metrics, accuracy, avg_gap, evaluate, is_collapsed, majority_rate, mia_efficacy, \
    svc_mia_efficacy, true_label_confidence
from .models import ARCHS, MLP, SmallCNN, build_model, resnet18_32
from .report import combined_report, markdown_report, write_combined, write_results
from .runner import BatchStream, RunResult, make_optimizer, run_unlearning
from .study import DEFAULT_FORGET, DEFAULT_METHODS, MAIN_JOB_LRS, StudyConfig, best_lr_table, \
    default_forget, run_study
from .training import ModelCache, TrainConfig, default_cache_dir, reference_model, train_classifier

__all__ = [
    "accuracy", "ARCHS", "avg_gap", "BatchStream", "best_lr_table", "build_model", "combined_report",
    "DATASETS", "default_cache_dir", "DEFAULT_FORGET", "default_forget", "DEFAULT_METHODS", "distill_kl",
    "evaluate",
    "ForgetSpec", "FT", "GA", "get_method", "ImageDataset", "ImageSet", "is_collapsed", "L1Sparse",
    "load_dataset", "MAIN_JOB_LRS", "majority_rate", "make_optimizer",
    "make_split", "markdown_report", "METHODS", "Metrics", "mia_efficacy", "MLP", "ModelCache", "NegGradPlus",
    "Phase", "reference_model", "resnet18_32", "RL", "run_study", "run_unlearning", "RunResult",
    "saliency_mask", "SalUn", "SCRUB", "select_forget", "SmallCNN", "StudyConfig",
    "svc_mia_efficacy", "train_classifier", "TrainConfig", "true_label_confidence",
    "UnlearningMethod", "UnlearningSplit", "write_combined", "write_results",
]
