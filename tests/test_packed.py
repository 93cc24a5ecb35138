"""Inference-time kernels chosen by module swap: oneDNN-packed bf16 linears, fused projections, the float32 KV
cache of half-precision CPU models, and `load_model(..., inference=True)` that applies them.

Each swap must leave the numbers as they were: packed linears are compared with F.linear bit for bit, models
with and without the swaps are compared logit for logit and token for token.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.generation import GenerationConfig, Generator
from lmstack.models import build_model
from lmstack.models.attention import kv_cache_dtype
from lmstack.models.blocks import TiedHead, count_weights
from lmstack.quant.packed import PackedLinear, pack_linears_, packing_available
from lmstack.quant.quantize import fusable, fuse_projections_, quantize_

pytestmark = pytest.mark.skipif(not packing_available(),
                                reason="no oneDNN bf16 prepacking here (this torch or this CPU lacks it)")
torch.set_num_threads(2)


def tiny_llama(dtype: torch.dtype = torch.bfloat16, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(from_name("tiny-llama", **overrides)).to(dtype).eval()


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_bit_for_bit(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), linear(x))
        strided = x.transpose(0, -2)  # F.linear may take another path for it: one bf16 rounding apart
        torch.testing.assert_close(packed(strided), linear(strided), rtol=2 ** -7, atol=2 ** -7)
    assert torch.equal(packed.weight, linear.weight.detach())  # it reads back
    assert set(packed.state_dict()) == set(linear.state_dict())
    assert torch.equal(packed.state_dict()["weight"], linear.weight.detach())


def test_packed_linear_copies_refuses_casts_and_keeps_gradients_exact() -> None:
    linear = nn.Linear(32, 48).to(torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    twin = copy.deepcopy(packed)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert torch.equal(twin(x), packed(x))
    with pytest.raises(LmstackError, match="stays a CPU module"):
        packed.float()
    with pytest.raises(LmstackError, match="bfloat16 weights but got torch.float32"):
        packed(x.float())
    with pytest.raises(LmstackError, match="bfloat16 CPU weight"):
        PackedLinear(torch.randn(4, 4), None)
    xg = x.clone().requires_grad_()
    packed(xg).sum().backward()  # a backward through a packed layer takes the plain path: exact input grads
    xr = x.clone().requires_grad_()
    linear(xr).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


def test_pack_linears_keeps_logits_and_state_dict() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        ref = model(ids)
        assert fusable(model) and fuse_projections_(model) == 4
        fused_state = model.state_dict()
        # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj), plus a packed copy of the tied table
        assert pack_linears_(model) == 9
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.tied
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids), ref)
    # the same keys and values as before packing; the tied copy is not saved (no lm_head.weight)
    state = model.state_dict()
    assert set(state) == set(fused_state) and "lm_head.weight" not in state
    assert all(torch.equal(state[k], fused_state[k]) for k in state)
    assert count_weights(model) == count_weights(tiny_llama())


def test_pack_head_only_for_a_compiled_step() -> None:
    """load_model(compile=True): the blocks stay traceable (no oneDNN tensor), the head alone is packed."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        ref = model(ids)
        assert pack_linears_(model, blocks=False) == 1
        assert isinstance(model.lm_head, PackedLinear) and model.lm_head.tied
        assert not any(isinstance(m, PackedLinear) for m in model.layers.modules())
        assert torch.equal(model(ids), ref)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["packed bf16", "int8-g32"])
def test_compiled_int4_step_equals_eager(head: str) -> None:
    """The --compile model of an int4 GGUF: fused int4 blocks traced by torch.compile (C++ wrapper), then the head
    as its own step: a packed bf16 head run eagerly, or the kept Q8_0 table (int8-g32) compiled on its own. Its
    per-step logits equal the eager model's within bf16 rounding (inductor fuses the norms, RoPE and
    residuals, which rounds differently from eager ops, and its cache holds bf16 keys and values)."""
    from lmstack.quant.quantize import QuantEmbedding, quantized_linear
    torch._dynamo.reset()
    model = tiny_llama()
    quantize_(model, "int4-g32", skip=("tok_emb",))
    fuse_projections_(model)
    if head == "packed bf16":
        assert pack_linears_(model, blocks=False) == 1
    else:
        model.tok_emb = QuantEmbedding(quantized_linear(model.tok_emb.weight, None, "int8-g32"), torch.bfloat16)
        assert pack_linears_(model, blocks=False) == 0
    eager, compiled = Generator(copy.deepcopy(model), None), Generator(model, None, compile=True, max_len=64)
    p = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    tokens = eager.generate(p, GenerationConfig(max_new_tokens=8)).token_ids
    with torch.inference_mode():
        steps = {}
        for name, gen in (("eager", eager), ("compiled", compiled)):
            first = gen.adapter.prefill([p], len(tokens))[0]
            steps[name] = torch.stack([first] + [gen.adapter.step(torch.tensor([[t]]))[0] for t in tokens[:-1]])
    # the compiled step reads a cache in the model's dtype (one_query_attention); eager decoding keeps float32
    assert compiled.adapter.engine.model.cache_shape()[2] == torch.bfloat16
    assert eager.adapter.engine.model.cache_shape()[2] == torch.float32
    torch.testing.assert_close(steps["compiled"], steps["eager"], atol=0.05, rtol=0.02)


def test_pack_leaves_float32_and_lora_alone() -> None:
    model = tiny_llama(torch.float32)
    assert pack_linears_(model) == 0  # float32 stays on MKL: packing measured no faster there
    assert isinstance(model.lm_head, TiedHead)
    from lmstack.peft.lora import LoRALinear, apply_lora
    lora = tiny_llama()
    apply_lora(lora, targets="q,v", rank=2)
    assert not fusable(lora)  # LoRA keeps q, k, v separate
    n = pack_linears_(lora)
    assert n > 0 and all(type(m) is not PackedLinear for m in (lora.layers[0].attn.q_proj,))
    assert isinstance(lora.layers[0].attn.q_proj, LoRALinear)


def test_kv_cache_is_float32_for_half_models_on_cpu() -> None:
    assert kv_cache_dtype(torch.bfloat16, "cpu") == torch.float32
    assert kv_cache_dtype(torch.float32, "cpu") == torch.float32
    assert kv_cache_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    model = tiny_llama()
    model.setup_cache(1, 32)
    assert model.cache_shape() == (1, 32, torch.float32)


def test_cached_decode_of_a_bf16_model_equals_its_full_forward() -> None:
    """The float32 cache, the eager decode that reads only the written slots and the float32 decode attention
    give the logits the uncached forward gives, to bf16 rounding."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        full = model(ids).float()
        model.setup_cache(1, 64)
        steps = [model(ids[:, :8], input_pos=torch.arange(8))]
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], input_pos=torch.tensor([t])))
    cached = torch.cat(steps, dim=1).float()
    torch.testing.assert_close(cached, full, atol=0.05, rtol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


def test_inference_swaps_keep_greedy_tokens() -> None:
    plain, fast = tiny_llama(), tiny_llama()
    fuse_projections_(fast)
    pack_linears_(fast)
    prompts = [[5, 6, 7], [9, 1, 3, 4, 8]]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, stop=[])
    want = [Generator(plain, None).generate(p, cfg).token_ids for p in prompts]
    got = [Generator(fast, None).generate(p, cfg).token_ids for p in prompts]
    assert got == want
    batched = Generator(fast, None).generate_batch(prompts, cfg)  # several rows through the packed kernels
    assert [r.token_ids for r in batched] == want


def test_packing_is_local_to_the_model_and_thread() -> None:
    """Nothing process-wide changes: another thread's plain bf16 model computes as before, and the global
    oneDNN switch is untouched."""
    before = torch.backends.mkldnn.enabled
    other = tiny_llama()
    ids = torch.randint(0, 256, (1, 6))
    with torch.inference_mode():
        want = other(ids)
    results: list[torch.Tensor] = []

    def run_other() -> None:
        with torch.inference_mode():
            results.append(other(ids))

    fast = tiny_llama()
    thread = threading.Thread(target=run_other)
    thread.start()
    pack_linears_(fast)
    thread.join()
    assert torch.backends.mkldnn.enabled == before
    assert torch.equal(results[0], want)
    assert type(other.layers[0].attn.q_proj) is nn.Linear


def test_count_weights_sees_through_quantized_and_packed_layers() -> None:
    float_n = tiny_llama().num_params()
    quantized = tiny_llama()
    quantize_(quantized, "int4-g32")
    assert quantized.num_params() == float_n
    emb = tiny_llama().tok_emb.weight.numel()
    assert quantized.num_params(exclude_embeddings=True) == float_n - emb  # QuantEmbedding counted as a table
    packed = tiny_llama()
    pack_linears_(packed)
    assert packed.num_params() == float_n


@pytest.mark.parametrize("compiling", [False, True])
def test_one_token_steps_see_only_written_slots(monkeypatch: pytest.MonkeyPatch, compiling: bool) -> None:
    """Eager CPU steps attend over the written slots only; a compiled step (static shapes) over the whole
    cache with a slot mask. Both must equal the uncached forward (unwritten slots never take part)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 256, (1, 10))
    with torch.inference_mode():
        full = model(ids)
        model.setup_cache(1, 64)
        steps = [model(ids[:, :6], input_pos=torch.arange(6))]
        steps += [model(ids[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
