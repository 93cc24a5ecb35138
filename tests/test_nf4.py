"""NF4 with double quantization against bitsandbytes (CPU backend), its storage cost, and QLoRA layers.

bitsandbytes quantizes 4-bit codes by nearest NF4 level (midpoint buckets) like lmstack, so the packed 4-bit
codes must be identical. Its CPU kernel for the 8-bit double quantization of the absmax constants (a binary
search in C) picks a neighbouring level for a fraction of a percent of constants, so there the test asserts that
lmstack's choice is the nearest level and that bitsandbytes' is its neighbour.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models.decoder import Decoder
from lmstack.peft import LoRALinear, apply_lora, lora_config, merge_lora
from lmstack.quant import NF4Weight
from lmstack.quant.nf4 import (BLOCK, BLOCK2, DYNAMIC_LEVELS, NF4_LEVELS, blockwise_absmax_quantize, dynamic_map,
                              unpack_nibbles)

bnbf = pytest.importorskip("bitsandbytes.functional")

from test_lora import assert_only_trainable_changed, randomize_lora, tokens, train_peft

torch.set_num_threads(2)


def bnb_nf4(x: torch.Tensor):
    return bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)


def weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and a per-row scale, like trained weights.
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 0.05
            + 0.01 * torch.randn(shape, generator=g) ** 3).to(dtype)


# ---------------------------------------------------------------------------------------- code books


def test_nf4_levels_are_the_papers_and_bitsandbytes() -> None:
    assert torch.equal(NF4_LEVELS, bnbf.get_4bit_type("nf4", device="cpu"))
    # The QLoRA construction: normal quantiles at evenly spaced probabilities from 1 - delta to 1/2, 8 positive
    # and 7 negative levels plus an exact zero, normalized to [-1, 1]; delta = (1/32 + 1/30) / 2 (paper, eq. 4).
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(NF4_LEVELS.double(), levels / levels.max(), rtol=0, atol=2e-6)


def test_dynamic_map_matches_bitsandbytes() -> None:
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    assert DYNAMIC_LEVELS.shape == (256,) and bool((DYNAMIC_LEVELS.diff() >= 0).all())


# ------------------------------------------------------------------------------------------ vs bnb


@pytest.mark.parametrize("shape,dtype", [((96, 64), torch.float32), ((576, 576), torch.float32),
                                         ((300, 170), torch.float32), ((3, 7, 5), torch.float32),
                                         ((128, 192), torch.bfloat16)])
def test_codes_and_reconstruction_match_bitsandbytes(shape, dtype) -> None:
    x = weight(shape, dtype=dtype)
    packed, state = bnb_nf4(x)
    ours = NF4Weight(x)
    n = x.numel()
    # First level: identical packed 4-bit codes (same layout: row-major blocks, first code in the high nibble).
    assert torch.equal(ours.codes, packed.view(-1))
    # Second level: same offset (mean of the constants) and the same per-256 fp32 scales.
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scales, state.state2.absmax)
    # 8-bit codes: ours is the nearest level; bitsandbytes' CPU kernel sometimes takes a neighbour.
    _, absmax = blockwise_absmax_quantize(x.reshape(-1).float(), BLOCK, NF4_LEVELS)
    nb = absmax.numel()
    pad = math.ceil(nb / BLOCK2) * BLOCK2 - nb
    scaled = (torch.nn.functional.pad(absmax - ours.absmax_offset, (0, pad)).view(-1, BLOCK2)
              * (1.0 / ours.absmax_scales)[:, None]).view(-1)[:nb]
    dist_ours = (scaled - DYNAMIC_LEVELS[ours.absmax_codes.long()]).abs()
    dist_bnb = (scaled - DYNAMIC_LEVELS[state.absmax.long()]).abs()
    assert bool((dist_ours <= (scaled[:, None] - DYNAMIC_LEVELS[None]).abs().min(dim=1).values).all())
    differ = ours.absmax_codes != state.absmax
    assert int(differ.sum()) <= max(1, nb // 100)
    # Where they differ, bitsandbytes took a neighbouring level of ours, never a nearer one.
    assert bool(((ours.absmax_codes.long() - state.absmax.long())[differ].abs() == 1).all())
    assert bool((dist_bnb[differ] >= dist_ours[differ]).all())
    gap = (DYNAMIC_LEVELS[ours.absmax_codes.long()] - DYNAMIC_LEVELS[state.absmax.long()]).abs()
    # Reconstruction: bit-identical in every block whose constant got the same code, close everywhere.
    deq_bnb = bnbf.dequantize_4bit(packed, state).float().reshape(-1)
    deq_ours = ours.dequantize(dtype).float().reshape(-1)  # both compute in float32, then round to dtype
    same = (~differ).repeat_interleave(BLOCK)[:n]
    assert torch.equal(deq_ours[same], deq_bnb[same])
    # Elsewhere each value differs by at most the one 8-bit step its block constant took (|NF4 level| <= 1).
    scale = ours.absmax_scales.repeat_interleave(BLOCK2)[:nb]
    step = (gap * scale).repeat_interleave(BLOCK)[:n]
    rounding = deq_bnb.abs() * torch.finfo(dtype).eps + 1e-7  # one rounding to dtype; float32 constants
    assert bool(((deq_ours - deq_bnb).abs() <= step + rounding).all())
    err_ours = (deq_ours - x.reshape(-1).float()).abs().mean()
    err_bnb = (deq_bnb - x.reshape(-1).float()).abs().mean()
    assert err_ours == pytest.approx(float(err_bnb), rel=1e-3)
    assert ours.dequantize().dtype == dtype and ours.dequantize().shape == x.shape


def test_round_trip_error_is_bounded_by_the_code_book() -> None:
    x = weight((64, 128))
    w = NF4Weight(x)
    codes = unpack_nibbles(w.codes, x.numel()).long()
    assert int(codes.max()) <= 15
    # Each value is off by at most half the widest NF4 gap times its block's absmax, plus the error that double
    # quantization put into that absmax (|NF4 level| <= 1).
    blocks = x.reshape(-1, BLOCK)
    err = (w.dequantize().reshape(-1, BLOCK) - blocks).abs()
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    half_gap = NF4_LEVELS.diff().max() / 2
    assert bool((err <= absmax * half_gap + (w.absmax()[:, None] - absmax).abs() + 1e-7).all())
    assert float((w.absmax()[:, None] - absmax).abs().max()) < 0.01 * float(absmax.max())
    assert torch.equal(NF4Weight(torch.zeros(4, 64)).dequantize(), torch.zeros(4, 64))


def test_casting_the_model_keeps_the_float32_constants() -> None:
    layer = LoRALinear.from_linear(torch.nn.Linear(128, 32), rank=2, alpha=4, nf4=True)
    before = layer.nf4.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.nf4.absmax_scales.dtype == torch.float32 and layer.nf4.codes.dtype == torch.uint8
    assert torch.equal(layer.nf4.dequantize(torch.float32), before)
    assert layer.lora_a.dtype == torch.bfloat16  # ordinary parameters are cast as usual


def test_bits_per_parameter_with_double_quantization() -> None:
    w = NF4Weight(weight((576, 576)))
    n = 576 * 576
    # 4-bit codes, an 8-bit constant per 64 values, an fp32 scale per 256 constants, one fp32 offset.
    expected_bytes = n // 2 + n // BLOCK + 4 * math.ceil(n / BLOCK / BLOCK2) + 4
    assert w.nbytes() == expected_bytes
    bits = w.bits_per_parameter()
    print(f"NF4 + double quantization: {bits:.4f} bits per parameter")  # 4.1271 for 576 x 576
    assert 4.12 < bits <= 4.5
    # The asymptotic cost; the last, partly filled block of 256 constants adds a little.
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=5e-4)


# --------------------------------------------------------------------------------------------- QLoRA


def tiny(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(from_name("tiny-llama", n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, max_seq_len=64))


def test_qlora_error_is_exactly_the_quantization_error() -> None:
    base = tiny()
    qlora = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="all-linear", nf4=True)
    full = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="all-linear")
    randomize_lora(qlora)
    randomize_lora(full)
    # The reference: the same LoRA model with each base weight replaced by its dequantized NF4 copy.
    dequant = copy.deepcopy(full)
    reference = dict(dequant.named_modules())
    with torch.no_grad():
        for name, q in qlora.named_modules():
            if isinstance(q, LoRALinear):
                assert q.weight is None and isinstance(q.nf4, NF4Weight)
                reference[name].weight.copy_(q.nf4.dequantize(torch.float32))
    ids, labels = tokens(vocab=256), tokens(vocab=256, seed=2)
    out_q, out_d, out_f = qlora(ids), dequant(ids), full(ids)
    torch.testing.assert_close(out_q, out_d, rtol=0, atol=0)  # the only error is quantization
    assert (out_q - out_f).abs().max() > 1e-4  # and there is some
    loss = lambda out: torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten())  # noqa: E731
    loss(out_q).backward()
    loss(out_d).backward()
    reference = dict(dequant.named_parameters())
    trained = [(n, p) for n, p in qlora.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * 2
    for name, p in trained:
        torch.testing.assert_close(p.grad, reference[name].grad, rtol=1e-5, atol=1e-7)
    # Only the adapter is in the state dict's trainable part; NF4 base weights are not parameters.
    assert {n for n, p in qlora.named_parameters() if p.requires_grad} == \
        {n for n in qlora.state_dict() if n.endswith((".lora_a", ".lora_b"))}
    assert lora_config(qlora)["nf4"] is True


def test_qlora_merge_dequantizes_and_refuses_in_place() -> None:
    qlora = apply_lora(tiny(), rank=4, alpha=8, targets=["q", "down"], nf4=True)
    randomize_lora(qlora)
    with pytest.raises(LmstackError, match="NF4 base weight"):
        qlora.layers[0].attn.q_proj.merge()
    ids = tokens(vocab=256)
    with torch.no_grad():
        expected = qlora(ids)
        merged = merge_lora(qlora)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)


def test_qlora_bf16_base() -> None:
    base = tiny().to(torch.bfloat16)
    qlora = apply_lora(base, rank=4, alpha=8, targets="all-linear", nf4=True)
    layer = qlora.layers[0].mlp.up_proj
    assert layer.lora_a.dtype == torch.float32 and layer.nf4.dequantize().dtype == torch.bfloat16
    out = qlora(tokens(vocab=256))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.lora_b.grad is not None and layer.lora_b.grad.dtype == torch.float32


@pytest.mark.slow
def test_qlora_trains_only_the_adapter(tmp_path: Path) -> None:
    model = apply_lora(tiny(), rank=4, alpha=8, targets="all-linear", nf4=True)
    codes = {n: m.nf4.codes.clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    _, frozen, trainable, before, after = train_peft(model, tmp_path)
    assert_only_trainable_changed(model, frozen, trainable)  # buffers include every NF4 code and constant
    assert all(torch.equal(m.nf4.codes, codes[n]) for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert after < before
