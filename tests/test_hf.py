"""HF folders: import of tiny random Llama (GQA), GPT-2, BERT and T5 models, export back to transformers, bad input.

Every comparison runs transformers itself on the same folder in fp32. Weights are redrawn with a large std
(norm gains and biases included) so that a swapped or transposed tensor cannot hide behind ones and zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from lmstack.checkpoints import load_model, resolve
from lmstack.checkpoints.hf import export_hf
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def tokens(vocab: int, batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def padding_mask(batch: int = 2, length: int = 11) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)  # [B, T]
    mask[1, 7:] = 0  # the second row is padded
    return mask


def save_hf(model: nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


# ------------------------------------------------------------------------------------------ import


def llama_config(tie: bool, bias: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=50000.0,
        attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tie)


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_import_llama_gqa_matches_transformers(tmp_path: Path, tie: bool, bias: bool) -> None:
    ref = randomize(transformers.LlamaForCausalLM(llama_config(tie, bias)))
    loaded = load_model(str(save_hf(ref, tmp_path)), dtype="float32")
    assert loaded.config.n_kv_head == 2 and loaded.config.head_dim == 24 and loaded.config.rope_base == 50000.0
    assert loaded.config.tie_embeddings == tie
    ids = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), ref(ids).logits)


def test_import_mistral_as_llama(tmp_path: Path) -> None:
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                     sliding_window=16)
    ref = randomize(transformers.MistralForCausalLM(cfg))
    loaded = load_model(str(save_hf(ref, tmp_path)), dtype="float32")
    assert loaded.config.max_seq_len == 16  # exact only inside the sliding window, so the context stops there
    ids = tokens(97, length=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), ref(ids).logits)


def test_import_gpt2_matches_transformers(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    ref = randomize(transformers.GPT2LMHeadModel(cfg))
    loaded = load_model(str(save_hf(ref, tmp_path)), dtype="float32")
    ids = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), ref(ids).logits)


def test_import_gpt2_base_model_without_prefix(tmp_path: Path) -> None:
    # The original hub files hold GPT2Model: no "transformer." prefix and no head (it is tied).
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=1, n_head=4, n_positions=32,
                                  activation_function="gelu", bos_token_id=0, eos_token_id=0)
    ref = randomize(transformers.GPT2Model(cfg))
    loaded = load_model(str(save_hf(ref, tmp_path)), dtype="float32")
    assert loaded.config.activation == "gelu"
    ids = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, return_hidden=True), ref(ids).last_hidden_state)


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=32, type_vocab_size=2)


def test_import_bert_mlm_with_padding_mask(tmp_path: Path) -> None:
    ref = randomize(transformers.BertForMaskedLM(bert_config()))
    loaded = load_model(str(save_hf(ref, tmp_path)), dtype="float32")
    assert loaded.config.mlm_head and not loaded.config.cls_pooler
    ids, mask = tokens(97), padding_mask()
    types = (torch.arange(11) >= 5).long().expand(2, 11)  # a sentence pair: A then B
    real = mask.bool()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = loaded.model(ids, mask, types)  # [B, T, C]
        # Padded positions are garbage in both; every real position must agree.
        torch.testing.assert_close(hidden[real], out.hidden_states[-1][real])
        torch.testing.assert_close(loaded.model.mlm_logits(hidden)[real], out.logits[real])
        # Without a mask, a full batch still matches.
        torch.testing.assert_close(loaded.model.mlm_logits(loaded.model(ids)), ref(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------- t5


@pytest.mark.parametrize("feed_forward_proj,tied", [("relu", True), ("gated-gelu", False)])
def test_import_t5_folder_and_convert_it(tmp_path: Path, feed_forward_proj: str, tied: bool) -> None:
    """An HF T5 folder loads through load_model, as transformers computes it, and `lmstack convert` keeps it."""
    cfg = transformers.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=1,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                dropout_rate=0.0, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init gives tiny logits; larger weights make the comparison mean something
        for p in ref.parameters():
            p.mul_(4.0 if p.ndim == 2 else 1.0)
    folder = save_hf(ref, tmp_path / "t5")
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.config.family == "seq2seq" and loaded.metadata["hf_model_type"] == "t5"
    src, tgt, mask = tokens(97), tokens(97, length=5, seed=2), padding_mask()
    with torch.no_grad():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(loaded.model(src, tgt, mask.bool()), want, atol=1e-4, rtol=1e-4)

    from typer.testing import CliRunner

    from lmstack.cli import app
    out = tmp_path / "native"
    result = CliRunner().invoke(app, ["convert", str(folder), str(out), "--to", "native"])
    assert result.exit_code == 0, result.output
    again = load_model(str(out), dtype="float32")
    assert again.metadata["converted_from"] == str(folder)
    with torch.no_grad():
        torch.testing.assert_close(again.model(src, tgt, mask.bool()), want, atol=1e-4, rtol=1e-4)


def test_import_bert_model_with_pooler_sharded(tmp_path: Path) -> None:
    ref = randomize(transformers.BertModel(bert_config()))
    folder = save_hf(ref, tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.config.cls_pooler and not loaded.config.mlm_head
    ids, mask = tokens(97), padding_mask()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask)
        hidden = loaded.model(ids, mask)
        torch.testing.assert_close(hidden[mask.bool()], out.last_hidden_state[mask.bool()])
        torch.testing.assert_close(loaded.model.pooled_cls(hidden), out.pooler_output)
    with pytest.raises(RuntimeError, match="no MLM head"):
        loaded.model.mlm_logits(hidden)


# ------------------------------------------------------------------------------------------ export


def exported(preset: str, tmp_path: Path, **overrides) -> tuple[nn.Module, Path]:
    model = randomize(build_model(from_name(preset, **overrides)))
    return model, export_hf(model, None, tmp_path / "export")


@pytest.mark.parametrize("preset,overrides", [("tiny-llama", {}), ("tiny-llama", {"tie_embeddings": False}),
                                              ("tiny-gpt2", {})])
def test_export_decoder_loads_in_transformers(tmp_path: Path, preset: str, overrides: dict) -> None:
    model, folder = exported(preset, tmp_path, **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokens(256)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids))
    # And back: the exported folder imports to the same tensors.
    again = load_model(str(folder), dtype="float32").model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_export_bert_mlm_loads_in_transformers(tmp_path: Path) -> None:
    model, folder = exported("tiny-bert", tmp_path)
    ref = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids, mask = tokens(256), padding_mask()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask).logits[real],
                                   model.mlm_logits(model(ids, mask))[real])


def test_export_bert_model_with_pooler_loads_in_automodel(tmp_path: Path) -> None:
    model, folder = exported("tiny-bert", tmp_path, mlm_head=False, cls_pooler=True)
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    ids, mask = tokens(256), padding_mask()
    with torch.no_grad():
        out, hidden = ref(input_ids=ids, attention_mask=mask), model(ids, mask)
        torch.testing.assert_close(out.last_hidden_state[mask.bool()], hidden[mask.bool()])
        torch.testing.assert_close(out.pooler_output, model.pooled_cls(hidden))


def test_export_refuses_what_hf_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(LmstackError, match="as HF gpt2: needs n_kv_head=n_head"):
        exported("tiny-gpt2", tmp_path, n_kv_head=2)
    model = build_model(from_name("tiny-llama"))
    model.layers[0].attn.q_proj.register_buffer("extra", torch.zeros(1))  # e.g. an unmerged adapter
    with pytest.raises(LmstackError, match="no HF name for layers.0.attn.q_proj.extra"):
        export_hf(model, None, tmp_path / "x")


@pytest.mark.slow
def test_minilm_round_trip(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: export, then transformers and sentence-transformers read our folder."""
    from sentence_transformers import SentenceTransformer

    source = resolve("minilm-l6")
    loaded = load_model("minilm-l6", dtype="float32")
    folder = export_hf(loaded.model, loaded.tokenizer, tmp_path / "minilm")
    texts = ["The cat sat on the mat.", "Embeddings map sentences to vectors, so similar meanings end up close."]
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(source)
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]
    batch = theirs(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(source).eval()(**batch)
        got = transformers.AutoModel.from_pretrained(folder).eval()(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real])
    torch.testing.assert_close(got.pooler_output, expected.pooler_output)
    emb = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    ref = SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref)


# --------------------------------------------------------------------------------------- bad input


def one_line_error(path: Path) -> str:
    with pytest.raises(LmstackError) as err:
        load_model(str(path), dtype="float32")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened: lmstack never unpickles")
    message = one_line_error(tmp_path)
    assert "pytorch_model.bin" in message and "never unpickles" in message


def test_unsupported_architecture(tmp_path: Path) -> None:
    # T5 was the example until its importer was registered; BART is not supported.
    transformers.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                            decoder_attention_heads=4).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert "unsupported architecture 'bart' (supported: llama, mistral, gpt2, bert, t5)" in one_line_error(tmp_path)


def test_missing_config_field(tmp_path: Path) -> None:
    save_hf(transformers.BertModel(bert_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "missing field 'hidden_size' for bert" in one_line_error(tmp_path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_hf(transformers.BertModel(bert_config()), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or truncated safetensors" in one_line_error(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    ref = transformers.LlamaForCausalLM(llama_config(tie=True, bias=False))
    state = {k: v for k, v in ref.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_hf(ref, tmp_path, state_dict=state)
    assert "model.layers.1.mlp.up_proj.weight is missing" in one_line_error(tmp_path)
