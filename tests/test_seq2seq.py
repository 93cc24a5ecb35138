"""Seq2Seq (Transformer / T5-style): cached decoding, beam reordering, parity with torch.nn.Transformer and HF T5."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmstack.checkpoints import instantiate
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models.blocks import Attention, Block
from lmstack.checkpoints.hf import config_from_hf_t5, from_hf_t5_state_dict
from lmstack.models.seq2seq import Seq2Seq, relative_position_bucket

torch.set_num_threads(2)

PRESETS = ["tiny-transformer", "tiny-t5"]


def _model(name: str, **overrides: object) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(from_name(name, **overrides)).eval()


def _batch(vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sources, the second right-padded (pad id 0); two targets of 7 tokens."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, vocab, (2, 9), generator=g)
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 5:] = False
    src[1, 5:] = 0
    tgt = torch.randint(3, vocab, (2, 7), generator=g)
    return src, src_mask, tgt


def _perturb(module: torch.nn.Module) -> None:
    """Move every weight off its init (norms are ones, biases zeros) so parity tests see each of them."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------ cached decoding


@pytest.mark.parametrize("name", PRESETS)
def test_cached_decoding_matches_full_recompute(name: str) -> None:
    model = _model(name)
    src, src_mask, tgt = _batch()
    with torch.no_grad():
        full = model(src, tgt, src_mask)  # [B, T, V]
        memory = model.encode(src, src_mask)
        model.setup_cache(batch_size=2, max_len=16)
        # A 3-token prefill, then one token at a time with memory=None (cross-attention keys reused).
        steps = [model.decode(tgt[:, :3], memory, src_mask, input_pos=torch.arange(3))]
        for t in range(3, tgt.shape[1]):
            steps.append(model.decode(tgt[:, t:t + 1], None, None, input_pos=torch.tensor([t])))
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # The padded source positions matter: changing them without the mask changes the output.
    with torch.no_grad():
        assert not torch.allclose(model(src, tgt), full, atol=1e-3)


@pytest.mark.parametrize("name", PRESETS)
def test_reorder_cache_matches_recompute_with_reordered_inputs(name: str) -> None:
    model = _model(name)
    src, src_mask, tgt = _batch()
    beam_idx = torch.tensor([1, 1])  # both rows continue the second (padded) hypothesis
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        model.setup_cache(batch_size=2, max_len=16)
        model.decode(tgt[:, :4], memory, src_mask, input_pos=torch.arange(4))
        model.reorder_cache(beam_idx)
        # After reordering, row 0 holds row 1's prefix; feed new tokens that differ per row.
        new = tgt[beam_idx, 4:6].clone()
        new[0] = torch.tensor([5, 6])
        got = model.decode(new, None, None, input_pos=torch.arange(4, 6))
        model.clear_cache()
        layer = model.decoder_layers[0]
        assert model.cache_len == 0 and layer.cross_attn.memory_kv is None and model.memory_mask is None
        want = model(src[beam_idx], torch.cat([tgt[beam_idx, :4], new], dim=1), src_mask[beam_idx])[:, 4:]
    assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_decode_errors_are_one_line() -> None:
    model = _model("tiny-transformer")
    src, src_mask, tgt = _batch()
    with pytest.raises(LmstackError, match="encoder memory"):
        model.decode(tgt, None)
    with pytest.raises(LmstackError, match="setup_cache"):
        model.decode(tgt, model.encode(src, src_mask), src_mask, input_pos=torch.arange(7))
    with pytest.raises(LmstackError, match="max_seq_len"):
        model.encode(torch.zeros(1, 200, dtype=torch.long))


def test_instantiate_from_state_dict_rebuilds_tables() -> None:
    """checkpoints.instantiate builds on meta, adopts the tensors, then reset_buffers() remakes pos_table."""
    model = _model("tiny-transformer")
    src, src_mask, tgt = _batch()
    loaded = instantiate(model.config, model.state_dict(), dtype=torch.float32)
    assert "tok_emb.weight" in model.state_dict() and "lm_head.weight" not in model.state_dict()  # tied
    with torch.no_grad():
        assert_close(loaded(src, tgt, src_mask), model(src, tgt, src_mask))


def test_relative_position_bucket_matches_hf() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-200, 200)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((8, 32), (32, 128)):
            want = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), want)


# -------------------------------------------------------------------------- torch.nn.Transformer parity


def _torch_transformer_state(model: Seq2Seq) -> dict[str, torch.Tensor]:
    """Our weights under torch.nn.Transformer's names (q/k/v concatenated into in_proj)."""
    def attn(prefix: str, a: Attention) -> dict[str, torch.Tensor]:
        return {f"{prefix}.in_proj_weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                f"{prefix}.in_proj_bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                f"{prefix}.out_proj.weight": a.o_proj.weight, f"{prefix}.out_proj.bias": a.o_proj.bias}

    def linear_norm(prefix: str, layer: Block, norms: list[str]) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.linear1.weight": layer.mlp.up_proj.weight, f"{prefix}.linear1.bias": layer.mlp.up_proj.bias,
               f"{prefix}.linear2.weight": layer.mlp.down_proj.weight,
               f"{prefix}.linear2.bias": layer.mlp.down_proj.bias}
        for i, norm in enumerate(norms, start=1):
            out[f"{prefix}.norm{i}.weight"] = getattr(layer, norm).weight
            out[f"{prefix}.norm{i}.bias"] = getattr(layer, norm).bias
        return out

    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.encoder_layers):
        state |= attn(f"encoder.layers.{i}.self_attn", layer.attn)
        state |= linear_norm(f"encoder.layers.{i}", layer, ["attn_norm", "mlp_norm"])
    for i, layer in enumerate(model.decoder_layers):
        state |= attn(f"decoder.layers.{i}.self_attn", layer.attn)
        state |= attn(f"decoder.layers.{i}.multihead_attn", layer.cross_attn)
        state |= linear_norm(f"decoder.layers.{i}", layer, ["attn_norm", "cross_norm", "mlp_norm"])
    for stack in ("encoder", "decoder"):
        norm = getattr(model, f"{stack}_norm")
        state |= {f"{stack}.norm.weight": norm.weight, f"{stack}.norm.bias": norm.bias}
    return state


def test_post_norm_transformer_matches_torch_nn_transformer() -> None:
    """Same embeddings in; encoder memory and decoder hidden states (after the final norms, before our tied
    head) compared. torch.nn.Transformer has final encoder/decoder LayerNorms, so ours uses final_norm=True;
    the default post-norm Transformer (final_norm=False) differs from it only by those two norms."""
    model = _model("tiny-transformer", final_norm=True)
    _perturb(model)
    cfg = model.config
    ref = torch.nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_head, num_encoder_layers=cfg.n_encoder_layer,
                               num_decoder_layers=cfg.n_decoder_layer, dim_feedforward=cfg.d_ff, dropout=0.0,
                               activation="relu", batch_first=True, norm_first=False, layer_norm_eps=cfg.norm_eps)
    ref.load_state_dict(_torch_transformer_state(model), strict=True)
    # train() with dropout 0 keeps the reference off its nested-tensor fast path, which zeroes padded rows.
    ref.train()
    src, src_mask, tgt = _batch()
    T = tgt.shape[1]
    with torch.no_grad():
        src_emb = model.embed(src, torch.arange(src.shape[1]))
        tgt_emb = model.embed(tgt, torch.arange(T))
        causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
        want_memory = ref.encoder(src_emb, src_key_padding_mask=~src_mask)
        want = ref(src_emb, tgt_emb, tgt_mask=causal, src_key_padding_mask=~src_mask,
                   memory_key_padding_mask=~src_mask, tgt_is_causal=True)
        memory = model.encode(src, src_mask)
        got = model.decode(tgt, memory, src_mask, return_hidden=True)
    assert_close(memory, want_memory, atol=1e-5, rtol=1e-4)
    assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sinusoidal_scaled_embedding() -> None:
    """Vaswani et al.: emb * sqrt(d) + PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    model = _model("tiny-transformer")
    tokens = torch.tensor([[5, 9, 11]])
    d = model.config.d_model
    pos = torch.arange(3, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # interleaved [3, d]
    with torch.no_grad():
        want = model.tok_emb(tokens) * d ** 0.5 + pe.float()
        assert_close(model.embed(tokens, torch.arange(3)), want)


# ------------------------------------------------------------------------------------- HF T5 parity


# transformers 5 always ties T5's head; tie_word_embeddings=False there only turns off the d_model**-0.5 scaling.
@pytest.mark.parametrize("feed_forward_proj,tied", [("relu", True), ("gated-gelu", False)])
def test_t5_matches_hf(feed_forward_proj: str, tied: bool) -> None:
    from transformers import T5Config, T5ForConditionalGeneration
    hf_cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied,
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      attn_implementation="eager")
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(hf_cfg).eval()
    _perturb(hf)
    config = config_from_hf_t5(hf_cfg.to_dict())
    if feed_forward_proj == "relu" and tied:  # the tiny-t5 preset is exactly this architecture
        preset = from_name("tiny-t5")
        for field in ("positions", "norm", "norm_first", "bias", "attn_scale", "scale_decoder_outputs",
                      "final_norm", "scale_embeddings", "relative_buckets", "relative_max_distance", "d_ff"):
            assert getattr(config, field) == getattr(preset, field), field
    assert config.scale_decoder_outputs == tied and config.gated_mlp == (feed_forward_proj != "relu")
    model = instantiate(config, from_hf_t5_state_dict(hf.state_dict(), config), dtype=torch.float32)
    src, src_mask, tgt = _batch()
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt)
        want_memory = hf.encoder(input_ids=src, attention_mask=src_mask.long()).last_hidden_state
        assert_close(model.encode(src, src_mask), want_memory, atol=1e-5, rtol=1e-4)
        assert_close(model(src, tgt, src_mask), want.logits, atol=1e-4, rtol=1e-4)  # logits reach ~30


def test_t5_v1_1_config_json_gives_untied_unscaled_head() -> None:
    # the fields of google/t5-v1_1-small's config.json that matter here
    hf = {"d_ff": 1024, "d_kv": 64, "d_model": 512, "feed_forward_proj": "gated-gelu", "num_decoder_layers": 8,
          "num_heads": 6, "num_layers": 8, "tie_word_embeddings": False, "vocab_size": 32128}
    config = config_from_hf_t5(hf)
    assert not config.tie_embeddings and not config.scale_decoder_outputs
    assert config.gated_mlp and config.activation == "gelu_tanh" and config.head_dim == 64
    head = torch.randn(3, 2)
    assert from_hf_t5_state_dict({"lm_head.weight": head}, config)["lm_head.weight"] is head


def test_t5_mapping_rejects_unknown_keys() -> None:
    config = from_name("tiny-t5")
    with pytest.raises(LmstackError, match="encoder.block.0.layer.5.foo"):
        from_hf_t5_state_dict({"encoder.block.0.layer.5.foo": torch.zeros(1)}, config)


# --------------------------------------------------------------------------------------------- overfit


def _greedy(model: Seq2Seq, src: torch.Tensor, src_mask: torch.Tensor, max_new: int) -> torch.Tensor:
    """Cached greedy decoding through the encode/setup_cache/decode interface generation.py uses."""
    cfg = model.config
    B = src.shape[0]
    memory = model.encode(src, src_mask)
    model.setup_cache(B, max_len=max_new + 1)
    token = torch.full((B, 1), cfg.bos_token_id)
    out = []
    for t in range(max_new):
        logits = model.decode(token, memory if t == 0 else None, src_mask if t == 0 else None,
                              input_pos=torch.tensor([t]))
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    model.clear_cache()
    return torch.cat(out, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_overfits_reverse_task(name: str) -> None:
    """300 AdamW steps on 16 padded sequences; greedy decoding must then reverse every one exactly."""
    torch.manual_seed(0)
    # tiny-t5's 8 buckets merge distances 2-3 in the encoder, so it cannot tell where a 6-token source ends;
    # 32 buckets make every distance here exact. lr 1e-3: post-norm without warmup diverges at 3e-3.
    overrides = {"relative_buckets": 32} if name == "tiny-t5" else {}
    cfg = from_name(name, vocab_size=16, **overrides)
    model = Seq2Seq(cfg)
    n, max_len = 16, 6
    lengths = torch.randint(3, max_len + 1, (n,))
    src = torch.randint(3, 16, (n, max_len))
    src_mask = torch.arange(max_len)[None, :] < lengths[:, None]
    src = src.masked_fill(~src_mask, cfg.pad_token_id)
    # target = reversed source + eos, right-padded; decoder input = bos + target[:-1]
    labels = torch.full((n, max_len + 1), -100)
    for i, L in enumerate(lengths.tolist()):
        labels[i, :L] = src[i, :L].flip(0)
        labels[i, L] = cfg.eos_token_id
    tgt_in = torch.cat([torch.full((n, 1), cfg.bos_token_id), labels[:, :-1].clamp(min=0)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a shared machine
    try:
        model.train()
        for _ in range(300):
            logits = model(src, tgt_in, src_mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = _greedy(model, src, src_mask, max_new=max_len + 1)
    finally:
        torch.set_num_threads(threads)
    real = labels != -100
    assert torch.equal(pred[real], labels[real]), f"loss {loss.item():.4f}"
