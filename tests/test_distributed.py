"""DistributedEngine: a 2-process ``gloo`` run on the CPU equals the single-process run on the
concatenated batch (masks, losses, parameters), with the default statistics direction and with the
caller's backward under DDP; errors on one rank surface on every rank instead of hanging."""

from __future__ import annotations

import datetime
import os
import pathlib
import runpy
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from masked_optim import HookEngine, ProbablyAlignedAdam, ProbablyAlignedSGD, VmapEngine
from masked_optim.distributed import (
    DistributedEngine,
    all_reduce_grad_stats,
    parameters_in_sync,
    shard_batch,
    unwrap_model,
)

from .helpers import catch_error, loop_moments

WORLD = 2
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distributed_unlearning.py"
EXAMPLE_TINY = ["--n-per-class", "30", "--pretrain-steps", "60", "--steps", "4", "--hidden", "16",
                "--batch", "15", "--quiet"]
N_FORGET, N_RETAIN = 11, 17  # odd sizes: the two shards differ (6/5 and 9/8)
STEPS = 3

SCENARIOS = {
    # default direction retain_weight·μ_r − forget_weight·μ_f (no caller backward; DDP only wraps);
    # the vmap reference engine in chunks of 4 on each rank, against one vmap pass per batch
    "sgd_stats": dict(opt="sgd", ddp=True, backward=False,
                      cfg=dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3),
                      mask=dict(confidence=0.7), engine="vmap"),
    # the caller's NegGrad+ backward, gradients averaged by DDP; the default ("auto") engines
    "sgd_ddp_grad": dict(opt="sgd", ddp=True, backward=True, cfg=dict(lr=0.2, momentum=0.9),
                         mask=dict(confidence=0.7), engine="auto"),
    # Student-t threshold: its degrees of freedom must come from the global n
    "adam_ddp_grad_t": dict(opt="adam", ddp=True, backward=True, cfg=dict(lr=0.02),
                            mask=dict(confidence=0.7, quantile="t"), engine="auto"),
}


class Standardize(nn.Module):
    """Fixed input scaling held in buffers: DDP syncs buffers inside its forward, so statistics
    must not run through the DDP wrapper."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, dim))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Standardize(6), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _global_batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    fb = (torch.randn(N_FORGET, 6, generator=g), torch.randint(0, 4, (N_FORGET,), generator=g))
    rb = (torch.randn(N_RETAIN, 6, generator=g), torch.randint(0, 4, (N_RETAIN,), generator=g))
    return fb, rb


def _caller_backward(net: nn.Module, fb, rb, world: int) -> None:
    """NegGrad+ on the global batch: mean retain loss − mean forget loss.  Each rank sums its own
    samples over the *global* counts and multiplies by the world size because DDP averages the
    ranks' gradients; with world = 1 and the whole batch this is the plain mean objective."""
    out = net(torch.cat([fb[0], rb[0]]))  # one forward through DDP per backward
    k = fb[1].shape[0]
    lf = F.cross_entropy(out[:k], fb[1], reduction="sum") / N_FORGET
    lr = F.cross_entropy(out[k:], rb[1], reduction="sum") / N_RETAIN
    ((lr - lf) * world).backward()


def _run(name: str, rank: int | None) -> dict:
    """One scenario: distributed on this rank's shards when ``rank`` is given, else the
    single-process reference (default VmapEngine) on the whole batches."""
    sc = SCENARIOS[name]
    model = _model()
    distributed = rank is not None
    net = nn.parallel.DistributedDataParallel(model) if distributed and sc["ddp"] else model
    if distributed:
        engine = DistributedEngine(VmapEngine(chunk_size=4) if sc["engine"] == "vmap" else None)
    else:
        engine = sc["engine"]
    cls = ProbablyAlignedSGD if sc["opt"] == "sgd" else ProbablyAlignedAdam
    # the optimizer sees the DDP wrapper as `model`: its parameters are the inner module's
    opt = cls(net.parameters(), **sc["cfg"], **sc["mask"], model=net, engine=engine)
    out: dict = {"kept": [], "forget_loss": [], "retain_loss": [], "direction": []}
    for step in range(STEPS):
        fb, rb = _global_batches(step)
        if distributed:
            fb, rb = shard_batch(fb), shard_batch(rb)
        opt.zero_grad(set_to_none=True)
        if sc["backward"]:
            _caller_backward(net, fb, rb, WORLD if distributed else 1)
        opt.step(forget=fb, retain=rb)
        d = opt.diagnostics
        out["kept"].append(d.kept_fraction)
        out["forget_loss"].append(d.forget_loss)
        out["retain_loss"].append(d.retain_loss)
        out["direction"].append(d.direction)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    if distributed:
        out["in_sync"] = parameters_in_sync(model)
    return out


def _engine_checks(rank: int) -> dict:
    model = _model()
    params = list(model.parameters())
    eng = DistributedEngine()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    res: dict = {}
    # an empty shard contributes nothing but still takes part in every collective
    mine = (x, y) if rank == 0 else (x[:0], y[:0])
    st = eng(model, params, mine)
    res["empty"] = (st.n, [m.clone() for m in st.mean], [q.clone() for q in st.m2], float(st.loss))
    # the same statistics inside a bfloat16 autocast region: autocast is off for the statistics
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st_amp = eng(model, params, mine)
    res["autocast_equal"] = all(torch.equal(a, b) for a, b in zip(st.mean + st.m2, st_amp.mean + st_amp.m2))
    # a bad batch on rank 1 only: rank 1 raises its ValueError, rank 0 is told instead of hanging
    bad = (x, y) if rank == 0 else (x[:3], y[:2])
    res["bad_batch"] = catch_error(lambda: eng(model, params, bad))
    # different parameter lists on the two ranks
    res["param_mismatch"] = catch_error(lambda: eng(model, params if rank == 0 else params[:2], (x, y)))
    # all_reduce_grad_stats on its own, with one collective for the counts
    local = VmapEngine()(model, params, shard_batch((x, y)))
    merged = all_reduce_grad_stats(local)
    res["all_reduce"] = (merged.n, [m.clone() for m in merged.mean], [q.clone() for q in merged.m2])
    # per-sample values of unequal (and empty) lengths, concatenated in rank order
    res["gathered"] = [eng.gather_samples(torch.arange(3.0) if rank == 0 else torch.arange(10.0, 14.0)),
                       eng.gather_samples(torch.arange(2.0) if rank == 0 else torch.zeros(0))]
    # parameters_in_sync notices a one-ulp difference on one rank
    if rank == 1:
        with torch.no_grad():
            params[0].view(-1)[3] = torch.nextafter(params[0].view(-1)[3], torch.tensor(1.0))
    res["out_of_sync"] = parameters_in_sync(model)
    return res


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a bug must fail the test, not hang it for 30 min
    )
    try:
        results = {name: _run(name, rank) for name in SCENARIOS}
        results["checks"] = _engine_checks(rank)
        example = runpy.run_path(str(EXAMPLE))
        results["example"] = example["unlearn"](example["parse"](EXAMPLE_TINY))
    except Exception:
        results = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    # as a forked worker does anyway: with spawn (an accelerator present), interpreter finalisation
    # can abort in torch's teardown after the results are saved (tests/test_torch_contracts.py)
    os._exit(0)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gloo"))
    # fork shares the already imported torch (seconds saved per process); the workers stay on one
    # thread, as DataLoader workers do, which keeps OpenMP safe after a fork.  With an accelerator,
    # autograd's device threads (started by any earlier backward) make forked children refuse to
    # run backward: spawn then.
    forkable = "fork" in mp.get_all_start_methods() and not torch.accelerator.is_available()
    method = "fork" if forkable else "spawn"
    ctx = mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the gloo workers did not finish within 180 s")
    out = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r} failed:\n{res.get('error')}"
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_process_gloo_equals_single_process(gloo_results, name):
    ref = _run(name, None)
    expected_direction = "grad" if SCENARIOS[name]["backward"] else "stats"
    assert ref["direction"] == [expected_direction] * STEPS
    # the test is only meaningful when the mask actually removes and keeps coordinates
    assert all(0.05 < k < 0.95 for k in ref["kept"]), ref["kept"]
    for rank, res in enumerate(gloo_results):
        got = res[name]
        assert got["direction"] == ref["direction"]
        # identical masks: same kept count at every step (and, below, the same parameters)
        assert got["kept"] == ref["kept"], (rank, got["kept"], ref["kept"])
        for a, b in zip(got["forget_loss"] + got["retain_loss"], ref["forget_loss"] + ref["retain_loss"]):
            assert a == pytest.approx(b, abs=1e-6)
        for p, q in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        assert got["in_sync"]
    for p, q in zip(gloo_results[0][name]["params"], gloo_results[1][name]["params"]):
        assert torch.equal(p, q)  # every rank applied the very same update


def test_empty_shard_and_merge_against_per_sample_loop(gloo_results):
    model = _model()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    n, means, m2s = loop_moments(model, params, x, y)  # float64 per-sample loop: independent reference
    loss = F.cross_entropy(model(x), y).item()
    for res in gloo_results:
        c = res["checks"]
        for key in ("empty", "all_reduce"):
            got_n, got_mean, got_m2 = c[key][:3]
            assert got_n == n
            for a, b in zip(got_mean + got_m2, means + m2s):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
        assert c["empty"][3] == pytest.approx(loss, abs=1e-6)
        assert c["autocast_equal"]


def test_errors_reach_every_rank(gloo_results):
    r0, r1 = (res["checks"] for res in gloo_results)
    assert r1["bad_batch"][0] == "ValueError" and "batch size" in r1["bad_batch"][1]
    assert r0["bad_batch"][0] == "RuntimeError" and "rank(s) [1]" in r0["bad_batch"][1]
    for c in (r0, r1):
        assert c["param_mismatch"][0] == "ValueError" and "disagree" in c["param_mismatch"][1]
        assert c["gathered"][0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]
        assert c["gathered"][1].tolist() == [0.0, 1.0]
        assert c["out_of_sync"] is False


def test_distributed_example_matches_one_process(gloo_results, tmp_path):
    example = runpy.run_path(str(EXAMPLE))
    # the same program as a world of one process seeing the whole batches
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ref = example["unlearn"](example["parse"](EXAMPLE_TINY))
    finally:
        dist.destroy_process_group()
    assert ref["forget_loss_after"] > ref["forget_loss_before"]
    for res in gloo_results:
        got = res["example"]
        assert got["world_size"] == WORLD and got["in_sync"] == 1.0
        assert got["kept_fraction_last"] == ref["kept_fraction_last"]
        for key in ("forget_loss_before", "forget_loss_after", "forget_acc_after", "retain_acc_after"):
            assert got[key] == pytest.approx(ref[key], abs=1e-5), key


# ------------------------------------------------------------------------------ single-process checks
def test_requires_an_initialised_process_group():
    model = _model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedEngine()(model, list(model.parameters()), (torch.randn(4, 6), torch.zeros(4).long()))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_batch((torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))


def test_engine_constructor_validation():
    with pytest.raises(TypeError, match="StatsEngine"):
        DistributedEngine(inner=3)
    with pytest.raises(TypeError, match="StatsEngine"):
        DistributedEngine(inner="fast")
    with pytest.raises(TypeError, match="merge twice"):
        DistributedEngine(inner=DistributedEngine())
    auto = DistributedEngine().inner  # the optimizers' default, engine="auto"
    assert isinstance(auto, HookEngine) and isinstance(auto.fallback, VmapEngine)
    assert DistributedEngine("hooks").inner.fallback is None
    assert isinstance(DistributedEngine("vmap").inner, VmapEngine)


def test_shard_batch_partitions_the_batch():
    x, t, y = torch.randn(7, 3), torch.randint(0, 5, (7, 2)), torch.arange(7)
    shards = [shard_batch(((x, t), y), rank=r, world_size=3) for r in range(3)]
    assert [s[1].shape[0] for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat([s[1] for s in shards]), y)
    assert torch.equal(torch.cat([s[0][0] for s in shards]), x)
    assert torch.equal(torch.cat([s[0][1] for s in shards]), t)
    single = shard_batch((x, y), rank=1, world_size=2)
    assert torch.equal(single[0], x[4:]) and torch.equal(single[1], y[4:])
    with pytest.raises(ValueError, match="at least one sample"):
        shard_batch((x[:2], y[:2]), rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        shard_batch((x, y), rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch size"):
        shard_batch((x, y[:3]), rank=0, world_size=1)


def test_unwrap_model_strips_compile_wrappers_without_compiling():
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    assert unwrap_model(model) is model
    with pytest.raises(TypeError, match="nn.Module"):
        unwrap_model(lambda x: x)

    class ByProperty(nn.Module):  # a wrapper whose inner module is a class-level property
        _orig_mod = property(lambda self: self.inner[0])

        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList([model])

    assert unwrap_model(ByProperty()) is model
    holder = nn.Module()
    holder.__dict__["_orig_mod"] = model  # set past nn.Module's __setattr__, as torch's wrapper first does
    assert unwrap_model(holder) is model
