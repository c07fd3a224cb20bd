"""Masked unlearning with a HuggingFace ``Trainer``: GradDiff on a tiny GPT-2 with ``ProbablyAlignedAdamW``.

A 2-layer GPT-2 (random weights, no download) learns two kinds of token sequences — counting by 1
(the retain set) and counting by 3 (the forget set) — and is then made to forget the second kind.
The unlearning Trainer is shaped like open-unlearning's: each training input is
``{"forget": {...}, "retain": {...}}``, both parts the model's keyword arguments with ``labels``
(padding labelled -100), and ``compute_loss`` returns GradDiff, ``retain_loss − forget_loss``.
The Trainer only calls ``optimizer.step()``; ``MaskedUnlearningCallback(...).attach(trainer)``
stages each input's two parts on the optimizer before it, so every step is masked to the
coordinates probably aligned with both per-sample gradients (per-sequence mean token
cross-entropy, shifted, -100 ignored). Note ``remove_unused_columns=False``: the Trainer would
otherwise drop the ``forget``/``retain`` keys, which are no arguments of the model.

Run ``python examples/hf_trainer_unlearning.py --help``; the defaults take well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

from masked_optim import ProbablyAlignedAdamW
from masked_optim.integrations import unwrap_optimizer
from masked_optim.integrations.hf import MaskedUnlearningCallback

VOCAB, PAD = 97, 0  # content tokens are 1..VOCAB-1


def make_sequences(n: int, stride: int, max_len: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` sequences counting by ``stride`` from random starts, of random lengths (right-padded),
    as a batch of model keyword arguments with ``labels`` (-100 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=g)
    ids = (start - 1 + stride * torch.arange(max_len)) % (VOCAB - 1) + 1
    lengths = torch.randint(max_len // 2, max_len + 1, (n, 1), generator=g)
    mask = torch.arange(max_len) < lengths
    return {"input_ids": ids.masked_fill(~mask, PAD), "attention_mask": mask.long(),
            "labels": ids.masked_fill(~mask, -100)}


def take(batch: dict[str, torch.Tensor], idx: Any) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in batch.items()}


class ForgetRetainDataset(Dataset):
    """One input per forget sequence, paired with a retain sequence (open-unlearning's layout)."""

    def __init__(self, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor], seed: int) -> None:
        self.forget, self.retain = forget, retain
        n_r = len(retain["input_ids"])
        self.pair = torch.randint(0, n_r, (len(forget["input_ids"]),), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.forget["input_ids"])

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return {"forget": take(self.forget, i), "retain": take(self.retain, int(self.pair[i]))}


def collate(features: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Batches each part separately (HF's default collator does not nest)."""
    return {part: {k: torch.stack([f[part][k] for f in features]) for k in features[0][part]}
            for part in features[0]}


class GradDiffTrainer(Trainer):
    """GradDiff: descend on the retain part, ascend on the forget part."""

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        forget_loss = model(**inputs["forget"]).loss
        retain_loss = model(**inputs["retain"]).loss
        loss = retain_loss - forget_loss
        return (loss, None) if return_outputs else loss


class PrintDiagnostics(TrainerCallback):
    """Prints what each masked step did and keeps the kept fractions."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.kept, self.directions = quiet, [], []

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        d = unwrap_optimizer(optimizer).diagnostics  # the Trainer holds it wrapped by accelerate
        self.kept.append(d.kept_fraction)
        self.directions.append(d.direction)
        if not self.quiet:
            print(f"step {state.global_step}: kept {d.kept_fraction:.1%} of coordinates, n_forget {d.n_forget}, "
                  f"n_retain {d.n_retain}, forget loss {d.forget_loss:.3f}, retain loss {d.retain_loss:.3f}, "
                  f"step fraction {d.step_fraction:g}")


@torch.no_grad()
def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    return model(**batch).loss.item()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-forget", type=int, default=64)
    ap.add_argument("--n-retain", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="forget (and retain) sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()

    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg)
    forget = make_sequences(args.n_forget, 3, args.max_len, args.seed + 1)
    retain = make_sequences(args.n_retain, 1, args.max_len, args.seed + 2)

    # the "original" model, trained on both kinds of sequences
    both = {k: torch.cat([forget[k], retain[k]]) for k in forget}
    pre = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.pretrain_steps):
        pre.zero_grad()
        model(**take(both, torch.randint(0, len(both["input_ids"]), (32,), generator=g))).loss.backward()
        pre.step()
    res: dict[str, Any] = {"forget_loss_before": lm_loss(model, forget), "retain_loss_before": lm_loss(model, retain)}

    opt = ProbablyAlignedAdamW(model.parameters(), lr=args.lr, weight_decay=0.0, model=model)
    printer = PrintDiagnostics(args.quiet)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, seed=args.seed,
            remove_unused_columns=False,  # keep the "forget"/"retain" inputs
            lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = GradDiffTrainer(model=model, args=targs, data_collator=collate, callbacks=[printer],
                                  train_dataset=ForgetRetainDataset(forget, retain, args.seed),
                                  optimizers=(opt, None))
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics: PrintDiagnostics reports instead
        MaskedUnlearningCallback().attach(trainer)  # stages inputs["forget"], inputs["retain"] before each step
        trainer.train()

    res.update(
        forget_loss_after=lm_loss(model, forget), retain_loss_after=lm_loss(model, retain),
        steps_taken=trainer.state.global_step, mean_kept_fraction=sum(printer.kept) / max(len(printer.kept), 1),
        directions=sorted(set(printer.directions)),
    )
    if not args.quiet:
        print(f"forget loss {res['forget_loss_before']:.3f} -> {res['forget_loss_after']:.3f}, "
              f"retain loss {res['retain_loss_before']:.3f} -> {res['retain_loss_after']:.3f}, "
              f"mean kept fraction {res['mean_kept_fraction']:.1%}")
    return res


if __name__ == "__main__":
    main()
