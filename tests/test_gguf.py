"""GGUF import: tiny files written with gguf.GGUFWriter, checked against gguf's own reader and dequantizer.

Every file here is written the way llama.cpp's converter writes one (ggml dim order, q/k permuted for its RoPE,
quantized with gguf.quants.quantize), so a round trip through `load_gguf` must give back the original model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmstack.checkpoints import instantiate, load_model
from lmstack.checkpoints.gguf import dequantize, load_gguf, read_gguf, unpermute_qk
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models.decoder import Decoder

torch.set_num_threads(2)
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def permute_qk(w: ArrayT, n_head: int) -> ArrayT:
    """llama.cpp's converter permutation (convert_hf_to_gguf.py `LlamaModel.permute`), the inverse of
    unpermute_qk: the test writes GGUF files the way llama.cpp's converter does."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + byte_tokens() + ["he", "ll", "hell", "Ġw", "<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]  # CONTROL, NORMAL, USER_DEFINED
    return tokens, types


def tiny_model(preset: str) -> Decoder:
    tokens, _ = tiny_vocab()
    torch.manual_seed(0)
    return Decoder(from_name(preset, vocab_size=len(tokens), bos_token_id=1, eos_token_id=2)).eval()


# lmstack key (after "layers.N.") -> GGUF name (after "blk.N."), as llama.cpp names them
LLAMA_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "norm.bias": "output_norm.bias", "lm_head.weight": "output.weight",
                "pos_emb.weight": "position_embd.weight"}


def llama_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, with q and k permuted as convert_hf_to_gguf.py does."""
    cfg, out = model.config, {}
    for key, value in model.state_dict().items():
        w = value.detach().numpy().astype(np.float32)
        if key in GLOBAL_NAMES:
            out[GLOBAL_NAMES[key]] = w
            continue
        _, n, rest = key.split(".", 2)
        if rest == "attn.q_proj.weight":
            w = permute_qk(w, cfg.n_head)
        elif rest == "attn.k_proj.weight":
            w = permute_qk(w, cfg.n_kv_head)
        out[f"blk.{n}.{LLAMA_NAMES[rest]}"] = w
    return out


def gpt2_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """GPT-2 as llama.cpp stores it: fused attn_qkv (q, k, v stacked on the output dim)."""
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {GLOBAL_NAMES[k]: v for k, v in state.items() if k in GLOBAL_NAMES}
    for n in range(model.config.n_layer):
        p = f"layers.{n}."
        for part in ("weight", "bias"):
            out[f"blk.{n}.attn_qkv.{part}"] = np.concatenate(
                [state[f"{p}attn.{x}_proj.{part}"] for x in "qkv"], axis=0)
            for ours, theirs in (("attn_norm", "attn_norm"), ("attn.o_proj", "attn_output"),
                                 ("mlp_norm", "ffn_norm"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
                out[f"blk.{n}.{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
    return out


def write_gguf(path: Path, model: Decoder, qtype: Q = Q.F32, arch: str = "llama",
               tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write `model` as a GGUF file; 2-D weights in `qtype`, norms (1-D) in F32 as llama.cpp keeps them."""
    cfg = model.config
    if tensors is None:
        tensors = gpt2_tensors(model) if arch == "gpt2" else llama_tensors(model)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.n_layer)
    w.add_uint32(f"{arch}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.d_ff)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_head)
    if arch == "gpt2":
        w.add_float32("gpt2.attention.layer_norm_epsilon", cfg.norm_eps)
    else:
        w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_head)
        w.add_float32(f"{arch}.rope.freq_base", cfg.rope_base)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32 else gguf.LlamaFileType.MOSTLY_Q8_0))
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, arr in tensors.items():
        if arr.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[1, 40, 75, 3, 259, 200, 17, 2, 99, 5, 6, 7]])

# --------------------------------------------------------------------------------------- container


def test_reader_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_model("tiny-llama"), Q.Q8_0)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == pytest.approx(field.contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.shape == tuple(reversed(theirs.shape.tolist()))
        assert mine.qtype == theirs.tensor_type
        np.testing.assert_array_equal(ours.raw(mine), theirs.data.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------------- dequantization

FILE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda q: q.name)
def test_load_dequantizes_like_gguf(tmp_path: Path, qtype: Q) -> None:
    model = tiny_model("tiny-llama")
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", model, qtype)
    config, state, tokenizer, meta = load_gguf(path)
    cfg = model.config
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
           for t in gguf.GGUFReader(path).tensors}
    for n in range(cfg.n_layer):
        ref[f"blk.{n}.attn_q.weight"] = unpermute_qk(ref[f"blk.{n}.attn_q.weight"], cfg.n_head)
        ref[f"blk.{n}.attn_k.weight"] = unpermute_qk(ref[f"blk.{n}.attn_k.weight"], cfg.n_kv_head)
    names = {v: k for k, v in GLOBAL_NAMES.items()}
    for name, expected in ref.items():
        if name.startswith("blk."):
            _, n, rest = name.split(".", 2)
            key = f"layers.{n}." + {v: k for k, v in LLAMA_NAMES.items()}[rest]
        else:
            key = names[name]
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], torch.from_numpy(np.array(expected)), rtol=0, atol=0)
    assert set(state) == set(model.state_dict())
    assert meta["format"] == "gguf" and meta["architecture"] == "llama"
    n_matrices = sum(v.dim() == 2 for v in model.state_dict().values())
    expected_types = {"F32": len(state)} if qtype == Q.F32 else {qtype.name: n_matrices, "F32": len(state) - n_matrices}
    assert meta["quant_types"] == expected_types
    assert meta["file_type"] == ("ALL_F32" if qtype == Q.F32 else "Q8_0")
    # The model runs and stays close to the original (quantization error only).
    loaded = instantiate(config, state, dtype=torch.float32)
    got, want = logits(loaded, IDS), logits(model, IDS)
    assert torch.isfinite(got).all()
    tol = {Q.F32: 1e-6, Q.F16: 1e-2, Q.BF16: 5e-2, Q.Q8_0: 5e-2}.get(qtype, 0.3)
    assert (got - want).abs().max() < tol


K_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_kernels_match_gguf_on_random_blocks(qtype: Q) -> None:
    """Random block bytes (with finite fp16 scales) dequantize exactly as gguf.quants does, torch kernel or not."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 2 * 256
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(-2, 2, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    # where each type keeps its fp16 scale(s): first bytes for the legacy / K types, last two for Q6_K, Q2_K, Q3_K
    if qtype in (Q.Q6_K, Q.Q3_K):
        raw[:, -2:] = scales[:, :2]
    elif qtype == Q.Q2_K:
        raw[:, -4:] = scales
    elif qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):
        raw[:, :4] = scales
    else:
        raw[:, :2] = scales[:, :2]
    raw = raw.reshape(-1)
    got = dequantize(raw, int(qtype), (rows, cols))
    want = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------- q/k un-permutation


def test_qk_unpermute_round_trip(tmp_path: Path) -> None:
    """Permute like llama.cpp, write F32, load: the exact original weights and logits come back."""
    model = tiny_model("tiny-llama")
    w = model.layers[0].attn.q_proj.weight.detach()
    assert not torch.equal(permute_qk(w, 4), w)  # the permutation really moves rows
    torch.testing.assert_close(unpermute_qk(permute_qk(w, 4), 4), w, rtol=0, atol=0)
    loaded = load_model(str(write_gguf(tmp_path / "f32.gguf", model)), dtype="float32")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(logits(loaded.model, IDS), logits(model, IDS), rtol=0, atol=0)
    assert loaded.config.tie_embeddings and loaded.config.n_kv_head == 2 and loaded.config.positions == "rope"
    assert loaded.config.bos_token_id == 1 and loaded.config.eos_token_id == 2


def test_untied_output_head(tmp_path: Path) -> None:
    model = tiny_model("tiny-llama")
    untied = Decoder(from_name("tiny-llama", vocab_size=model.config.vocab_size, tie_embeddings=False)).eval()
    loaded = load_model(str(write_gguf(tmp_path / "untied.gguf", untied)), dtype="float32")
    assert not loaded.config.tie_embeddings
    torch.testing.assert_close(loaded.model.lm_head.weight, untied.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded.model, IDS), logits(untied, IDS), rtol=0, atol=0)


def test_gpt2_architecture(tmp_path: Path) -> None:
    """GPT-2 files: learned positions, LayerNorm with bias, fused qkv split back into q, k, v."""
    model = tiny_model("tiny-gpt2")
    loaded = load_model(str(write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")), dtype="float32")
    assert loaded.metadata["architecture"] == "gpt2" and loaded.config.positions == "learned"
    torch.testing.assert_close(logits(loaded.model, IDS), logits(model, IDS), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_from_metadata(tmp_path: Path) -> None:
    _, _, tok, _ = load_gguf(write_gguf(tmp_path / "m.gguf", tiny_model("tiny-llama")))
    tokens, _ = tiny_vocab()
    assert tok.vocab_size == len(tokens)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.encode("<|im_start|>hello world<|im_end|>") == [
        1, tokens.index("hell"), tokens.index("o"), tokens.index("Ġw"), *[tokens.index(c) for c in "orld"], 2]
    assert tok.decode(tok.encode("héllo, wörld! 😀")) == "héllo, wörld! 😀"
    assert {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")} <= tok.stop_token_ids
    # user-defined tokens match whole but are not special: decoding keeps them
    assert tok.encode("a<think>b") == [tokens.index("a"), tokens.index("<think>"), tokens.index("b")]
    assert tok.decode(tok.encode("<|im_start|>a<think>"), skip_special_tokens=True) == "a<think>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------- errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    model = tiny_model("tiny-llama")
    path = write_gguf(tmp_path / "mamba.gguf", model, arch="mamba", tensors=llama_tensors(model))
    with pytest.raises(LmstackError, match=r"unsupported architecture 'mamba' \(supported: llama, gpt2\)"):
        load_gguf(path)


def assert_one_line_error(path: Path) -> str:
    with pytest.raises(LmstackError) as info:
        load_model(str(path), dtype="float32")
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_truncated_files(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "full.gguf", tiny_model("tiny-llama"), Q.Q8_0).read_bytes()
    header_end = gguf.GGUFReader(tmp_path / "full.gguf").data_offset
    # cut inside the counts, inside the metadata (the token list), inside the tensor table, inside the data
    for cut in (10, 400, header_end - 20, header_end + 100, len(data) - 1, *range(5, header_end, 61)):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        assert "truncated" in assert_one_line_error(path)
        path.unlink()


def test_corrupt_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a GGUF file" in assert_one_line_error(noise)
    # a valid magic and version, then garbage
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "corrupt" in assert_one_line_error(garbage)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(LmstackError, match="empty.gguf"):
        load_gguf(empty)
    # a tensor offset pointing past the end of the file
    data = bytearray(write_gguf(tmp_path / "ok.gguf", tiny_model("tiny-llama")).read_bytes())
    bad = tmp_path / "bad_offset.gguf"
    bad.write_bytes(bytes(data[: len(data) // 2]) + os.urandom(16))
    assert_one_line_error(bad)


# ------------------------------------------------------------------------------------- kept packed


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tie", [True, False])
def test_keep_packed_int4_equals_the_dequantized_weights(tmp_path: Path, qtype: Q, tie: bool) -> None:
    """quant="keep": Q4 linears become Int4Linear holding the file's own codes (q/k rows un-permuted with their
    scales and zeros), so each layer's weight equals the dequantized import's up to bf16 scales; the
    token embedding is requantized (Q8_0 / float has no lossless int4 target) as the metadata says."""
    from lmstack.checkpoints.inspect import model_summary
    from lmstack.quant.int4 import Int4Linear
    from lmstack.quant.quantize import QuantEmbedding
    base = tiny_model("tiny-llama")
    model = Decoder(from_name("tiny-llama", vocab_size=base.config.vocab_size, tie_embeddings=tie,
                              bos_token_id=1, eos_token_id=2)).eval()
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", model, qtype)
    ref = load_model(str(path), dtype="float32").model
    kept = load_model(str(path), dtype="bfloat16", quant="keep")
    packed = kept.model
    for n in range(model.config.n_layer):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj"):
            layer = packed.get_submodule(f"layers.{n}.{name}")
            assert isinstance(layer, Int4Linear) and layer.group_size == 32
            want = ref.get_submodule(f"layers.{n}.{name}").weight
            # codes exact; the only loss is rounding d (and m + 8d) to bf16: 2^-8 relative per factor
            torch.testing.assert_close(layer.dequantize(dtype=torch.float32), want, rtol=0,
                                       atol=float(want.abs().max()) * 2 ** -7)
    assert isinstance(packed.tok_emb, QuantEmbedding)
    if not tie:  # 264 rows: not a multiple of 16, so the Q4 head cannot be int4 and is dequantized
        assert packed.config.vocab_size % 16 and type(packed.lm_head) is torch.nn.Linear
    assert kept.metadata["quantization"]["modules"]["layers.0.attn.q_proj"]["format"] == "int4-g32"
    got, want = logits(packed, IDS).float(), logits(ref, IDS)
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    storage = model_summary(kept)
    assert "layers.*.attn.q_proj" in storage["storage int4-g32"]
    # float32 still dequantizes everything (the parity tests above keep their meaning)
    assert all(type(m) is not Int4Linear for m in ref.modules())
    with pytest.raises(LmstackError, match="quant mode"):
        load_model(str(path), quant="pack")


def test_auto_keeps_q4_packed_where_bf16_runs_and_inference_fuses_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """quant="auto" with dtype "auto": a Q4 GGUF stays int4 (with a float head) on a CPU with native bf16, and
    dequantizes elsewhere or for an explicit dtype; inference=True fuses the int4 q|k|v and gate|up as they are."""
    import lmstack.checkpoints.load as load
    from lmstack.quant.int4 import Int4Linear
    from lmstack.quant.packed import PackedLinear, packing_available
    base = tiny_model("tiny-llama")
    model = Decoder(from_name("tiny-llama", vocab_size=base.config.vocab_size, bos_token_id=1,
                              eos_token_id=2)).eval()
    path = write_gguf(tmp_path / "q41.gguf", model, Q.Q4_1)
    monkeypatch.setattr(load, "auto_dtype", lambda device="cpu": torch.bfloat16)
    kept = load_model(str(path))
    assert kept.dtype == "bfloat16" and kept.weights == "int4-g32 + bfloat16"
    assert isinstance(kept.model.layers[0].attn.q_proj, Int4Linear)
    assert type(kept.model.tok_emb) is torch.nn.Embedding  # keep-float: the table as the file has it
    fast = load_model(str(path), inference=True).model
    assert fast.layers[0].attn.q_proj is None and isinstance(fast.layers[0].attn.qkv_proj, Int4Linear)
    assert isinstance(fast.layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(fast.lm_head, PackedLinear) or not packing_available()  # the float head, packed
    torch.testing.assert_close(logits(fast, IDS), logits(kept.model, IDS), rtol=0.02, atol=0.02)
    assert fast.num_params() == kept.model.num_params() == model.num_params()
    explicit = load_model(str(path), dtype="float32")
    assert explicit.weights == "float32" and not any(isinstance(m, Int4Linear) for m in explicit.model.modules())
    monkeypatch.setattr(load, "auto_dtype", lambda device="cpu": torch.float32)
    assert load_model(str(path)).weights == "float32"  # no native bf16: the float model


def test_keep_q8_holds_the_files_q8_0_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quant="keep-q8": a Q8_0 token embedding (and tied head) keeps the file's codes and scales (int8-g32), so
    its table equals the float32 import bit for bit; "auto" picks it for a compiled model on a bf16 CPU."""
    import lmstack.checkpoints.load as load
    from lmstack.quant.int8 import Int8Linear
    from lmstack.quant.quantize import QuantEmbedding
    path = write_gguf(tmp_path / "q8.gguf", tiny_model("tiny-llama"), Q.Q8_0)
    ref = load_model(str(path), dtype="float32").model
    kept = load_model(str(path), dtype="bfloat16", quant="keep-q8")
    table = kept.model.tok_emb
    assert isinstance(table, QuantEmbedding) and isinstance(table.table, Int8Linear) and table.table.group_size == 32
    assert torch.equal(table.table.dequantize(dtype=torch.float32), ref.tok_emb.weight)
    assert kept.metadata["quantization"]["modules"]["tok_emb"]["format"] == "int8-g32"
    got, want = logits(kept.model, IDS).float(), logits(ref, IDS)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    monkeypatch.setattr(load, "auto_dtype", lambda device="cpu": torch.bfloat16)
    compiled = load_model(str(path), inference=True, compile=True).model
    assert isinstance(compiled.tok_emb, QuantEmbedding) and compiled.tok_emb.table.group_size == 32
    assert type(load_model(str(path), inference=True).model.tok_emb) is not QuantEmbedding  # eager: keep-float


@pytest.mark.parametrize("mode", ["keep", "keep-float"])
def test_convert_keep_writes_a_packed_native_checkpoint(tmp_path: Path, mode: str) -> None:
    """`lmstack convert --quant keep|keep-float`: the kept GGUF as a native checkpoint, which loads to the same
    model (keep-float: int4 blocks, the embedding and tied head as bf16)."""
    from cli_helpers import run_cli
    path = write_gguf(tmp_path / "m.gguf", tiny_model("tiny-llama"), Q.Q4_1)
    result = run_cli("convert", path, tmp_path / "native", "--quant", mode)
    assert result.exit_code == 0, result.output
    kept, native = load_model(str(path), quant=mode).model, load_model(str(tmp_path / "native")).model
    assert torch.equal(logits(native, IDS), logits(kept, IDS))
    assert (type(native.tok_emb) is torch.nn.Embedding) == (mode == "keep-float")
    result = run_cli("convert", path, tmp_path / "hf", "--to", "hf", "--quant", "keep")
    assert result.exit_code != 0 and "--quant dequantize" in result.output
