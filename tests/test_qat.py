"""Quantization-aware training: fake-quant modules, the straight-through estimator, conversion to the packed
layers (exact codes, logits equal up to bf16 rounding) and `lmstack finetune --qat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from torch import nn

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.quant.int4 import Int4Linear, quantize_int4
from lmstack.quant.int8 import Int8Linear
from lmstack.quant.qat import (FakeQuantEmbedding, FakeQuantLinear, QatFormat, convert_qat_, fake_quantize,
                               parse_qat_scheme, prepare_qat_)
from lmstack.quant.quantize import QuantEmbedding, fuse_projections_, quantize_

torch.set_num_threads(2)
FAST = ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
        "--max-seq-len", "64", "--lr", "1e-3"]


def tiny_llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(from_name("tiny-llama", **overrides)).eval()


# ------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "int8", "int3-g32", "int2-g64"])
def test_fake_quant_values_are_the_packed_layers_values(scheme: str) -> None:
    """The fake-quant weight is exactly what the converted layer dequantizes to (same codes, scales, zeros)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    fmt = parse_qat_scheme(scheme)
    model = nn.Sequential(linear)
    prepare_qat_(model, scheme)
    fake = fake_quantize(linear.weight, fmt)
    convert_qat_(model)
    layer = model[0]
    assert isinstance(layer, Int8Linear if fmt.bits == 8 else Int4Linear)
    assert torch.equal(layer.dequantize(dtype=torch.float32), fake)
    if fmt.bits < 8:
        assert int(layer.codes().max()) <= 2**fmt.bits - 1
        # 4 bits: the same codes the real PTQ path chooses.
        if fmt.bits == 4:
            assert torch.equal(layer.codes(), quantize_int4(linear.weight, fmt.group_size)[0])


def test_fewer_bits_give_a_coarser_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    errors = [(fake_quantize(w, QatFormat(bits, 32)) - w).abs().mean() for bits in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > 0
    for bits in (2, 3):
        groups = fake_quantize(w, QatFormat(bits, 32)).view(64, 32)  # [N * K/G, G]
        assert max(len(group.unique()) for group in groups) <= 2**bits


def test_straight_through_gradient_reaches_the_float_weights() -> None:
    model = tiny_llama()
    prepare_qat_(model, "int4-g32")
    x = torch.randint(0, 256, (2, 10))
    model(x).logsumexp(-1).mean().backward()
    q = model.layers[0].attn.q_proj
    assert isinstance(q, FakeQuantLinear) and q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0
    # The estimator is the identity: the gradient equals the textbook STE form w + (Q(w) - w).detach().
    x = torch.randn(4, q.in_features)
    w = q.weight.detach().clone().requires_grad_()
    g = torch.randn(4, q.out_features)
    q.weight.grad = None
    (q(x) * g).sum().backward()
    w_q = w + (fake_quantize(w, q.fmt) - w).detach()
    (torch.nn.functional.linear(x, w_q, q.bias) * g).sum().backward()
    torch.testing.assert_close(q.weight.grad, w.grad)


def test_state_dict_keys_are_the_float_models() -> None:
    model, ref = tiny_llama(), tiny_llama()
    prepare_qat_(model, "int4-g32")
    assert model.state_dict().keys() == ref.state_dict().keys()
    model.load_state_dict(ref.state_dict())  # a float checkpoint (or a trainer's resume) loads unchanged


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("scheme,tol", [("int4-g32", 0.05), ("int4-g64", 0.05), ("int3-g32", 0.05),
                                        ("int2-g32", 0.05), ("int8", 1e-4)])
@pytest.mark.parametrize("tied", [True, False])
def test_converted_logits_equal_the_fake_quant_logits(scheme: str, tol: float, tied: bool) -> None:
    model = tiny_llama(tie_embeddings=tied)
    report = prepare_qat_(model, scheme)
    assert all(c.used == c.scheme for c in report), report
    assert isinstance(model.tok_emb, FakeQuantEmbedding)
    assert not any(type(m) is nn.Linear for m in model.modules())
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        fake = model(x)
        assert convert_qat_(model) == len(report)
        got = model(x)
    assert isinstance(model.tok_emb, QuantEmbedding)
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())
    # The int4 kernel rounds activations to bf16 in every layer (tol, as in test_quant); int8 computes in float32.
    torch.testing.assert_close(got, fake, atol=tol, rtol=tol)


def test_converted_bf16_model_matches_in_bf16() -> None:
    model = tiny_llama().to(torch.bfloat16)
    prepare_qat_(model, "int4-g32")
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        fake = model(x).float()
        convert_qat_(model)
        got = model(x).float()
    # Both compute in bf16 from the same bf16 weights; they differ in accumulation order only (a few bf16 ulps
    # of the logits' scale).
    scale = fake.abs().max()
    assert (got - fake).abs().max() <= 16 * 2.0**-8 * scale


def test_untrained_qat_conversion_is_ptq() -> None:
    """prepare then convert with no training in between gives quantize_'s model (same packed tensors)."""
    qat, ptq = tiny_llama(), tiny_llama()
    prepare_qat_(qat, "int4-g32")
    convert_qat_(qat)
    quantize_(ptq, "int4-g32")
    a, b = qat.state_dict(), ptq.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_shapes_the_kernel_cannot_take_fall_back_to_int8(caplog) -> None:
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64))  # N = 40 is not a multiple of 16; K = 40 no group
    with caplog.at_level("WARNING"):
        report = prepare_qat_(model, "int4-g32")
    assert [c.used for c in report] == ["int8", "int8"]
    assert "instead of int4-g32" in caplog.text
    convert_qat_(model)
    assert all(isinstance(m, Int8Linear) for m in model)


def test_bad_schemes_and_states_get_one_line_errors() -> None:
    for bad in ("int4-g16", "int5-g32", "nf4", "int4"):
        with pytest.raises(LmstackError, match="unknown QAT scheme"):
            parse_qat_scheme(bad)
    model = tiny_llama()
    with pytest.raises(LmstackError, match="no fake-quant modules"):
        convert_qat_(model)
    prepare_qat_(model, "int8")
    with pytest.raises(LmstackError, match="already has fake-quant"):
        prepare_qat_(model, "int8")


# ------------------------------------------------------------------------------------------ finetune --qat


def _alpaca(path: Path, n: int) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["the quick brown fox", "hello world", "a small model", "paris is", "lazy dog"]
    rows = [json.dumps({"instruction": f"repeat {words[int(i)]}", "output": words[int(i)]})
            for i in torch.randint(0, len(words), (n,), generator=g)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_finetune_qat_writes_a_quantized_checkpoint(tiny: Path, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl", 40)
    out = tmp_path / "qat"
    result = run_cli("finetune", "--method", "full", "--qat", "int4-g32", "--model", tiny, "--data", data,
                     "--out", out, *FAST)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and report["adapter_bytes"] == (out / "model.safetensors").stat().st_size
    info = json.loads((out / "lmstack.json").read_text())
    assert info["metadata"]["finetune"]["qat"]["scheme"] == "int4-g32"
    assert {m["format"] for m in info["metadata"]["quantization"]["modules"].values()} == {"int4-g32"}
    from lmstack.checkpoints import load_model
    loaded = load_model(str(out), dtype="bfloat16")  # the one loader rebuilds the packed modules
    model, tok = loaded.model, loaded.tokenizer
    assert isinstance(model.tok_emb, QuantEmbedding)
    assert isinstance(model.layers[0].attn.qkv_proj, Int4Linear)  # fused, as `lmstack quantize` writes it
    assert info["metadata"]["quantization"]["fused"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tok.encode("repeat hello world")]))).all()
    # The trained float weights moved: the checkpoint differs from quantizing the base model.
    base = load_quantized_base(tiny)
    assert not torch.equal(model.layers[0].attn.qkv_proj.codes(), base.layers[0].attn.qkv_proj.codes())


def load_quantized_base(tiny: Path) -> nn.Module:
    from lmstack.checkpoints import load_model
    model = load_model(str(tiny), dtype="float32").model
    fuse_projections_(model)
    quantize_(model, "int4-g32")
    return model


def test_finetune_qat_with_lora_or_a_bad_scheme_is_one_line(tiny: Path, tmp_path: Path) -> None:
    data = _alpaca(tmp_path / "d.jsonl", 20)
    common = ["--model", tiny, "--data", data, "--out", tmp_path / "o", *FAST]
    assert_one_line_error(run_cli("finetune", "--method", "lora", "--qat", "int4-g32", *common),
                          "--qat trains the full model")
    assert_one_line_error(run_cli("finetune", "--method", "full", "--qat", "int4-g48", *common),
                          "unknown QAT scheme")
    assert_one_line_error(run_cli("finetune", "--method", "full", "--qat-embedding", "int8", *common),
                          "--qat-embedding needs --qat")


def test_fused_conversion_packs_the_same_rows() -> None:
    """convert_qat_(fuse=True) equals fuse_projections_ + quantize_ on the float model (row-wise formats)."""
    qat, ptq = tiny_llama(), tiny_llama()
    prepare_qat_(qat, "int4-g32")
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        fake = qat(x)
        convert_qat_(qat, fuse=True)
        got = qat(x)
    assert qat.layers[0].attn.qkv_proj is not None and isinstance(qat.layers[0].mlp.gate_up_proj, Int4Linear)
    fuse_projections_(ptq)
    quantize_(ptq, "int4-g32")
    a, b = qat.state_dict(), ptq.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(got, fake, atol=0.05, rtol=0.05)
