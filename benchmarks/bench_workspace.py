"""What the step workspace (``reuse_buffers``, masked_optim/workspace.py) buys and costs on CPU.

For each model, the default masked step with the caller's backward first ("c") and without ("b"),
once with ``reuse_buffers=True`` (the CPU default) and once with ``reuse_buffers=False`` (every
temporary allocated afresh): timed side by side in one process (interleaved repeats, medians), and,
each in a fresh process after 4 steps, the minor page faults of one step, the process's peak RSS
(VmHWM) and its RSS between steps, and the bytes the workspace holds between steps.

    python benchmarks/bench_workspace.py [--models resnet18,wide] [--repeats 7] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_step as BS  # noqa: E402

KINDS = ("b", "c")


def _variant(model_name: str, batch: int, kind: str, reuse: bool, base: Any, forget: Any, retain: Any) -> Any:
    engine, _ = C.resolve_engine("hooks")
    fn = BS.make_variant(kind, engine, base, forget, retain)
    fn.opt.reuse_buffers = reuse
    return fn


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh-process memory and page faults of one variant after 4 steps."""
    torch.set_num_threads(spec["threads"])
    base, forget, retain = BS._setup(spec["model"], spec["batch"], torch.device("cpu"))
    fn = _variant(spec["model"], spec["batch"], spec["kind"], spec["reuse"], base, forget, retain)
    for _ in range(3):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    st = C.proc_status_kib()
    return {"minor_page_faults_per_step": faults, "peak_rss_mib": st.get("VmHWM", 0) / 1024,
            "rss_between_steps_mib": st.get("VmRSS", 0) / 1024,
            "workspace_mib_between_steps": fn.opt.workspace.nbytes / 2**20}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = torch.device("cpu")
    machine = C.machine_info(device)
    models = C.parse_list(args.models, ["mlp"] if args.quick else ["resnet18", "wide"])
    repeats = args.repeats or (2 if args.quick else 7)
    out: dict[str, Any] = {}
    for name in models:
        batch = args.batch or C.default_batch(name, device)
        if args.quick:
            batch = min(batch, BS.QUICK_BATCH[name])
        base, forget, retain = BS._setup(name, batch, device)
        fns = {f"{kind}[{'reuse' if reuse else 'fresh'}]": _variant(name, batch, kind, reuse, copy.deepcopy(base),
                                                                   forget, retain)
               for kind in KINDS for reuse in (True, False)}
        C.log_to_stderr(f"[workspace] {name} B={batch}: timing {', '.join(fns)} x {repeats} repeats")
        timing = C.interleaved_timing(fns, device=device, repeats=repeats, target_s=0.0 if args.quick else 0.25,
                                      warmup=2)
        ratios = {kind: C.ratio_stats(timing, f"{kind}[reuse]", f"{kind}[fresh]") for kind in KINDS}
        memory = {}
        for v in fns:
            kind, reuse = v[0], v.endswith("[reuse]")
            memory[v] = C.run_child(Path(__file__), {"model": name, "batch": batch, "kind": kind, "reuse": reuse,
                                                     "threads": torch.get_num_threads()})
        out[name] = {"desc": {**C.MODELS, **C.HF_MODELS}[name]["desc"], "params": C.count_params(base),
                     "parameter_mib": C.count_params(base) * 4 / 2**20, "batch": batch, "timing": timing,
                     "ratios_reuse_over_fresh": ratios, "memory": memory}
    config = {"quick": args.quick, "repeats": repeats,
              "variants": {"b": "ProbablyAlignedSGD.step(forget, retain), defaults, default direction",
                           "c": "caller's NegGrad+ backward, then the same step",
                           "[reuse]": "reuse_buffers=True (the CPU default)",
                           "[fresh]": "reuse_buffers=False: every temporary allocated afresh"},
              "memory": "fresh process per variant, after 3 warm-up steps and one measured step: minor page "
                        "faults of that step, VmHWM (peak RSS of the process so far) and VmRSS between steps"}
    return C.bench_payload("workspace", machine, t_start, config, models=out)


def table(payload: dict[str, Any]) -> str:
    rows = ["| model | step | time, reuse / fresh | page faults per step, fresh → reuse | peak RSS (MiB), "
            "fresh → reuse | RSS between steps (MiB), fresh → reuse | workspace between steps (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for name, m in payload["models"].items():
        for kind in KINDS:
            fr, re = m["memory"][f"{kind}[fresh]"], m["memory"][f"{kind}[reuse]"]
            rows.append(f"| {name} | {kind} | {m['ratios_reuse_over_fresh'][kind]['median']:.2f}× | "
                        f"{fr['minor_page_faults_per_step']} → {re['minor_page_faults_per_step']} | "
                        f"{fr['peak_rss_mib']:.0f} → {re['peak_rss_mib']:.0f} | "
                        f"{fr['rss_between_steps_mib']:.0f} → {re['rss_between_steps_mib']:.0f} | "
                        f"{re['workspace_mib_between_steps']:.0f} |")
    rows += ["", "b: the masked step alone (default direction); c: after the caller's NegGrad+ backward. "
             "Time: median of per-repeat ratios, interleaved in one process."]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = C.bench_parser(__doc__, child=True)
    p.add_argument("--models", default=None, help="comma-separated, from mlp,cnn,resnet18,wide")
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every model")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return C.bench_main(argv, build_parser, run, table, "workspace.json", child=child)


if __name__ == "__main__":
    main()
