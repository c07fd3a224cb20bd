"""Run every benchmark and write the JSON results and a Markdown summary.

    python benchmarks/run_all.py                 # full CPU run -> benchmarks/results/*.json + benchmarks/README.md
    python benchmarks/run_all.py --quick         # seconds; what the test suite runs (-> benchmarks/results/quick/)
    python benchmarks/run_all.py --device cuda   # full GPU run -> benchmarks/results/cuda/*.json (+ README)

Each benchmark runs in this process, one after the other (the step and statistics benchmarks start
a fresh subprocess per variant for CPU peak memory); a benchmark that fails is reported in
``run_all.json`` and in the summary, and the others still run. ``--out DIR`` writes everything
(JSON and ``SUMMARY.md``) under DIR; ``benchmarks/README.md`` is rewritten only by full runs into the
default results folder (or when ``--readme`` names a file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402
import bench_kernel  # noqa: E402
import bench_quality  # noqa: E402
import bench_stats  # noqa: E402
import bench_step  # noqa: E402

BENCHES = {"step": bench_step, "stats": bench_stats, "kernel": bench_kernel, "quality": bench_quality}
TITLES = {
    "step": "Step microbenchmark (ratios to the plain NegGrad+ step)",
    "stats": "Statistics engines (time as a multiple of one plain forward+backward; error vs float64 loop)",
    "kernel": "Mask + update kernel (median time and achieved bandwidth)",
    "quality": "Quality sweep (workbench; mean ± std over seeds)",
}


def default_out(device: str, quick: bool) -> Path:
    base = C.DEFAULT_RESULTS
    if device.startswith("cuda"):
        base = base / "cuda"
    return base / "quick" if quick else base


def machine_line(m: dict[str, Any]) -> str:
    parts = [f"CPU: {m.get('cpu_model')} ({m.get('cpu_count')} logical CPUs, {m.get('mem_total_gib')} GiB)"]
    if m.get("gpu_name"):
        parts.insert(0, f"GPU: {m['gpu_name']} ({m.get('gpu_memory_gib')} GiB)")
    parts.append(f"torch {m.get('torch')} ({m.get('torch_threads')} threads)")
    parts.append(f"date {m.get('date')}")
    parts.append(f"load average at start {m.get('loadavg_1_5_15')}")
    return "; ".join(parts)


def summary_markdown(results: dict[str, dict[str, Any]], status: dict[str, Any], title: str) -> str:
    lines = [f"## {title}", ""]
    first = next((r for r in results.values() if r and "machine" in r), None)
    if first:
        lines += [f"Machine — {machine_line(first['machine'])}.", "", f"_{C.NOISE_NOTE}_", ""]
    for name, payload in results.items():
        lines += [f"### {TITLES[name]}", ""]
        st = status.get(name, {})
        if st.get("error"):
            lines += [f"Failed: `{st['error']}`", ""]
            continue
        lines += [BENCHES[name].table(payload), "",
                  f"(`{name}.json`, {payload.get('machine', {}).get('date')}, "
                  f"{payload.get('machine', {}).get('torch_threads')} thread(s); {payload.get('seconds', 0):.0f} s; "
                  f"load average at start {payload.get('machine', {}).get('loadavg_1_5_15')})", ""]
    return "\n".join(lines)


def _load_results(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in BENCHES:
        f = folder / f"{name}.json"
        if f.exists():
            try:
                out[name] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return out


README_HEAD = """\
# Benchmarks

Speed, memory and quality of the probably-aligned optimizers. Everything is produced by

```bash
python benchmarks/run_all.py            # full CPU run (~10-15 min on 2 cores) -> results/*.json + this file
python benchmarks/run_all.py --quick    # a few seconds per benchmark; the test suite runs this
bash benchmarks/gpu.sh                  # full GPU run in one go (a few minutes) -> results/cuda/*.json
DEVICE=cpu bash benchmarks/gpu.sh --quick   # dry run of the GPU script on CPU
```

Each script also runs alone (`python benchmarks/bench_step.py --help`, etc.) and takes `--quick`,
`--device`, `--repeats`, `--threads` and `--out DIR`.

| script | what it measures |
|---|---|
| `bench_step.py` | one unlearning step on an MLP (64-256-256-10, B=128), a small CNN (3×32×32, B=64), torchvision ResNet-18 with GroupNorm (3×32×32, B=16 on CPU, 128 on GPU), a wide MLP (2048-4096-2048, 16.8 M parameters, B=4: the mask + update dominates) and the tiny HF models: (a) plain NegGrad+ forward+backward on a forget and a retain batch + `torch.optim.SGD` step; (b) `ProbablyAlignedSGD.step(forget=, retain=)` with its default direction (no backward by the caller); (c) the caller's backward, then the same step. Ratios b/a and c/a for every statistics engine (`--engine vmap,hooks`), and peak memory per variant. |
| `bench_stats.py` | per-sample gradient mean and M2: a plain per-sample loop, `VmapEngine`, the hook engine, and, when installed, Opacus `GradSampleModule` and BackPACK `Variance` — time as a multiple of one plain forward+backward, peak memory, max relative error against the per-sample loop in float64, and how many parameters each covers. |
| `bench_kernel.py` | the elementwise part of a step alone, on 10⁶ and 10⁷ parameters (10⁸ on GPU): `torch.optim.SGD/Adam` with `foreach=True` and `fused=True`, the optimizers' eager path (`masked_sgd`/`masked_adam` with their mask, unscaled and with `rescale="norm"`) and the compiled kernels of `masked_optim.fused` (the caller's gradient, the statistics direction, `rescale="norm"`), as time, ratios and achieved GB/s (the step's minimal bytes / time) next to a plain copy; the cold compile time of the fused kernels and their graph count over a learning-rate schedule. |
| `bench_quality.py` | the workbench study: methods × {plain, masked} × learning rates × seeds on scikit-learn's digits (no download), mean ± std of FA, RA, TA, MIA-efficacy and of the average gap to the retrained model. |

Other studies in this folder (e.g. `calibration.py`) have their own commands and sections; `run_all.py`
rewrites only the block between its markers below.

How to read the numbers:

- **Timing.** Variants are timed side by side in one process, after warm-up; every repeat runs
  each variant once, in a rotated order (interleaved), and an inner loop makes one measurement last
  ~0.1–0.3 s. Reported: medians; ratios are the median of the per-repeat ratios (IQR in the JSON).
  On CUDA, CUDA events with synchronisation. No timing is asserted by any test.
- **Peak memory.** CUDA: `torch.cuda.max_memory_allocated` above the allocation before the measured
  calls. CPU: peak RSS (VmHWM, reset just before) above the RSS before the measured calls, after a
  warm-up call, each variant in a fresh subprocess (peak RSS is process-wide and monotone, and freed
  memory kept by the C allocator would hide a second variant's peak). It includes everything the
  call allocates transiently (activations, per-sample gradients, temporaries), not the model or the
  optimizer state.
- **Noise.** The CPU figures come from a shared 2-core virtual machine on which other jobs were
  running: absolute times move by tens of percent between runs; the ratios, measured interleaved,
  are steadier. On a loaded machine, two OpenMP threads competing with other processes can slow
  small kernels tenfold; `--threads 1` is then the steadier choice (the thread count is in every
  JSON and below).
- **Optional comparators.** Opacus and BackPACK are not dependencies of the package. To include
  them: `pip install --no-deps opacus backpack-for-pytorch einops unfoldNd opt_einsum` (check with
  `pip install --dry-run` that torch is left alone); without them those rows are skipped.
"""


BEGIN, END = "<!-- run_all.py: begin (generated, edits inside are overwritten) -->", "<!-- run_all.py: end -->"


def write_readme(path: Path) -> None:
    """Rewrite the generated block of ``path`` (between BEGIN and END) with the latest figures of
    every device; text outside the block (other benchmarks' sections) is kept."""
    sections = [README_HEAD]
    for label, folder in (("CPU", C.DEFAULT_RESULTS), ("GPU", C.DEFAULT_RESULTS / "cuda")):
        results = _load_results(folder)
        if not results:
            continue
        status = {}
        run_info = folder / "run_all.json"
        if run_info.exists():
            try:
                status = json.loads(run_info.read_text()).get("status", {})
            except (OSError, json.JSONDecodeError):
                status = {}
        rel = folder.relative_to(HERE)
        sections.append(summary_markdown(results, status, f"Latest figures — {label} (`{rel}/`)"))
    if len(sections) == 1:
        sections.append("_No full run recorded yet: run `python benchmarks/run_all.py`._\n")
    block = BEGIN + "\n" + "\n".join(sections).rstrip() + "\n" + END
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif old.strip():
        text = old.rstrip() + "\n\n" + block + "\n"
    else:
        text = block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results[/cuda][/quick])")
    p.add_argument("--readme", type=Path, default=None,
                   help="Markdown file to rewrite with the latest figures (default: benchmarks/README.md "
                        "for full runs into the default folder)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--skip", default=None, help="comma-separated benchmarks to leave out")
    p.add_argument("--engine", default=None, help="masked_optim statistics engines (default vmap,hooks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every benchmark")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats for every timing benchmark")
    p.add_argument("--quality-args", default="", help="extra arguments for bench_quality.py, e.g. '--seeds 0,1'")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    out = args.out or default_out(args.device, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    names = C.parse_list(args.only, list(BENCHES))
    skip = set(C.parse_list(args.skip, []))
    unknown = [n for n in names + list(skip) if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    names = [n for n in names if n not in skip]

    common = ["--device", args.device, "--out", str(out)]
    if args.quick:
        common.append("--quick")
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.verbose:
        common.append("--verbose")
    extra = {
        "step": (["--engine", args.engine] if args.engine else []) + (["--repeats", str(args.repeats)] if args.repeats else []),
        "stats": (["--engines", args.engine] if args.engine else []) + (["--repeats", str(args.repeats)] if args.repeats else []),
        "kernel": ["--repeats", str(args.repeats)] if args.repeats else [],
        "quality": args.quality_args.split(),
    }
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    status: dict[str, Any] = {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        try:
            results[name] = BENCHES[name].main(common + extra[name])
            status[name] = {"ok": True, "seconds": time.perf_counter() - t}
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            results[name] = {}
            status[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": tb,
                            "seconds": time.perf_counter() - t}
    total = time.perf_counter() - t0
    # a partial run (--only/--skip) keeps the other benchmarks' latest results in the summary
    previous: dict[str, Any] = {}
    if (out / "run_all.json").exists():
        try:
            previous = json.loads((out / "run_all.json").read_text()).get("status", {})
        except (OSError, json.JSONDecodeError):
            previous = {}
    on_disk = _load_results(out)
    merged_results = {n: results[n] if n in results else on_disk[n] for n in BENCHES if n in results or n in on_disk}
    merged_status = {n: status.get(n) or previous.get(n) or {"ok": True} for n in merged_results}
    C.write_json(out / "run_all.json", {"machine": C.machine_info(args.device), "argv": sys.argv[1:] if argv is None else argv,
                                        "ran": names, "status": merged_status, "seconds": total})
    title = f"Results{' (quick: code check only, not measurements)' if args.quick else ''}"
    summary = summary_markdown(merged_results, merged_status, title)
    (out / "SUMMARY.md").write_text(summary + "\n")
    readme = args.readme
    if readme is None and not args.quick and args.out is None:
        readme = HERE / "README.md"
    if readme is not None:
        write_readme(readme)
    print("\n" + summary)
    print(f"\nwrote {out}/ ({', '.join(sorted(f.name for f in out.iterdir() if f.is_file()))})"
          + (f" and {readme}" if readme else "") + f" in {total:.0f} s")
    return 0 if all(st["ok"] for st in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
