"""Has the step become dearer? ``bench_step.py`` on two commits, in alternating fresh processes.

Each commit is exported (``git archive``) to a scratch folder and timed by ``benchmarks/bench_step.py``
(``--engine hooks --no-memory``), with the package imported from that folder. ``--harness`` says whose
``bench_step.py`` (and ``_common.py``) times it: ``own`` (each commit its own), or ``base`` / ``head``
(one harness for both packages, so that only the package differs: a harness that interleaves another
variant, say, moves the ratios by itself; the base's harness runs any later package, it uses only the
public API). The runs alternate in pairs whose order flips every pair (base, head; head, base; ...), so a
slow drift of a shared machine hits both commits alike. Per model and ratio (b/a: the masked step
against a plain NegGrad+ step; c/a: the same after the caller's backward; c/af: against the plain
step with torch's ``SGD(fused=True)``, where the commit's harness has it) the JSON holds every run's
value and a paired summary: the means, head / base, and a 95 % Student-t interval of the mean
paired difference head − base relative to the base mean. ``worse_beyond_noise`` is true when
that interval lies above 0.

Only committed code is timed (uncommitted changes of the working tree are not).

    python benchmarks/ab_step.py --base 9e44930 --head HEAD --pairs 10 --models mlp --harness base --out benchmarks/results
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from masked_optim import student_t_quantile  # noqa: E402

RATIOS = ("b/a", "c/a", "c/af")
#: the commit before issue 15's work (and issues 13 and 14, filed with it): its "today"
DEFAULT_BASE = "9e44930"


def resolve(rev: str, repo: Path) -> str:
    """The full commit id of ``rev``."""
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()


def export(commit: str, repo: Path, dest: Path) -> Path:
    """The tree of ``commit`` written to ``dest`` (``git archive``)."""
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit],
                         capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse members that leave dest
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover
            tf.extractall(dest)
    return dest


def extract(step: dict[str, Any], model: str) -> dict[str, float]:
    """The ratios and the plain and masked step times (ms) of ``model`` in a ``bench_step`` JSON."""
    m = step["models"][model]
    ratios = m["ratios"].get("hooks", m["ratios"])
    out = {k: ratios[k]["median"] for k in RATIOS if k in ratios}
    out["a_ms"] = m["timing"]["a"]["median_s"] * 1e3
    b = next(k for k in m["timing"] if k.startswith("b"))
    out["b_ms"] = m["timing"][b]["median_s"] * 1e3
    return out


def paired_summary(base: Sequence[float], head: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Means of both, head / base, and the ``level`` Student-t interval of the mean paired difference
    (head − base) relative to the base mean; ``worse_beyond_noise``: the interval lies above 0."""
    if len(base) != len(head) or not base:
        raise ValueError(f"paired_summary needs two equally long, non-empty lists, got {len(base)} and {len(head)}")
    diffs = [h - b for b, h in zip(base, head)]
    mb, mh = statistics.fmean(base), statistics.fmean(head)
    out: dict[str, Any] = {"n": len(diffs), "base_mean": mb, "head_mean": mh, "head_over_base": mh / mb,
                           "base_median": statistics.median(base), "head_median": statistics.median(head)}
    if len(diffs) < 2:
        out.update(relative_diff_interval=None, worse_beyond_noise=None)
        return out
    half = student_t_quantile(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    lo, hi = (mean - half) / mb, (mean + half) / mb
    out.update(relative_diff=mean / mb, relative_diff_interval=[lo, hi], interval_level=level,
               worse_beyond_noise=lo > 0)
    return out


def summarise(runs: list[dict[str, Any]], models: Sequence[str], pairs: int) -> dict[str, Any]:
    """Per model and key (the ratios, ``a_ms``, ``b_ms``): :func:`paired_summary` of the base and
    head runs of each pair (pairs where either run lacks the key are left out)."""
    measured = {(r["pair"], r["side"]): r["models"] for r in runs}
    summary: dict[str, Any] = {}
    for m in models:
        summary[m] = {}
        for key in (*RATIOS, "a_ms", "b_ms"):
            both = [(measured[i, "base"][m].get(key), measured[i, "head"][m].get(key)) for i in range(pairs)]
            both = [(b, h) for b, h in both if b is not None and h is not None]
            if both:
                summary[m][key] = paired_summary([b for b, _ in both], [h for _, h in both])
    return summary


HARNESSES = ("own", "base", "head")


def bench_command(roots: dict[str, Path], side: str, harness: str, models: Sequence[str], out: Path,
                  threads: int | None = None) -> tuple[list[str], Path, dict[str, str]]:
    """The command, working folder and environment of one ``bench_step`` run: the package of
    ``roots[side]``, timed by the harness of ``roots[side]`` (``harness="own"``) or of ``roots[harness]``."""
    if harness not in HARNESSES:
        raise ValueError(f"harness must be one of {HARNESSES}, got {harness!r}")
    script = roots[side if harness == "own" else harness] / "benchmarks" / "bench_step.py"
    cmd = [sys.executable, str(script), "--models", ",".join(models), "--engine", "hooks", "--no-memory",
           "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    # the package from the side's tree: PYTHONPATH comes before the installed (editable) package
    return cmd, roots[side], {**os.environ, "PYTHONPATH": str(roots[side])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.pairs < 1:
        raise SystemExit("--pairs must be at least 1")
    repo = Path(args.repo).resolve()
    t_start = time.perf_counter()
    commits = {"base": resolve(args.base, repo), "head": resolve(args.head, repo)}
    models = C.parse_list(args.models, ["mlp"])
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ab_step_") as tmp:
        roots = {k: export(c, repo, Path(tmp) / k) for k, c in commits.items()}
        for i in range(args.pairs):
            for side in (("base", "head") if i % 2 == 0 else ("head", "base")):
                out = Path(tmp) / f"out_{side}_{i}"
                cmd, cwd, env = bench_command(roots, side, args.harness, models, out, args.threads)
                C.log_to_stderr(f"[ab_step] pair {i + 1}/{args.pairs}: {side} {commits[side][:10]}")
                proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"bench_step on {side} {commits[side][:10]} exited {proc.returncode}: "
                                       f"{(proc.stderr or proc.stdout)[-800:]}")
                step = json.loads((out / "step.json").read_text())
                runs.append({"pair": i, "side": side, "commit": commits[side],
                             "threads": step["machine"].get("torch_threads"),
                             "models": {m: extract(step, m) for m in models}})
    summary = summarise(runs, models, args.pairs)
    return C.bench_payload(
        "ab_step", C.machine_info("cpu"), t_start,
        {"base": args.base, "head": args.head, "commits": commits, "pairs": args.pairs, "models": models,
         "threads": args.threads, "engine": "hooks", "harness": args.harness,
         "order": "alternating pairs, order flipped every pair; "
                  + ("each commit timed by its own bench_step.py" if args.harness == "own"
                     else f"both commits' packages timed by the {args.harness} commit's bench_step.py"),
         "note": "a_ms, b_ms: medians of each run (absolute times drift with the machine's load; the "
                 "ratios are what is compared)"},
        runs=runs, summary=summary)


def table(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    harness = cfg.get("harness", "own")
    rows = [f"base {cfg['commits']['base'][:10]} ({cfg['base']}), head {cfg['commits']['head'][:10]} "
            f"({cfg['head']}), {cfg['pairs']} alternating pairs, "
            + ("each commit's own bench_step.py" if harness == "own" else f"the {harness} commit's bench_step.py for both"),
            "", "| model | ratio | base runs | head runs | base mean | head mean | head / base | 95 % interval of "
            "(head − base) / base | worse beyond noise |", "|---|---|---|---|---|---|---|---|---|"]
    for m, keys in payload["summary"].items():
        for key in RATIOS:
            if key not in keys:
                continue
            s = keys[key]
            vals = {side: [r["models"][m][key] for r in payload["runs"] if r["side"] == side and key in r["models"][m]]
                    for side in ("base", "head")}
            iv = s.get("relative_diff_interval")
            ivs = "–" if iv is None else f"{100 * iv[0]:+.1f} % to {100 * iv[1]:+.1f} %"
            rows.append(f"| {m} | {key} | {', '.join(f'{v:.2f}' for v in vals['base'])} | "
                        f"{', '.join(f'{v:.2f}' for v in vals['head'])} | {s['base_mean']:.3f} | {s['head_mean']:.3f} | "
                        f"{s['head_over_base']:.3f} | {ivs} | {s.get('worse_beyond_noise')} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE, help=f"the earlier commit (default {DEFAULT_BASE})")
    p.add_argument("--head", default="HEAD", help="the later commit (default HEAD)")
    p.add_argument("--pairs", type=int, default=10, help="alternating pairs of runs (default 10)")
    p.add_argument("--models", default="mlp", help="bench_step models, comma-separated (default mlp)")
    p.add_argument("--harness", default="own", choices=HARNESSES,
                   help="whose bench_step.py times both packages: each commit's own (default), the base's or the head's")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: bench_step's)")
    p.add_argument("--repo", default=str(C.HERE.parent), help="the git repository (default: this checkout)")
    p.add_argument("--out", type=Path, default=None, help="results folder for ab_step.json")
    p.set_defaults(quick=False)  # C.bench_main's thread rule reads it; every run here is a full one
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return C.bench_main(argv, build_parser, run, table, "ab_step.json")


if __name__ == "__main__":
    main()
