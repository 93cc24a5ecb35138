"""The hand-written CPU decode attention (lmstack.kernels) against SDPA in float32, and in the compiled step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack import kernels

pytestmark = pytest.mark.skipif(not kernels.decode_attention_available(), reason="no C++ compiler to build it")


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                            (torch.float32, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("heads,head_dim", [((6, 2), 16), ((9, 3), 64), ((4, 4), 32), ((8, 1), 128)])
def test_decode_attention_matches_sdpa(dtype: torch.dtype, kv_dtype: torch.dtype, heads: tuple[int, int],
                                       head_dim: int) -> None:
    """One query per row over a cache pool view: grouped heads, each row's own visible slots (more than one chunk
    of 128), no mask, a mask shared by the rows, and the strided view of a larger pool; a float32 query also over
    a half-precision cache (a quantized model's, engine.compiled_cache_dtype)."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(head_dim)
    pool_k, pool_v = (torch.randn(4, Hkv, 400, head_dim, generator=g).to(kv_dtype) for _ in range(2))
    k, v = pool_k[1:4, :, :300], pool_v[1:4, :, :300]  # rows 1-3, the first 300 slots: strided views
    q = torch.randn(3, H, 1, head_dim, generator=g).to(dtype)
    lengths = torch.tensor([1, 170, 300])
    per_row = (torch.arange(300) < lengths[:, None]).view(3, 1, 1, 300)
    holes = torch.rand(1, 1, 1, 300, generator=g) > 0.4
    holes[..., 0] = True
    for mask in (None, per_row, holes):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3,
                                              enable_gqa=H != Hkv)
        got = kernels.decode_attention(q, k, v, mask, 0.3)
        assert got.dtype == dtype and got.shape == q.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # the reference reads the same rounded cache
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_decode_attention_default_scale_and_an_empty_row() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1] = False
    got = kernels.decode_attention(q, k, v, mask, None)
    want = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], enable_gqa=True)  # scale 1/sqrt(16)
    torch.testing.assert_close(got[:1], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # nothing visible: zeros, not NaN


def test_decode_attention_rejects_what_it_cannot_do() -> None:
    q, k = torch.randn(1, 4, 1, 24), torch.randn(1, 2, 8, 24)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.decode_attention(q, k, k, None, None)  # head dim 24
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        kernels.decode_attention(q, k, k, torch.zeros(1, 1, 1, 8), None)
    with pytest.raises(RuntimeError, match="contiguous in the head dim"):
        kt = k.transpose(2, 3).contiguous().transpose(2, 3)
        kernels.decode_attention(q, kt, kt, None, None)


def test_compiled_step_calls_the_kernel() -> None:
    """torch.compile traces the kernel as an opaque operator in the decode step's graph; the tiny model's
    compiled step then equals the eager one (test_packed and test_generation compare whole generations)."""
    from lmstack.config import from_name
    from lmstack.models import build_model
    from lmstack.models.attention import attend
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 1, 16).bfloat16(), torch.randn(1, 2, 8, 16).bfloat16()
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    got = torch.compile(lambda q, k, v, m: attend(q, k, v, m), backend=backend, fullgraph=True)(q, k, k, mask)
    op = torch.ops.lmstack.decode_attention
    assert any(node.target in (op, op.default) for gm in graphs for node in gm.graph.nodes)
    torch.testing.assert_close(got, kernels.decode_attention(q, k, k, mask, None))
    assert build_model(from_name("tiny-llama")).config.head_dim in kernels.HEAD_DIMS


def test_a_failed_build_leaves_the_torch_ops_path(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    """No compiler or an unwritable build folder: one warning and False (callers keep their torch-ops path)."""
    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build to load

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("no compiler")
    monkeypatch.setattr(cpp_extension, "load", fail)
    with caplog.at_level("WARNING", logger="lmstack.kernels"):
        assert kernels._build() is False
    assert "did not build (no compiler)" in caplog.text


@pytest.mark.slow
def test_compiled_bf16_batch_decodes_as_eager() -> None:
    """Two rows of different lengths in one compiled bf16 step: each row attends through the kernel to its own
    slots (the per-row mask of the cache pool), and its logits equal the eager model's (SDPA over a float32
    cache) within bf16 rounding."""
    import copy

    from lmstack.config import from_name
    from lmstack.generation import Generator
    from lmstack.models import build_model
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(from_name("tiny-llama")).to(torch.bfloat16).eval()
    eager, compiled = Generator(copy.deepcopy(model), None), Generator(model, None, compile=True, max_len=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 4)]
    feed = torch.randint(0, 256, (6, 2, 1), generator=g)
    with torch.inference_mode():
        steps = {}
        for name, gen in (("eager", eager), ("compiled", compiled)):
            first = gen.adapter.prefill(prompts, 8)
            steps[name] = torch.stack([first] + [gen.adapter.step(t) for t in feed])  # [7, 2, V]
    assert compiled.adapter.engine.model.cache_shape()[2] == torch.bfloat16
    torch.testing.assert_close(steps["compiled"], steps["eager"], atol=0.05, rtol=0.02)
