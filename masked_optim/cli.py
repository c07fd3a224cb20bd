"""Command line: ``masked-optim [unlearn] [options]`` and ``masked-optim methods``.

With no arguments it runs the main job: the default study on two data sets, scikit-learn's digits
(forget class 3) and MNIST-1D (forget a random 10 %), every method plain and masked at its
learning rates of :data:`~masked_optim.workbench.study.MAIN_JOB_LRS`, seeds 0, 1, 2, the runs in
two worker processes (a few minutes on a 2-core CPU). It writes ``digits/`` and ``mnist1d/``
(each ``results.md``, ``results.json`` and plots) and a combined ``results.md`` (one section per
data set, each opening with the methods' best-learning-rate comparison, plain versus masked) and
``results.json`` (the studies under their data sets' names) to ``./masked_optim_results``; the
combined Markdown is also printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

__all__ = ["DEFAULT_DATASETS", "DEFAULT_SEEDS", "MASK_FLAGS", "build_parser", "config_from_args",
           "configs_from_args", "default_workers", "main", "mask_options_from_args"]

_SUBCOMMANDS = ("unlearn", "methods")

#: The data sets and seeds of ``masked-optim`` without options (the main job).
DEFAULT_DATASETS = ("digits", "mnist1d")
DEFAULT_SEEDS = (0, 1, 2)


def _csv(kind: type) -> object:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s: {text!r}") from err
    return parse


def _float_or_none(text: str) -> float | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number or 'none': {text!r}") from err


def _lrs(text: str) -> tuple[float, ...] | str:
    # "recipe" stays a string: None is the default, "not given" (the main job's learning rates)
    if text.strip().lower() == "recipe":
        return "recipe"
    lrs = _csv(float)(text)  # type: ignore[operator]
    if not lrs:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates: {text!r}")
    return lrs  # type: ignore[no-any-return]


def _datasets(text: str) -> tuple[str, ...]:
    from .workbench.data import DATASETS

    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in DATASETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown data set(s) {', '.join(bad) or repr(text)}; choose from {', '.join(DATASETS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a data set is named twice: {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer: {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer: {text!r}")
    return value


def default_workers() -> int:
    """``--workers`` when not given: 2, or 1 on a 1-CPU machine."""
    return min(2, os.cpu_count() or 1)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: None)" says nothing: options whose default is None explain it in their help, as
    # do those whose help names its default; a tuple default reads as the comma list it parses from.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        if isinstance(action.default, tuple):
            return f"{action.help} (default: {','.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)


#: argparse destination -> optimizer keyword of the mask options of ``unlearn``; a flag not given
#: is not passed, so the optimizer's own default applies.
MASK_FLAGS = {
    "confidence": "confidence", "forget_confidence": "forget_confidence",
    "retain_confidence": "retain_confidence", "quantile": "quantile", "soft": "soft",
    "rescale": "rescale", "rescale_scope": "rescale_scope", "max_scale": "max_scale",
    "certify": "certify", "certify_policy": "certify_policy", "retain_guard": "retain_guard",
}


def _add_mask_flags(u: argparse.ArgumentParser) -> None:
    g = u.add_argument_group(
        "mask of the masked runs",
        "Keyword arguments of ProbablyAlignedSGD/Adam for the masked runs. A flag not given is not "
        "passed: the optimizer's own default applies (see its documentation). The plain runs use "
        "confidence=None, forget_confidence=None, retain_confidence=None, i.e. torch.optim.")
    g.add_argument("--confidence", type=float, default=None,
                   help="confidence of both alignment tests")
    g.add_argument("--forget-confidence", type=float, default=None,
                   help="confidence of the forget-side test (overrides --confidence)")
    g.add_argument("--retain-confidence", type=float, default=None,
                   help="confidence of the retain-side test (overrides --confidence)")
    g.add_argument("--quantile", choices=("normal", "t"), default=None,
                   help="threshold quantile of the tests: normal or Student-t")
    g.add_argument("--soft", action=argparse.BooleanOptionalAction, default=None,
                   help="soft mask (weights Φ(z − q)) or, with --no-soft, the 0/1 mask")
    g.add_argument("--rescale", choices=("none", "count", "norm"), default=None,
                   help="masked step length: none (lr·m⊙u as it is), count (÷ kept fraction) or "
                        "norm (the unmasked update's norm)")
    g.add_argument("--rescale-scope", choices=("tensor", "group", "global"), default=None,
                   help="what one rescaling factor covers")
    g.add_argument("--max-scale", type=float, default=None, help="cap of the rescaling factor")
    g.add_argument("--retain-guard", type=_float_or_none, default=None, metavar="NATS|none",
                   help="back a masked step off while it raises the retain batch's loss by more than this; "
                        "'none' turns the guard off")
    g.add_argument("--certify", type=float, default=None,
                   help="confidence of the whole-update test; each masked step is checked on an "
                        "independent retain batch, disjoint from the step's")
    g.add_argument("--certify-policy", choices=("tighten", "skip"), default=None,
                   help="what a step that fails the whole-update test does")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``masked-optim``."""
    from .workbench.data import DATASETS
    from .workbench.models import ARCHS
    from .workbench.study import StudyConfig

    d = StudyConfig()
    parser = argparse.ArgumentParser(
        prog="masked-optim",
        description="Machine-unlearning workbench for probably-aligned masked optimizers. "
                    "Without a subcommand, runs `unlearn`; with no arguments at all, its defaults: "
                    "every method plain and masked, 3 seeds, on digits (forget class 3) and "
                    "MNIST-1D (forget a random 10 %), results in ./masked_optim_results.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"masked-optim {__version__}")
    sub = parser.add_subparsers(dest="command")

    u = sub.add_parser(
        "unlearn", help="train/load the original and retrained models, run every method masked "
                        "and plain, write a results folder (the default command)",
        description="Train (or load from the cache) the original model and the model retrained "
                    "without the forget set, run every unlearning method with and without the "
                    "probably-aligned mask at every learning rate and seed, and write results.md, "
                    "results.json and PNG plots per data set (OUT/<dataset>/) and a combined "
                    "results.md and results.json (OUT/). The defaults are the main job: digits "
                    "(forget class 3) and MNIST-1D (forget a random 10 %), seeds 0, 1, 2, each "
                    "method at its main-job learning rates, the runs in (up to) 2 worker processes.",
        formatter_class=_Formatter)
    g = u.add_argument_group("data")
    g.add_argument("--dataset", type=_datasets, default=DEFAULT_DATASETS,
                   help="comma-separated data sets, one study each, among: "
                        f"{', '.join(DATASETS)}. digits is embedded (scikit-learn) and mnist1d is "
                        "generated locally (mnist1d package); the others are read from "
                        "--data-root, never downloaded")
    g.add_argument("--data-root", default=os.environ.get("MASKED_OPTIM_DATA", "./data"),
                   help="folder holding cifar-10-batches-py/, cifar-100-python/, MNIST/raw/, "
                        "FashionMNIST/raw/, or train/ and test/ class folders for imagefolder "
                        "(default: $MASKED_OPTIM_DATA or ./data)")
    g.add_argument("--forget", default=None,
                   help="random:FRACTION, random:COUNT or class:C[,C...], for every data set "
                        "(default: class:3 for digits, random:0.1 for mnist1d and the others)")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="seed of the digits train/test split and of random forget selection")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="test share of the digits split")
    g = u.add_argument_group("models")
    g.add_argument("--model", choices=ARCHS, default=None,
                   help="default: mlp for digits and mnist1d, cnn for (Fashion)MNIST, resnet18 "
                        "otherwise")
    g.add_argument("--norm", choices=("batch", "group"), default=d.norm,
                   help="normalisation layers of resnet18")
    g.add_argument("--train-epochs", type=int, default=None,
                   help="epochs of the original/retrained models (default: per dataset)")
    g.add_argument("--cache-dir", default=None,
                   help="where trained models (and the generated MNIST-1D) are kept (default: "
                        "$MASKED_OPTIM_CACHE or ~/.cache/masked_optim)")
    g.add_argument("--no-cache", action="store_true", help="always train, never store")
    g = u.add_argument_group("unlearning")
    g.add_argument("--methods", type=_csv(str), default=d.methods,
                   help="comma-separated: FT, GA, NegGrad+, RL, SalUn, l1-sparse, SCRUB")
    g.add_argument("--mask", choices=("both", "plain", "masked"), default="both",
                   help="run the methods with the probably-aligned mask, without, or both")
    g.add_argument("--lrs", type=_lrs, default=None,
                   help="comma-separated learning rates for every method and data set, or "
                        "'recipe' for each method's own (default: each method's main-job "
                        "learning rates on digits and mnist1d, see MAIN_JOB_LRS in "
                        "masked_optim/workbench/study.py; "
                        f"{','.join(f'{lr:g}' for lr in d.lrs or ())} on the others)")
    g.add_argument("--seeds", type=_csv(int), default=DEFAULT_SEEDS, help="comma-separated seeds")
    g.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    g.add_argument("--batch-size", type=int, default=None,
                   help="override every method's batch size (default: 64 on digits, 128 on "
                        "mnist1d, else each method's recipe)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    _add_mask_flags(u)
    g = u.add_argument_group("output")
    g.add_argument("--out", default="masked_optim_results", help="results folder")
    g.add_argument("--trace-points", type=int, default=d.trace_points,
                   help="forget/retain accuracy points recorded per run of the first seed, for "
                        "the plots (0: none)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--workers", type=_positive_int, default=default_workers(),
                   help="processes for the unlearning runs, each with 1 torch thread on the CPU; "
                        "1 runs them in this process (the results are the same)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of this process: the reference models' training, and "
                        "the runs with --workers 1 (default on the CPU: 1 for digits or with "
                        "--workers above 1, else torch's choice)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list the unlearning methods and their recipes")
    return parser


def _list_methods() -> int:
    from .workbench.methods import METHODS
    from .workbench.study import RECOMMENDED_MASK

    for name, cls in METHODS.items():
        m = cls()
        extra = {k: v for k, v in m.hyperparameters().items() if k not in ("epochs", "lr", "batch_size")}
        doc = " ".join((cls.__doc__ or "").split()).split(". ")[0]
        print(f"{name:10s} epochs={m.epochs} lr={m.lr:g} batch={m.batch_size} "
              + " ".join(f"{k}={v}" for k, v in extra.items()).rstrip())
        print(f"{'':10s} {doc}")
        rec = RECOMMENDED_MASK.get(name)
        if rec is not None:
            opts = ", ".join(f"{k}={v!r}" for k, v in rec["options"].items()) or "the defaults"
            lrs = ", ".join(f"lr {lr:g} on {ds}" for ds, lr in rec["lr"].items())
            print(f"{'':10s} recommended mask: {opts} ({lrs}; benchmarks/results/defaults_study)")
    return 0


def mask_options_from_args(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """The mask options of the flags given, in :data:`MASK_FLAGS` order; ``--rescale none``
    gives ``("rescale", None)``."""
    options: list[tuple[str, object]] = []
    for dest, key in MASK_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if value == "none" and dest in ("rescale", "retain_guard"):
            value = None
        options.append((key, value))
    return tuple(options)


def _lr_settings(args: argparse.Namespace, dataset: str, methods: Sequence[str]):
    # (lrs, method_lrs) of a data set's study: --lrs for every method when given, else the main
    # job's per-method learning rates where the data set has them, else StudyConfig's lrs.
    from .workbench.study import MAIN_JOB_LRS, StudyConfig

    if args.lrs == "recipe":
        return None, ()
    if args.lrs is not None:
        return tuple(args.lrs), ()
    table = MAIN_JOB_LRS.get(dataset, {})
    from .workbench.methods import get_method

    wanted = {get_method(m).name for m in methods}
    return StudyConfig().lrs, tuple((m, lrs) for m, lrs in table.items() if get_method(m).name in wanted)


def config_from_args(args: argparse.Namespace, dataset: str | None = None):  # -> StudyConfig
    """The :class:`~masked_optim.workbench.study.StudyConfig` of parsed ``unlearn`` arguments for
    ``dataset`` (default: the first of ``--dataset``)."""
    from .workbench.study import StudyConfig, default_forget

    datasets = args.dataset if isinstance(args.dataset, tuple) else (args.dataset,)
    dataset = datasets[0] if dataset is None else dataset
    masks = ("plain", "masked") if args.mask == "both" else (args.mask,)
    lrs, method_lrs = _lr_settings(args, dataset, args.methods)
    return StudyConfig(
        dataset=dataset, data_root=args.data_root,
        forget=args.forget if args.forget is not None else default_forget(dataset),
        model=args.model, norm=args.norm, methods=tuple(args.methods), masks=masks, lrs=lrs,
        method_lrs=method_lrs, seeds=tuple(args.seeds), epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=args.weight_decay, mask_options=mask_options_from_args(args),
        split_seed=args.split_seed, test_fraction=args.test_fraction,
        train_epochs=args.train_epochs, cache_dir=args.cache_dir, use_cache=not args.no_cache,
        trace_points=args.trace_points, device=args.device, workers=args.workers)


def configs_from_args(args: argparse.Namespace) -> list:  # -> list[StudyConfig]
    """One :class:`~masked_optim.workbench.study.StudyConfig` per data set of ``--dataset``."""
    return [config_from_args(args, name) for name in args.dataset]


def _unlearn(args: argparse.Namespace) -> int:
    import torch

    from .workbench.report import combined_report, write_combined, write_results
    from .workbench.study import run_study

    configs = configs_from_args(args)
    for cfg in configs:  # every choice checked before the first model is trained
        cfg.resolved()
    start = time.perf_counter()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    threads = torch.get_num_threads()
    results = {}
    try:
        for cfg in configs:
            if args.threads:
                torch.set_num_threads(args.threads)
            elif args.device == "cpu" and (cfg.dataset == "digits" or args.workers > 1):
                # The digits models multiply 64x256 matrices: extra threads only add
                # synchronisation, which costs up to 10x on a loaded 2-core machine. With workers
                # (one thread each) the reference models are trained with one thread too: the
                # MNIST-1D MLP trains in seconds on one, in minutes on two busy ones.
                torch.set_num_threads(1)
            else:
                torch.set_num_threads(threads)
            results[cfg.dataset] = run_study(cfg, progress=not args.quiet, log=log)
            write_results(results[cfg.dataset], os.path.join(args.out, cfg.dataset))
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    paths = write_combined(results, args.out, wall_time_s=wall)
    print(combined_report(results, wall_time_s=wall))
    print(f"Results in {args.out}: " + ", ".join(p.name for p in paths.values())
          + ", " + ", ".join(f"{name}/" for name in results)
          + f" ({time.perf_counter() - start:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``masked-optim`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `masked-optim` alone, or with options only, means `masked-optim unlearn ...`.
    if not argv or (argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["unlearn", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _list_methods()
    try:
        return _unlearn(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"masked-optim: error: {err}", file=sys.stderr)
        return 2
