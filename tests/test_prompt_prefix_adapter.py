"""Prompt tuning, prefix tuning and Houlsby adapters: exact equivalences, cached generation, the real Trainer.

The references are the untouched Decoder itself: virtual tokens initialized from real tokens must give the
logits of the model run on those tokens first; a prefix initialized from real tokens' keys/values must give
the logits of the model run on them (with positions shifted to match); cached decoding must reproduce the
uncached forward; disabling any of them gives the base model exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.generation import GenerationConfig, Generator
from lmstack.models.decoder import Decoder
from lmstack.peft import (PromptTuned, apply_bottleneck, apply_lora, apply_prefix_tuning, disable_adapter,
                          load_peft_state_dict, peft_state_dict)
from lmstack.peft.bottleneck import WithBottleneck
from lmstack.training import state as ckpt

from test_lora import assert_only_trainable_changed, tokens, train_peft

torch.set_num_threads(2)


def decoder(kind: str = "llama", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    name = {"llama": "tiny-llama", "gpt2": "tiny-gpt2"}[kind]
    extra = dict(n_kv_head=2, d_ff=64) if kind == "llama" else {}
    model = Decoder(from_name(name, n_layer=2, d_model=32, n_head=4, max_seq_len=64, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def greedy(model, prompts: list[list[int]], n: int = 6) -> list[list[int]]:
    gen = Generator(model, None)
    return [r.token_ids for r in gen.generate_batch(prompts, GenerationConfig(max_new_tokens=n))]


# ------------------------------------------------------------------------------------------ prompt tuning


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuning_equals_running_the_init_text_first(kind: str) -> None:
    model = decoder(kind)
    init = [5, 17, 42, 9]
    tuned = PromptTuned(copy.deepcopy(model), n_virtual=4, init_ids=init)
    ids = tokens(vocab=256)
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor(init).expand(2, 4), ids], dim=1))[:, 4:]
        torch.testing.assert_close(tuned(ids), expected)
        torch.testing.assert_close(tuned(ids, last_only=True), expected[:, -1:])
        # A packed-sequence mask (here simply causal) and a padding mask go through the same shift.
        causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
        torch.testing.assert_close(tuned(ids, attn_mask=causal), expected)
        torch.testing.assert_close(tuned(ids, key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), expected)
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == {"prompt"}
    # Shorter init text repeats to fill the virtual tokens, as in peft.
    again = PromptTuned(copy.deepcopy(model), n_virtual=6, init_ids=[3, 4])
    torch.testing.assert_close(again.prompt, model.tok_emb.weight[[3, 4, 3, 4, 3, 4]])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuning_generates_like_the_base_model_with_the_text_first(kind: str) -> None:
    model = decoder(kind)
    init = [7, 8, 9]
    tuned = PromptTuned(copy.deepcopy(model), n_virtual=3, init_ids=init)
    prompts = [[11, 12, 13, 14, 15], [20, 21]]  # different lengths: left padding, masks and position ids
    expected = greedy(model, [init + p for p in prompts])
    assert greedy(tuned, prompts) == expected
    assert greedy(tuned, prompts[1:]) == expected[1:]
    assert tuned.config.max_seq_len == model.config.max_seq_len - 3


def test_prompt_tuning_disable_and_bad_input() -> None:
    model = decoder()
    tuned = PromptTuned(copy.deepcopy(model), n_virtual=2)
    ids = tokens(vocab=256)
    with torch.no_grad(), disable_adapter(tuned):
        torch.testing.assert_close(tuned(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(LmstackError, match="n_virtual must be in 1..63"):
        PromptTuned(model, n_virtual=64)
    with pytest.raises(LmstackError, match="init ids must be in 0..255"):
        PromptTuned(model, n_virtual=2, init_ids=[300])


@pytest.mark.slow
def test_prompt_tuning_trains_only_the_prompt(tmp_path: Path) -> None:
    tuned = PromptTuned(decoder(), n_virtual=4)
    trainer, frozen, trainable, before, after = train_peft(tuned, tmp_path, lr=5e-2)
    assert set(trainable) == {"prompt"}
    assert_only_trainable_changed(tuned, frozen, trainable)
    assert after < before
    saved, _, _ = ckpt.load_checkpoint_tensors(ckpt.latest_checkpoint(trainer.ckpt_dir))
    assert set(saved) == {"prompt"}


# ------------------------------------------------------------------------------------------ prefix tuning


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_from_real_tokens_equals_running_them_first(kind: str) -> None:
    model = decoder(kind)
    init = [5, 17, 42]
    prefixed = apply_prefix_tuning(copy.deepcopy(model), n_prefix=3, init_ids=init)
    ids = tokens(vocab=256)
    shifted = torch.arange(3, 12).expand(2, 9)  # the prefix holds positions 0..2
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor(init).expand(2, 3), ids], dim=1))[:, 3:]
        torch.testing.assert_close(prefixed(ids, position_ids=shifted), expected)
        # An explicit mask (with padding) gets the prefix columns too.
        padding = torch.ones(2, 9, dtype=torch.bool)
        torch.testing.assert_close(prefixed(ids, position_ids=shifted, key_padding_mask=padding), expected)
    trainable = {n for n, p in prefixed.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_tuning.prefix"}


@pytest.mark.parametrize("hidden", [None, 16])
def test_prefix_cached_decoding_matches_the_full_forward(hidden: int | None) -> None:
    prefixed = apply_prefix_tuning(decoder(), n_prefix=4, hidden=hidden)
    with torch.no_grad():
        if hidden is None:  # far from zero, so the prefix matters
            prefixed.prefix_tuning.prefix.normal_(0, 1.0)
        ids = tokens(vocab=256)
        full = prefixed(ids)
        prefixed.setup_cache(2, 16)
        steps = [prefixed(ids[:, :5], input_pos=torch.arange(5))]
        steps += [prefixed(ids[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full)
        prefixed.clear_cache()
        # Batched generation (left padding, explicit masks) agrees with one prompt at a time.
        prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
        assert greedy(prefixed, prompts) == [greedy(prefixed, [p])[0] for p in prompts]
        with disable_adapter(prefixed):
            base = prefixed(ids)
            assert all(layer.attn.prefix is None for layer in prefixed.layers)
        assert not torch.allclose(base, full)
    plain = decoder()
    with torch.no_grad():
        torch.testing.assert_close(base, plain(ids), rtol=0, atol=0)


def test_prefix_reparameterization_trains_the_mlp() -> None:
    prefixed = apply_prefix_tuning(decoder(), n_prefix=3, hidden=16)
    trainable = {n for n, p in prefixed.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_tuning.embedding", "prefix_tuning.mlp_in.weight", "prefix_tuning.mlp_in.bias",
                         "prefix_tuning.mlp_out.weight", "prefix_tuning.mlp_out.bias"}
    prefixed(tokens(vocab=256)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefixed.parameters() if p.requires_grad)
    with pytest.raises(LmstackError, match="already has prefix tuning"):
        apply_prefix_tuning(prefixed, n_prefix=3)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [None, 16])
def test_prefix_tuning_trains_only_the_prefix(tmp_path: Path, hidden: int | None) -> None:
    model = apply_prefix_tuning(decoder(), n_prefix=4, hidden=hidden)
    trainer, frozen, trainable, before, after = train_peft(model, tmp_path, lr=3e-2)
    assert all(n.startswith("prefix_tuning.") for n in trainable)
    assert_only_trainable_changed(model, frozen, trainable)
    assert after < before
    saved, _, _ = ckpt.load_checkpoint_tensors(ckpt.latest_checkpoint(trainer.ckpt_dir))
    assert set(saved) == set(trainable)


# ------------------------------------------------------------------------------------------ adapters


def test_adapter_block_is_the_houlsby_composition() -> None:
    model = decoder()
    adapted = apply_bottleneck(copy.deepcopy(model), bottleneck=8, init_std=0.1)
    block, orig = adapted.layers[0], model.layers[0]
    assert isinstance(block.attn, WithBottleneck) and isinstance(block.mlp, WithBottleneck)
    x = torch.randn(2, 5, 32)
    rope = (model.rope_cos[:5][None, None], model.rope_sin[:5][None, None])
    with torch.no_grad():
        a_ad, m_ad = block.attn.adapter, block.mlp.adapter
        adapter = lambda ad, h: h + ad.up(torch.nn.functional.gelu(ad.down(h)))  # noqa: E731
        h = x + adapter(a_ad, orig.attn(orig.attn_norm(x), rope=rope, is_causal=True))
        expected = h + adapter(m_ad, orig.mlp(orig.mlp_norm(h)))
        torch.testing.assert_close(block(x, rope=rope, is_causal=True), expected)


def test_adapters_cache_disable_and_state() -> None:
    model = decoder()
    adapted = apply_bottleneck(copy.deepcopy(model), bottleneck=8, init_std=0.1)
    ids = tokens(vocab=256)
    with torch.no_grad():
        full = adapted(ids)
        # The cache reaches the wrapped attention as an argument: nothing is forwarded through the wrapper.
        adapted.setup_cache(2, 16)
        assert adapted.cache_shape() == (2, 16, torch.float32)
        steps = [adapted(ids[:, :4], input_pos=torch.arange(4))]
        steps += [adapted(ids[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full)
        adapted.clear_cache()
        assert adapted.cache_shape() is None
        with disable_adapter(adapted):
            torch.testing.assert_close(adapted(ids), model(ids), rtol=0, atol=0)
        assert not torch.allclose(full, model(ids))
    state = peft_state_dict(adapted)
    assert set(state) == {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert set(state) == {f"layers.{i}.{part}.adapter.{lin}.{w}" for i in range(2) for part in ("attn", "mlp")
                          for lin in ("down", "up") for w in ("weight", "bias")}
    fresh = apply_bottleneck(copy.deepcopy(model), bottleneck=8)
    load_peft_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), full, rtol=0, atol=0)
    with pytest.raises(LmstackError, match=r"adapter does not match the base model: layers\.0\.attn\.adapter\.down"
                                           r"\.weight is \[8, 32\], the model expects \[4, 32\]"):
        load_peft_state_dict(apply_bottleneck(copy.deepcopy(model), bottleneck=4), state)


def test_adapters_compose_with_prefix_and_lora() -> None:
    model = apply_bottleneck(decoder(), bottleneck=8)
    apply_prefix_tuning(model, n_prefix=2)  # sees through the adapter wrapper to the attention
    assert all(layer.attn.inner.prefix is not None for layer in model.layers)
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert greedy(model, prompts) == [greedy(model, [p])[0] for p in prompts]
    lora = apply_lora(apply_bottleneck(decoder(), bottleneck=8), rank=2, targets="q")
    assert {n.rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}


@pytest.mark.slow
def test_adapters_train_only_themselves(tmp_path: Path) -> None:
    model = apply_bottleneck(decoder(), bottleneck=8)
    trainer, frozen, trainable, before, after = train_peft(model, tmp_path, lr=1e-2)
    assert trainable and all(".adapter." in n for n in trainable)
    assert_only_trainable_changed(model, frozen, trainable)
    assert after < before
    saved, _, _ = ckpt.load_checkpoint_tensors(ckpt.latest_checkpoint(trainer.ckpt_dir))
    assert set(saved) == set(peft_state_dict(model))


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix-mlp", "bottleneck", "lora"])
def test_peft_state_dict_is_the_methods_weights_even_when_frozen(method: str) -> None:
    """One function returns every method's own weights: the trainable ones, and still after a loaded adapter
    is frozen for inference."""
    model = decoder()
    if method == "prompt":
        model = PromptTuned(model, n_virtual=3)
    elif method.startswith("prefix"):
        apply_prefix_tuning(model, n_prefix=2, hidden=8 if method == "prefix-mlp" else None)
    elif method == "bottleneck":
        apply_bottleneck(model, bottleneck=4)
    else:
        apply_lora(model, rank=2, targets="q,v")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = peft_state_dict(model)
    assert trainable and set(state) == trainable
    for p in model.parameters():
        p.requires_grad_(False)
    assert set(peft_state_dict(model)) == trainable
