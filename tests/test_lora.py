"""LoRA: parity with Hugging Face peft (forward and gradients), merge / unmerge / disable, training with the real
Trainer, adapter state dicts, peft-format export and import, and bad input.

The base model is a tiny random transformers Llama (GQA) loaded through lmstack's own HF importer, so both sides
start from the same weights; LoRA weights are copied across so both start from the same adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lmstack.checkpoints import load_model
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models.decoder import Decoder
from lmstack.peft import (LoRALinear, apply_lora, disable_adapter, export_peft_adapter, import_peft_adapter,
                          load_peft_state_dict, lora_config, peft_state_dict, merge_lora)
from lmstack.training import state as ckpt
from lmstack.training.objectives import causal_lm
from lmstack.training.trainer import TrainConfig, Trainer

from train_helpers import RandomTokens

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def hf_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights, so a swapped or transposed tensor shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.fixture()
def llama_dir(tmp_path: Path) -> Path:
    hf_llama().save_pretrained(tmp_path / "base", safe_serialization=True)
    return tmp_path / "base"


def tokens(batch: int = 2, length: int = 9, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B (a fresh adapter is the identity) and a fresh A, so every path and gradient is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.copy_(torch.randn(m.lora_a.shape, generator=gen) * 0.3)
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.3)


def peft_layer(peft_model: nn.Module, i: int, proj: str) -> nn.Module:
    return getattr(getattr(peft_model.base_model.model.model.layers[i], PROJ[proj]), proj)


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    kw = dict(n_layer=2, d_model=32, d_ff=64, n_head=4, n_kv_head=2, max_seq_len=64) | overrides
    return Decoder(from_name("tiny-llama", **kw))


# ---------------------------------------------------------------------------------------- parity with peft


def test_fresh_adapter_is_identity_and_initialized_like_peft(llama_dir: Path) -> None:
    model = load_model(str(llama_dir), dtype="float32").model
    ids = tokens()
    with torch.no_grad():
        base = model(ids)
    torch.manual_seed(0)
    apply_lora(model, rank=8, alpha=16, targets="all-linear")
    layer = model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_b) == 0  # B = 0: the update starts at zero
    bound = 1.0 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.9 * bound
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)


@pytest.mark.parametrize("targets", [["q", "v"], "all-linear"])
def test_forward_and_gradients_match_peft(llama_dir: Path, targets) -> None:
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    ours = load_model(str(llama_dir), dtype="float32").model
    apply_lora(ours, rank=4, alpha=12, targets=targets)
    randomize_lora(ours)
    names = ["q_proj", "v_proj"] if targets != "all-linear" else list(PROJ)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=names, lora_dropout=0.0))
    with torch.no_grad():  # the same adapter on both sides
        for i, layer in enumerate(ours.layers):
            for proj in names:
                mine = getattr(layer.attn if PROJ[proj] == "self_attn" else layer.mlp, proj)
                theirs = peft_layer(ref, i, proj)
                theirs.lora_A["default"].weight.copy_(mine.lora_a)
                theirs.lora_B["default"].weight.copy_(mine.lora_b)
                assert theirs.scaling["default"] == mine.scaling
    # Both train exactly the adapter.
    mine_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert mine_trainable and all(n.endswith((".lora_a", ".lora_b")) for n in mine_trainable)
    assert sum(p.numel() for n, p in ours.named_parameters() if p.requires_grad) == \
        sum(p.numel() for p in ref.parameters() if p.requires_grad)

    ours.train(), ref.train()
    ids, labels = tokens(), tokens(seed=2)
    logits, ref_logits = ours(ids), ref(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    for i, layer in enumerate(ours.layers):
        for proj in names:
            mine = getattr(layer.attn if PROJ[proj] == "self_attn" else layer.mlp, proj)
            theirs = peft_layer(ref, i, proj)
            assert mine.lora_a.grad.abs().sum() > 0 and mine.lora_b.grad.abs().sum() > 0
            torch.testing.assert_close(mine.lora_a.grad, theirs.lora_A["default"].weight.grad)
            torch.testing.assert_close(mine.lora_b.grad, theirs.lora_B["default"].weight.grad)
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.endswith((".lora_a", ".lora_b")))


def test_dropout_applies_to_the_lora_path_only() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, rank=4, alpha=8, dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(3, 16)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)
    expected = F.linear(x, layer.weight, layer.bias) + dropped @ layer.lora_a.t() @ layer.lora_b.t() * 2.0
    torch.testing.assert_close(y, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight + layer.delta_weight(), layer.bias))


# ------------------------------------------------------------------------------- merge, unmerge, disable


def test_merge_is_exact_idempotent_and_unmerge_restores() -> None:
    model = apply_lora(tiny_decoder(), rank=4, alpha=8, targets="all-linear")
    randomize_lora(model)
    base_weights = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    ids = tokens(vocab=256)
    with torch.no_grad():
        adapted = model(ids)
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.merge()
        merged_weights = [m.weight.clone() for m in layers]
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
        for m in layers:  # a second merge does nothing
            m.merge()
        assert all(torch.equal(m.weight, w) for m, w in zip(layers, merged_weights))
        for m in layers:
            m.unmerge()
            m.unmerge()
        for n, m in model.named_modules():
            if isinstance(m, LoRALinear):
                assert not m.merged
                torch.testing.assert_close(m.weight, base_weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_lora_gives_plain_linears_with_base_keys() -> None:
    base = tiny_decoder()
    base_keys = set(base.state_dict())
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=["q", "k", "down"])
    randomize_lora(model)
    ids = tokens(vocab=256)
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == base_keys  # what save_native / instantiate expect
        assert all(p.requires_grad for p in model.parameters())
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
        assert not torch.equal(model(ids), base(ids))


def test_base_checkpoint_loads_into_lora_model_unchanged() -> None:
    base = tiny_decoder()
    model = apply_lora(tiny_decoder(seed=5), rank=4, alpha=8, targets="all-linear")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".lora_a", ".lora_b")) for k in missing)
    ids = tokens(vocab=256)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)


def test_disable_adapter_gives_the_base_model() -> None:
    base = tiny_decoder()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="all-linear")
    randomize_lora(model)
    ids = tokens(vocab=256)
    with torch.no_grad():
        expected, adapted = base(ids), model(ids)
        assert not torch.allclose(expected, adapted)
        with disable_adapter(model):
            torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=0)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        with disable_adapter(model):  # merged layers are unmerged inside and merged again after
            torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(LmstackError, match="no adapter to disable"):
        with disable_adapter(base):
            pass


# ------------------------------------------------------------------------------------------ training


def train_peft(model: nn.Module, tmp_path: Path, steps: int = 8, lr: float = 1e-2, seq_len: int = 12,
               vocab: int = 256) -> tuple[Trainer, dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    """Run the real Trainer on a PEFT model; returns (trainer, frozen before, trainable before, loss before/after)."""
    data = RandomTokens(vocab=vocab, seq_len=seq_len)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen |= {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=steps, batch_size=8, lr=lr, min_lr=lr / 10,
                      warmup_steps=1, eval_every=steps, eval_batches=2, log_every=steps, progress=False,
                      peak_flops=1e9, weight_decay=0.0)
    trainer = Trainer(model, causal_lm, data, cfg)
    before = trainer.evaluate()
    trainer.fit(resume=False)
    return trainer, frozen, trainable, before, trainer.evaluate()


def assert_only_trainable_changed(model: nn.Module, frozen: dict, trainable: dict) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"{name} changed"
    assert all(not torch.equal(params[n], before) for n, before in trainable.items())


@pytest.mark.slow
def test_trainer_trains_only_the_adapter(tmp_path: Path) -> None:
    model = apply_lora(tiny_decoder(), rank=4, alpha=8, targets="all-linear")
    trainer, frozen, trainable, before, after = train_peft(model, tmp_path)
    assert_only_trainable_changed(model, frozen, trainable)
    assert after < before
    saved, _, _ = ckpt.load_checkpoint_tensors(ckpt.latest_checkpoint(trainer.ckpt_dir))
    assert set(saved) == set(peft_state_dict(model))  # the checkpoint holds the adapter alone


# --------------------------------------------------------------------------------------- state dicts


def test_peft_state_dict_round_trip_and_config() -> None:
    model = apply_lora(tiny_decoder(), rank=4, alpha=8, dropout=0.1, targets="q,v,up")
    randomize_lora(model)
    state = peft_state_dict(model)
    assert sorted({k.rsplit(".", 2)[-2] for k in state}) == ["q_proj", "up_proj", "v_proj"]
    assert lora_config(model) == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q", "v", "up"], "nf4": False}
    other = apply_lora(tiny_decoder(), rank=4, alpha=8, targets="q,v,up")
    for m in other.modules():
        if isinstance(m, LoRALinear):
            m.merge()  # loading into merged layers keeps them merged, with the new update
    load_peft_state_dict(other, state)
    model.eval(), other.eval()
    ids = tokens(vocab=256)
    with torch.no_grad():
        torch.testing.assert_close(other(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_unknown_target_names_the_valid_ones() -> None:
    with pytest.raises(LmstackError, match=r"unknown LoRA target 'qkv'; valid targets: q, k, v, o, gate, up, down"):
        apply_lora(tiny_decoder(), targets=["q", "qkv"])
    gpt2 = Decoder(from_name("tiny-gpt2", n_layer=1))  # no gate_proj: GPT-2 MLPs are not gated
    with pytest.raises(LmstackError, match="has no Linear named gate_proj"):
        apply_lora(gpt2, targets=["gate"])
    model = apply_lora(tiny_decoder())
    with pytest.raises(LmstackError, match="already has LoRA layers"):
        apply_lora(model)


def test_mismatched_adapter_names_the_tensor_and_both_shapes() -> None:
    small = apply_lora(tiny_decoder(d_model=32), rank=8, targets="q")
    large = apply_lora(tiny_decoder(d_model=64), rank=8, targets="q")
    with pytest.raises(LmstackError, match=r"adapter does not match the base model: layers\.0\.attn\.q_proj\.lora_a "
                                           r"is \[8, 32\], the model expects \[8, 64\]"):
        load_peft_state_dict(large, peft_state_dict(small))
    with pytest.raises(LmstackError, match=r"adapter does not match the base model: missing layers\.0\.attn\.v_proj"):
        load_peft_state_dict(apply_lora(tiny_decoder(), rank=8, targets="q,v"), peft_state_dict(small))
    with pytest.raises(LmstackError, match="apply_lora first"):
        load_peft_state_dict(tiny_decoder(), peft_state_dict(small))


# ----------------------------------------------------------------------------------------- peft format


def test_export_loads_in_peft_with_the_same_logits(llama_dir: Path, tmp_path: Path) -> None:
    ours = load_model(str(llama_dir), dtype="float32").model
    apply_lora(ours, rank=4, alpha=8, targets=["q", "v", "o", "gate", "down"])
    randomize_lora(ours)
    out = export_peft_adapter(ours, tmp_path / "adapter", str(llama_dir))
    ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_dir), out).eval()
    ids = tokens()
    with torch.no_grad():
        expected = ours(ids)
        assert not torch.allclose(expected, transformers.LlamaForCausalLM.from_pretrained(llama_dir)(ids).logits)
        torch.testing.assert_close(ref(input_ids=ids).logits, expected)


def test_peft_adapter_imports_with_the_same_logits(llama_dir: Path, tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "up_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ref.save_pretrained(tmp_path / "adapter")
    ours = import_peft_adapter(tmp_path / "adapter", load_model(str(llama_dir), dtype="float32").model)
    assert lora_config(ours) == {"rank": 2, "alpha": 5.0, "dropout": 0.0, "targets": ["k", "up"], "nf4": False}
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref.eval()(input_ids=ids).logits)


def test_peft_import_refuses_what_lmstack_lora_cannot_hold(llama_dir: Path, tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(tmp_path / "dora")
    with pytest.raises(LmstackError, match="DoRA is not supported"):
        import_peft_adapter(tmp_path / "dora", load_model(str(llama_dir), dtype="float32").model)
    with pytest.raises(LmstackError, match="Llama-architecture"):
        import_peft_adapter(tmp_path / "dora", Decoder(from_name("tiny-gpt2", n_layer=1)))
