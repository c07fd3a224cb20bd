"""HuggingFace Trainer, PEFT and Lightning integrations (masked_optim.integrations)."""

from __future__ import annotations

import importlib
import math
import pathlib
import re
import runpy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from masked_optim import ProbablyAlignedAdamW, ProbablyAlignedSGD
from masked_optim.integrations import unwrap_optimizer

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from masked_optim.integrations.hf import MaskedUnlearningCallback  # noqa: E402
from masked_optim.integrations.lightning import MaskedStepCallback  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 97


# ------------------------------------------------------------------------------------------ helpers
def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64))


def _sequences(n: int, stride: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    """Counting sequences, right-padded to ``length`` (padding labelled -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(1, VOCAB, (n, 1), generator=g) - 1 + stride * torch.arange(length)) % (VOCAB - 1) + 1
    mask = torch.arange(length) < torch.randint(length // 2, length + 1, (n, 1), generator=g)
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(),
            "labels": ids.masked_fill(~mask, -100)}


class _PairDataset(Dataset):
    """Item i: one forget sequence and two retain sequences, under the keys the trainer uses."""

    def __init__(self, n: int, fkey: str = "forget", rkey: str = "retain") -> None:
        self.f, self.r, self.fkey, self.rkey = _sequences(n, 3, 1), _sequences(2 * n, 1, 2), fkey, rkey

    def __len__(self) -> int:
        return len(self.f["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {self.fkey: {k: v[i] for k, v in self.f.items()},
                self.rkey: {k: v[2 * i:2 * i + 2] for k, v in self.r.items()}}


def _collate(features: list[dict]) -> dict:
    # the forget part stacks (n sequences), the retain part concatenates (2n): swapped parts show in n_forget
    fkey, rkey = list(features[0])
    return {fkey: {k: torch.stack([f[fkey][k] for f in features]) for k in features[0][fkey]},
            rkey: {k: torch.cat([f[rkey][k] for f in features]) for k in features[0][rkey]}}


class _GradDiff(Trainer):
    """GradDiff on ``{fkey: ..., rkey: ...}`` inputs; records each micro-batch's forget input_ids."""

    fkey, rkey = "forget", "retain"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append(inputs[self.fkey]["input_ids"].clone())
        loss = model(**inputs[self.rkey]).loss - model(**inputs[self.fkey]).loss
        return (loss, None) if return_outputs else loss


class _Record(TrainerCallback):
    def __init__(self) -> None:
        self.diags = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.diags.append(unwrap_optimizer(optimizer).diagnostics)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                save_strategy="no", logging_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> int:
    return sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())


def _spy_stage(opt, monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = opt.stage

    def stage(forget=None, retain=None):
        calls.append((forget, retain))
        real(forget=forget, retain=retain)

    monkeypatch.setattr(opt, "stage", stage)
    return calls


def _assert_masked(diags, n_forget: int, n_retain: int) -> None:
    assert diags, "no optimizer step was taken"
    for d in diags:
        assert not d.skipped and d.direction == "grad"
        assert (d.n_forget, d.n_retain) == (n_forget, n_retain)
        assert 0.0 < d.kept_fraction < 1.0
        assert math.isfinite(d.forget_loss) and math.isfinite(d.retain_loss)


# ------------------------------------------------------------------------------------------ package
def test_importing_integrations_imports_no_framework():
    code = ("import sys, masked_optim, masked_optim.integrations as i; "
            "assert callable(i.unwrap_optimizer); "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module, hidden, extra", [
    ("masked_optim.integrations.hf", ("transformers",), "masked-optim[hf]"),
    ("masked_optim.integrations.lightning", ("lightning", "lightning.pytorch"), "masked-optim[lightning]"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, hidden, extra):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(extra)):
        importlib.import_module(module)


def test_lazy_names_resolve_to_the_submodules():
    import masked_optim.integrations as integrations
    assert integrations.MaskedUnlearningCallback is MaskedUnlearningCallback
    assert integrations.MaskedStepCallback is MaskedStepCallback
    with pytest.raises(AttributeError):
        integrations.NoSuchThing  # noqa: B018


def test_unwrap_optimizer_through_nested_wrappers():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = nn.Linear(4, 3)
    opt = ProbablyAlignedSGD(model.parameters(), lr=0.1, model=model)
    accelerated = Accelerator(cpu=True).prepare_optimizer(opt)
    assert isinstance(accelerated, AcceleratedOptimizer)
    lightning_wrapped = LightningOptimizer(accelerated)
    assert isinstance(lightning_wrapped, AcceleratedOptimizer)  # Lightning imitates the wrapped class
    for wrapped in (opt, accelerated, LightningOptimizer(opt), lightning_wrapped,
                    AcceleratedOptimizer(lightning_wrapped, device_placement=False)):
        assert unwrap_optimizer(wrapped) is opt
    # LightningOptimizer(opt) is itself an instance of ProbablyAlignedSGD: the wrapper is still stripped
    assert isinstance(LightningOptimizer(opt), ProbablyAlignedSGD)

    # stage() through accelerate's wrapper (which forwards no attribute) reaches the next step
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    from masked_optim import integrations

    integrations.stage(lightning_wrapped, forget=(x[:3], y[:3]), retain=(x[3:], y[3:]))
    accelerated.step()
    assert (opt.diagnostics.n_forget, opt.diagnostics.n_retain, opt.diagnostics.direction) == (3, 3, "stats")

    plain = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False)
    with pytest.raises(TypeError, match="AcceleratedOptimizer -> SGD"):
        unwrap_optimizer(plain)
    with pytest.raises(TypeError, match="NoneType"):
        unwrap_optimizer(None)

    class Loop:  # a wrapper that wraps itself through another: refused, not an endless loop
        param_groups: list = []

    a, b = Loop(), Loop()
    a.optimizer, b.optimizer = b, a
    with pytest.raises(TypeError, match="Loop -> Loop"):
        unwrap_optimizer(a)


# ------------------------------------------------------------------------------------------ HF Trainer
def test_hf_trainer_callback_masks_every_step(tmp_path, monkeypatch):
    model = _gpt2()
    opt = ProbablyAlignedAdamW(model.parameters(), lr=1e-3, model=model)
    calls = _spy_stage(opt, monkeypatch)
    record = _Record()
    trainer = _GradDiff(model=model, args=_args(tmp_path), train_dataset=_PairDataset(16), data_collator=_collate,
                        optimizers=(opt, None), callbacks=[record])
    cb = MaskedUnlearningCallback().attach(trainer)
    assert any(c is cb for c in trainer.callback_handler.callbacks)
    before = _snapshot(model)
    trainer.train()

    assert trainer.state.global_step == 2
    assert len(calls) == 2  # one stage per optimizer step, of the batch that step's backward used
    for (forget, retain), seen in zip(calls, trainer.seen):
        assert torch.equal(forget["input_ids"], seen)
        assert set(forget) == set(retain) == {"input_ids", "attention_mask", "labels"}
    _assert_masked(record.diags, n_forget=4, n_retain=8)
    total = sum(p.numel() for p in model.parameters())
    kept = sum(d.kept_fraction * total for d in record.diags)
    changed = _changed(model, before)
    # the masks were applied: nothing moved outside the coordinates some step kept
    assert 0 < changed <= kept + 1e-6 * total


def test_hf_trainer_gradient_accumulation_stages_the_stepping_micro_batch(tmp_path, monkeypatch):
    model = _gpt2(1)
    opt = ProbablyAlignedAdamW(model.parameters(), lr=1e-3, model=model)
    calls = _spy_stage(opt, monkeypatch)
    record = _Record()
    trainer = _GradDiff(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=_PairDataset(16, "f", "r"), data_collator=_collate, optimizers=(opt, None),
                        callbacks=[record])
    trainer.fkey, trainer.rkey = "f", "r"
    MaskedUnlearningCallback(forget_key="f", retain_key="r").attach(trainer)
    trainer.train()

    assert trainer.state.global_step == 2 and len(trainer.seen) == 4
    assert len(calls) == 2  # micro-batches 2 and 4: the ones the optimizer steps after
    for (forget, _), seen in zip(calls, trainer.seen[1::2]):
        assert torch.equal(forget["input_ids"], seen)
    _assert_masked(record.diags, n_forget=4, n_retain=8)  # one micro-batch's statistics


def test_hf_callback_refuses_what_it_cannot_serve(tmp_path):
    model = _gpt2()
    masked = ProbablyAlignedAdamW(model.parameters(), lr=1e-3, model=model)
    unattached = _GradDiff(model=model, args=_args(tmp_path), train_dataset=_PairDataset(8), data_collator=_collate,
                           optimizers=(masked, None), callbacks=[MaskedUnlearningCallback()])
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        unattached.train()

    before = _snapshot(model)
    plain = _GradDiff(model=model, args=_args(tmp_path), train_dataset=_PairDataset(8), data_collator=_collate,
                      optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None))
    MaskedUnlearningCallback().attach(plain)
    with pytest.raises(TypeError, match="AcceleratedOptimizer -> AdamW"):
        plain.train()
    assert _changed(model, before) == 0  # refused before the first step

    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        MaskedUnlearningCallback().batches({"input_ids": torch.zeros(2, 3)})
    assert MaskedUnlearningCallback(split=lambda b: (b[0], b[1])).batches(("f", "r")) == ("f", "r")

    with pytest.raises(RuntimeError, match="already has"):  # one wrapper per Trainer
        MaskedUnlearningCallback().attach(plain)


def test_hf_callback_detach_restores_plain_steps(tmp_path):
    model = _gpt2()
    opt = ProbablyAlignedAdamW(model.parameters(), lr=1e-3, model=model)
    trainer = _GradDiff(model=model, args=_args(tmp_path), train_dataset=_PairDataset(8), data_collator=_collate,
                        optimizers=(opt, None))
    cb = MaskedUnlearningCallback().attach(trainer)
    assert trainer.training_step._masked_optim_callback is cb
    cb.detach()
    assert "training_step" not in trainer.__dict__  # the class's method again
    assert not any(c is cb for c in trainer.callback_handler.callbacks)
    again = MaskedUnlearningCallback().attach(trainer)  # a detached Trainer takes a new callback
    assert trainer.training_step._masked_optim_callback is again


# ------------------------------------------------------------------------------------------ PEFT LoRA
def test_peft_lora_moves_only_the_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = ProbablyAlignedAdamW(trainable, lr=1e-2, model=model)
    forget, retain = _sequences(8, 3, 1), _sequences(16, 1, 2)
    diags = []
    for _ in range(3):
        opt.zero_grad()
        (model(**retain).loss - model(**forget).loss).backward()
        opt.step(forget=forget, retain=retain)
        diags.append(opt.diagnostics)

    _assert_masked(diags, n_forget=8, n_retain=16)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n  # bit-identical
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])}
    assert any("lora_B" in n for n in moved)
    assert any("lora_A" in n for n in moved)  # from the second step, once lora_B is no longer zero


# ------------------------------------------------------------------------------------------ Lightning
def _classifier_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=g)
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + 0.5 * torch.randn(len(y), 8, generator=g)
    f = y == 0
    return (TensorDataset(x[f], y[f]), TensorDataset(x[~f], y[~f]))


def _loaders(seed: int = 0) -> CombinedLoader:
    forget, retain = _classifier_data(seed)
    return CombinedLoader({"forget": DataLoader(forget, batch_size=8, shuffle=True, drop_last=True),
                           "retain": DataLoader(retain, batch_size=16, shuffle=True, drop_last=True)},
                          mode="max_size_cycle")


class _NegGradPlus(pl.LightningModule):
    def __init__(self, manual: bool = False, stage_in_module: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        self.automatic_optimization = not manual
        self.stage_in_module = stage_in_module
        self.diags: list = []

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        (xf, yf), (xr, yr) = batch["forget"], batch["retain"]
        return F.cross_entropy(self(xr), yr) - F.cross_entropy(self(xf), yf)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        if self.stage_in_module:
            opt.stage(forget=batch["forget"], retain=batch["retain"])  # through the LightningOptimizer
        opt.zero_grad()
        self.manual_backward(self._loss(batch))
        opt.step()
        self.diags.append(unwrap_optimizer(opt).diagnostics)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.automatic_optimization:
            self.diags.append(self.trainer.optimizers[0].diagnostics)

    def configure_optimizers(self):
        return ProbablyAlignedSGD(self.parameters(), lr=0.1, momentum=0.9, model=self)


def _fit(module: pl.LightningModule, callbacks: list, **kw) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=_loaders())
    return trainer


def _check_lightning(module: _NegGradPlus, before: dict, steps: int = 2) -> None:
    _assert_masked(module.diags, n_forget=8, n_retain=16)
    assert len(module.diags) == steps
    total = sum(p.numel() for p in module.parameters())
    changed = _changed(module, before)
    assert 0 < changed <= sum(d.kept_fraction for d in module.diags) * total + 1e-6 * total


def test_lightning_callback_masks_automatic_optimisation():
    module = _NegGradPlus()
    before = _snapshot(module)
    trainer = _fit(module, [MaskedStepCallback()])
    assert trainer.global_step == 2
    _check_lightning(module, before)


@pytest.mark.parametrize("stage_in_module", [True, False], ids=["optimizers().stage", "callback"])
def test_lightning_manual_optimisation_steps_are_masked(stage_in_module):
    module = _NegGradPlus(manual=True, stage_in_module=stage_in_module)
    before = _snapshot(module)
    _fit(module, [] if stage_in_module else [MaskedStepCallback()])
    _check_lightning(module, before)


def test_lightning_callback_with_split_and_accumulation():
    module = _NegGradPlus()
    calls: list = []

    def split(batch):
        calls.append(batch)
        return batch["forget"], batch["retain"]

    before = _snapshot(module)
    trainer = _fit(module, [MaskedStepCallback(split=split)], accumulate_grad_batches=2)
    assert trainer.global_step == 2 and len(calls) == 4  # every micro-batch stages; the last of each window steps
    _assert_masked([module.trainer.optimizers[0].diagnostics], n_forget=8, n_retain=16)
    assert _changed(module, before) > 0


def test_lightning_callback_errors_name_the_problem():
    with pytest.raises(KeyError, match="'forget'"):
        MaskedStepCallback().batches({"x": 1})

    class Plain(_NegGradPlus):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="SGD"):
        _fit(Plain(), [MaskedStepCallback()])


# ------------------------------------------------------------------------------------------ examples
def test_hf_trainer_example_runs():
    main = runpy.run_path(str(ROOT / "examples" / "hf_trainer_unlearning.py"))["main"]
    res = main(["--n-forget", "16", "--n-retain", "32", "--pretrain-steps", "20", "--steps", "2", "--batch", "8",
                "--quiet"])
    assert res["steps_taken"] == 2 and res["directions"] == ["grad"]
    assert 0 < res["mean_kept_fraction"] < 1
    assert res["forget_loss_after"] > res["forget_loss_before"]


def test_lightning_example_runs():
    main = runpy.run_path(str(ROOT / "examples" / "lightning_unlearning.py"))["main"]
    res = main(["--n-per-class", "30", "--pretrain-steps", "30", "--steps", "3", "--batch", "8", "--quiet"])
    assert res["steps_taken"] == 3 and res["directions"] == ["grad"]
    assert 0 < res["mean_kept_fraction"] < 1
