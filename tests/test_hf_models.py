"""Raw HuggingFace models (tiny random configs, no download) through the default engine: dict batches,
ModelOutput outputs, the default per-sample losses, GPT-2's Conv1D and tied embedding, PEFT LoRA.
The reference is a float64 per-sample loop written here from the definitions."""

import pytest
import torch
import torch.nn.functional as F

from masked_optim import HookEngine, ProbablyAlignedAdamW, ProbablyAlignedSGD, VmapEngine

transformers = pytest.importorskip("transformers")


def _gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=32,
                                  attn_implementation="sdpa", **kw)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=61, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _padded(n, length, vocab=61, seed=1, lm=True):
    """Right-padded token batch: each row has its own length; padding is masked (and -100 for an LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100) if lm else torch.randint(0, 3, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loop(model, batch, lm):
    """Per-sample gradients in float64 by autograd, one sample at a time, losses from the definition."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k in range(batch["labels"].shape[0]):
        one = {key: v[k : k + 1] for key, v in batch.items() if key != "labels"}
        logits = model(**one).logits
        y = batch["labels"][k : k + 1]
        if lm:  # shifted, -100 ignored, mean over the counted tokens
            lg, lb = logits[0, :-1], y[0, 1:]
            keep = lb != -100
            loss = F.cross_entropy(lg[keep], lb[keep], reduction="sum") / keep.sum()
        else:
            loss = F.cross_entropy(logits, y)
        rows.append(torch.autograd.grad(loss, params, allow_unused=True))
    g = [torch.stack([r[i] if r[i] is not None else torch.zeros_like(params[i]) for r in rows]) for i in range(len(params))]
    return params, [x.mean(0) for x in g], [((x - x.mean(0)) ** 2).sum(0) for x in g]


def _assert_stats(stats, mean, m2):
    for i, (a, b, c, d) in enumerate(zip(stats.mean, mean, stats.m2, m2)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=f"mean {i}")
        torch.testing.assert_close(c, d, rtol=1e-7, atol=1e-10, msg=f"m2 {i}")


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_raw_hf_models_with_padded_dict_batches_equal_a_float64_loop(kind):
    model = _gpt2() if kind == "gpt2" else _bert()
    batch = _padded(5, 9, lm=kind == "gpt2")
    params, mean, m2 = _loop(model, batch, lm=kind == "gpt2")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the plan verifies itself: nothing to report
        engine = HookEngine(fallback=None)
        stats = engine(model, params, batch)
    _assert_stats(stats, mean, m2)
    rules, rest = engine.plan(model, params)
    assert not engine._plan.whole


def test_gpt2_pair_of_dict_batches_of_different_lengths_and_vmap_reference():
    model = _gpt2()
    f, r = _padded(4, 7, seed=2), _padded(6, 9, seed=3)
    params = [p for p in model.parameters()]
    sf, sr = HookEngine(fallback=None).pair(model, params, f, r)
    for stats, batch in ((sf, f), (sr, r)):
        _, mean, m2 = _loop(model, batch, lm=True)
        _assert_stats(stats, mean, m2)


def test_vmap_reference_takes_dict_batches_and_the_same_losses():
    """The vmap engine reads the same batch layout and default loss (a model vmap can batch: HF's
    attention-mask code branches on the mask's values, which vmap cannot)."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(61, 8)
            self.out = torch.nn.Linear(8, 61)

        def forward(self, input_ids, attention_mask):
            return self.out(self.emb(input_ids) * attention_mask[..., None])

    Tiny.__name__ = "TinyForCausalLM"  # the class name selects the causal-LM loss, as for HF models
    torch.manual_seed(0)
    model = Tiny().double()
    batch = _padded(5, 7, seed=4)
    params = list(model.parameters())
    _, mean, m2 = _loop_plain(model, batch)
    _assert_stats(VmapEngine()(model, params, batch), mean, m2)
    _assert_stats(HookEngine(fallback=None)(model, params, batch), mean, m2)


def _loop_plain(model, batch):
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return Out(self.m(**kw))

    params, mean, m2 = _loop(Wrapped(model), batch, lm=True)
    return params, mean, m2


def test_gpt2_tied_embedding_and_conv1d_stay_on_rules():
    model = _gpt2()
    params = list(model.parameters())
    rules, rest = HookEngine().plan(model, params)
    on_rules = sum(params[i].numel() for i in {i for owned in rules.values() for i in owned.values()})
    assert on_rules == sum(p.numel() for p in params) and not rest
    assert model.transformer.wte.weight is model.lm_head.weight


def test_optimizer_steps_on_raw_gpt2_with_dict_batches():
    model = _gpt2().float()
    opt = ProbablyAlignedAdamW(model.parameters(), lr=1e-3, model=model)
    f, r = _padded(4, 8, seed=5), _padded(6, 8, seed=6)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(**{k: v for k, v in f.items() if k != "labels"}, labels=f["labels"])
    (-out.loss).backward()
    opt.step(forget=f, retain=r)
    d = opt.diagnostics
    assert (d.n_forget, d.n_retain, d.direction) == (4, 6, "grad") and 0 < d.kept_fraction < 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_peft_lora_leaves_frozen_weights_untouched():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_gpt2().float(), peft.LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = ProbablyAlignedSGD(trainable, lr=0.5, model=model)
    f, r = _padded(4, 8, seed=7), _padded(4, 8, seed=8)
    for _ in range(2):
        opt.zero_grad()
        out = model(**{k: v for k, v in f.items() if k != "labels"}, labels=f["labels"])
        (-out.loss).backward()
        opt.step(forget=f, retain=r)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)
    assert opt.diagnostics.n_forget == 4
