"""GPTQ (quant/gptq.py): the column-by-column int4 quantization against calibration activations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lmstack.compression.quantize import quantize
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.quant.gptq import gptq_, gptq_int4
from lmstack.quant.int4 import Int4Linear, quantize_int4
from lmstack.quant.quantize import quantize_


def dequantized(codes: Tensor, scales: Tensor, zeros: Tensor, group: int) -> Tensor:
    N, K = codes.shape
    return ((codes.float() - 8).view(N, K // group, group) * scales[..., None] + zeros[..., None]).view(N, K)


def correlated_inputs(rows: int, K: int) -> Tensor:
    torch.manual_seed(0)
    mix = torch.randn(K, K) * 0.3 + torch.eye(K)  # correlated features, as a layer's inputs are
    return torch.randn(rows, K) @ mix  # [R, K]


@pytest.mark.parametrize("group", [32, 64])
def test_gptq_halves_the_output_error_of_round_to_nearest(group: int) -> None:
    N, K = 64, 256
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    X = correlated_inputs(2048, K)
    rtn = dequantized(*quantize_int4(W, group), group)
    codes, scales, zeros = gptq_int4(W, X.T @ X, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    gptq = dequantized(codes, scales, zeros, group)
    error = lambda Wq: float(((X @ (W - Wq).T) ** 2).mean())  # noqa: E731
    assert error(gptq) < 0.6 * error(rtn)
    # The codes are the layer's: Int4Linear computes x @ gptq^T (bf16 activations).
    x = X[:4].to(torch.bfloat16)
    layer = Int4Linear.from_codes(codes, scales, zeros, group)
    torch.testing.assert_close(layer(x).float(), x.float() @ gptq.T, rtol=0.02, atol=0.3)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest() -> None:
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    H = torch.diag(torch.rand(128) + 0.5)  # uncorrelated inputs: no error is spread to other columns
    for got, want in zip(gptq_int4(W, H, 32), quantize_int4(W, 32)):
        assert torch.equal(got, want)


def test_gptq_model_is_closer_to_the_float_model_than_round_to_nearest() -> None:
    torch.manual_seed(0)
    model = build_model(from_name("tiny-llama")).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    with torch.inference_mode():
        reference = model(ids).float()
    rtn, calibrated = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(rtn, "int4-g32", embedding_scheme="int8")
    choices = gptq_(calibrated, ids, "int4-g32")
    assert {c.name.split(".")[0] for c in choices} == {"layers"}
    assert all(type(m) is not nn.Linear for m in calibrated.layers.modules())
    quantize_(calibrated, "int4-g32", embedding_scheme="int8")  # the head and embedding, as `quantize` does
    with torch.inference_mode():
        errors = [float(((m(ids).float() - reference) ** 2).mean()) for m in (rtn, calibrated)]
    assert errors[1] < errors[0]


def test_calibrate_needs_an_int4_scheme(tmp_path) -> None:
    with pytest.raises(LmstackError, match="int4 schemes only"):
        quantize(model="unused", scheme="int8", out=str(tmp_path / "q"), calibrate=64)


def test_quantize_cli_calibrates_with_gptq_and_the_checkpoint_loads(tmp_path) -> None:
    import json

    from cli_helpers import run_cli
    from test_quant import _tiny_tokenizer

    from lmstack.checkpoints import load_model, save_native
    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    src = save_native(build_model(from_name("tiny-llama", vocab_size=tok.vocab_size)).eval(), tok, tmp_path / "s")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    result = run_cli("quantize", "--model", src, "--scheme", "int4-g32", "--out", tmp_path / "q", "--calibrate",
                     "128", "--calibration-text", text, "--eval-text", text, "--eval-chars", "800", "--window", "64",
                     "--decode-tokens", "0")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "q" / "lmstack.json").read_text())
    assert "gptq, 128 tokens" in json.dumps(meta)
    reloaded = load_model(str(tmp_path / "q")).model
    assert isinstance(reloaded.layers[0].mlp.down_proj, Int4Linear)
    result = run_cli("quantize", "--model", src, "--scheme", "int4-g32", "--out", tmp_path / "q2", "--calibrate",
                     "100000", "--calibration-text", text, "--window", "64")
    assert result.exit_code != 0 and "fewer than calibrate=100000" in result.output
