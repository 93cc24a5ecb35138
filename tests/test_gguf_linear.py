"""GGUFLinear and the gguf_matmul kernel: a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks, computed in float32, against
gguf.quants.dequantize (the reference) and against the float32 dequantized SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmstack import kernels
from lmstack.errors import LmstackError
from lmstack.quant.gguf_linear import GGML_TYPE, GGUFLinear, dequantize_blocks

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

needs_kernel = pytest.mark.skipif(not kernels.gguf_matmul_available(), reason="no C++ compiler to build it")
QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def gguf_tensor(qtype: str, N: int, K: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(raw blocks [N, K / 32 * bytes], the reference dequantized weight [N, K] float32)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32) * rng.uniform(0.01, 2.0, (N, 1)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = quantize(w, t)
    return raw, torch.from_numpy(dequantize(raw, t).reshape(N, K).copy())


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_blocks_is_gguf_dequantize(qtype: str) -> None:
    raw, ref = gguf_tensor(qtype, 24, 96)
    layer = GGUFLinear.from_blocks(torch.from_numpy(raw.copy()), qtype)
    assert torch.equal(layer.dequantize(), ref)
    rows = torch.tensor([5, 0, 5, 23])
    assert torch.equal(layer.dequantize(rows, torch.float64), ref[rows].double())


def fp32_bound(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A few float32 roundings of the sum of |products| over K (float32 sums in any order)."""
    return 8 * x.shape[1] * torch.finfo(torch.float32).eps * (x.double().abs() @ ref.double().abs().t()) + 1e-6


def kernel_bound(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """What the kernel may differ from x @ ref^T in float64: fp32_bound plus the int16 rounding of x (per block
    of 32, |error| <= amax / 65534) times the block's |d q| (at most 32 values of at most 2 max|w| each, Q4_1's m
    and Q4_0's -8d taken out)."""
    M, K = x.shape
    xmax = x.double().abs().view(M, K // 32, 32).amax(-1)  # [M, NB]
    wmax = ref.double().abs().view(ref.shape[0], K // 32, 32).amax(-1)  # [N, NB]
    return fp32_bound(x, ref) + (xmax @ wmax.t()) * 64 / 65534


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 20, 70])
def test_kernel_matches_the_dequantized_weight(qtype: str, M: int) -> None:
    """Decode-size batches (int16 activations: eight output rows at a time for one row of x, with a tail of 4
    rows; up to 8 rows of x one output row at a time; up to 32 in passes of 8) and prefill-size ones (dequantized
    tiles and mm, with N over one tile of 256 rows and not a multiple of it) against float64 on the reference
    weight."""
    N, K = 300, 160
    raw, ref = gguf_tensor(qtype, N, K, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    x[:, :32] *= 100  # one block of outliers: the int16 scale is per block, the others keep their precision
    got = kernels.gguf_matmul(x, torch.from_numpy(raw.copy()).view(N, -1), GGML_TYPE[qtype])
    assert got.dtype == torch.float32 and got.shape == (M, N)
    want = x.double() @ ref.double().t()
    assert bool(((got.double() - want).abs() <= kernel_bound(x, ref)).all())
    if M > 32:  # the mm path is float32 throughout
        assert bool(((got.double() - want).abs() <= fp32_bound(x, ref)).all())


@needs_kernel
def test_layer_keeps_batch_dims_dtype_and_bias() -> None:
    raw, ref = gguf_tensor("Q4_1", 48, 64)
    bias = torch.randn(48)
    layer = GGUFLinear.from_blocks(torch.from_numpy(raw.copy()), "Q4_1", bias)
    x = torch.randn(2, 3, 64)
    err = (layer(x) - F.linear(x, ref, bias)).abs().reshape(6, 48)
    assert bool((err <= kernel_bound(x.reshape(6, 64), ref)).all())
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)


def test_without_the_kernel_the_layer_dequantizes(monkeypatch: pytest.MonkeyPatch) -> None:
    raw, ref = gguf_tensor("Q8_0", 40, 64)
    layer = GGUFLinear.from_blocks(torch.from_numpy(raw.copy()), "Q8_0")
    monkeypatch.setitem(kernels._state, "built", False)
    monkeypatch.setitem(kernels._state, "gguf_matmul", False)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, ref))


@needs_kernel
def test_concat_is_the_parts_side_by_side() -> None:
    parts = [GGUFLinear.from_blocks(torch.from_numpy(gguf_tensor("Q4_1", n, 64, seed=n)[0].copy()), "Q4_1")
             for n in (32, 16, 16)]
    fused = GGUFLinear.concat(parts)
    x = torch.randn(1, 64)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(LmstackError, match="block type"):
        GGUFLinear.concat([parts[0], GGUFLinear.from_blocks(torch.from_numpy(gguf_tensor("Q8_0", 8, 64)[0]), "Q8_0")])


@needs_kernel
def test_bad_inputs_are_one_line_errors() -> None:
    raw, _ = gguf_tensor("Q4_1", 16, 64)
    blocks = torch.from_numpy(raw.copy()).view(16, -1)
    for x, qtype, match in [(torch.randn(2, 96), 3, "K = 96"), (torch.randn(2, 64).double(), 3, "float32"),
                            (torch.randn(64, 2).t(), 3, "contiguous"), (torch.randn(2, 64), 7, "Q4_0")]:
        with pytest.raises(RuntimeError, match=match) as e:
            kernels.gguf_matmul(x, blocks, qtype)
        assert "\n" not in str(e.value).strip().splitlines()[0]
    with pytest.raises(LmstackError, match="whole 20-byte blocks"):
        GGUFLinear.from_blocks(blocks[:, :30], "Q4_1")
    with pytest.raises(LmstackError, match="not one of"):
        GGUFLinear(64, 16, "Q6_K")
    with pytest.raises(LmstackError, match="multiple of 32"):
        GGUFLinear(48, 16, "Q8_0")


@needs_kernel
def test_compiled_layer_calls_the_kernel() -> None:
    raw, ref = gguf_tensor("Q4_0", 64, 96)
    layer = GGUFLinear.from_blocks(torch.from_numpy(raw.copy()), "Q4_0")
    x = torch.randn(1, 96)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001
        graphs.append(gm)
        return gm.forward

    with torch.inference_mode():
        got = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert torch.equal(got, layer(x))
    assert any("gguf_matmul" in str(node.target) for gm in graphs for node in gm.graph.nodes)


def rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_release_pages_drops_a_mapped_files_pages_and_keeps_its_bytes(tmp_path: Path) -> None:
    """What fuse_projections_ does to a memory-mapped GGUF's parts once copied: their pages leave the resident
    set, and read again they are the file's bytes."""
    import mmap

    from lmstack.checkpoints.gguf import release_pages
    data = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8)
    path = tmp_path / "blocks.bin"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensor = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, offset=1000, count=(16 << 20) - 2000))
    assert int(tensor.sum()) == int(data[1000:-1000].astype(np.int64).sum())  # every page read in
    before = rss_file_mb()
    release_pages(tensor)
    assert before - rss_file_mb() > 8  # of 16 MB (the kernel's counters are approximate)
    assert torch.equal(tensor, torch.from_numpy(data[1000:-1000]))
    release_pages(torch.empty(0, dtype=torch.uint8))  # nothing to drop


# ------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_pair():
    from lmstack.checkpoints import load_model
    try:
        ref = load_model("smollm2-135m-instruct", dtype="float32", inference=True)
    except LmstackError as e:
        pytest.skip(str(e))
    return ref, load_model("smollm2-135m-instruct", quant="blocks", inference=True)


@needs_kernel
def test_smollm2_blocks_compute_the_float32_model(smollm2_pair) -> None:
    """The file's blocks kept (fused q|k|v and gate|up included) give the dequantized float32 model's logits, and
    its greedy tokens."""
    from lmstack.checkpoints.inspect import storage_formats
    from lmstack.generation import GenerationConfig, Generator
    ref, blocks = smollm2_pair
    assert set(storage_formats(blocks.model)) == {"gguf-q4_1", "gguf-q8_0", "float32"}
    assert blocks.weights == "gguf-q4_1 + gguf-q8_0 + float32"
    tok = ref.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]),
                     add_special_tokens=False)
    with torch.inference_mode():
        torch.testing.assert_close(blocks.model(torch.tensor([ids])), ref.model(torch.tensor([ids])),
                                   atol=1e-4, rtol=1e-4)
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    want = Generator(ref.model, tok).generate(ids, cfg).token_ids
    assert Generator(blocks.model, tok).generate(ids, cfg).token_ids == want


@needs_kernel
def test_smollm2_blocks_round_trip_a_native_checkpoint(smollm2_pair, tmp_path: Path) -> None:
    """Saved with its blocks, reloaded packed with the same logits; a truncated blocks tensor is one line."""
    from safetensors.torch import load_file, save_file

    from lmstack.checkpoints import load_model
    from lmstack.checkpoints.inspect import convert
    _, blocks = smollm2_pair
    out = convert("smollm2-135m-instruct", str(tmp_path / "native"), quant="blocks")
    again = load_model(str(out), inference=True)
    assert again.weights == blocks.weights
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        assert torch.equal(again.model(ids), blocks.model(ids))
    state = load_file(out / "model.safetensors")
    key = "layers.0.mlp.down_proj.blocks"
    state[key] = state[key][:, :-20].contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmstackError, match="down_proj.blocks") as e:
        load_model(str(out))
    assert "\n" not in str(e.value)
