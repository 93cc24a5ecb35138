"""Generation: sampling filters against transformers' warpers, greedy / sampling / beam search against
transformers' `generate` on tiny random Llama and GPT-2 models with identical weights, the KV cache against
full recompute, padded batches, stop strings, streaming, and the error paths."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lmstack.checkpoints import instantiate, load_model
from lmstack.errors import LmstackError
from lmstack.generation import (GenerationConfig, Generator, apply_repetition_penalty, apply_top_k, apply_top_p,
                                held_back)
from lmstack.models.attention import Attention, _training_half_dtype, matmul_attention, one_query_attention
from lmstack.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)

torch.set_num_threads(2)

V = 257  # 256 byte tokens + <eos>
EOS = 256
CTX = 128


# ------------------------------------------------------------------------------------------ fixtures


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(eos: str = "<eos>") -> Tokenizer:
    """A byte-level BPE without merges: token id = UTF-8 byte value (0-255), plus <eos> (256)."""
    backend = HFTokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return Tokenizer(backend, eos_token=eos, chat_template=template)


def hf_llama(seed: int, eos: int = EOS):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CTX, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_gpt2(seed: int, eos: int = EOS):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=64, n_layer=2, n_head=4,
                                  initializer_range=0.2, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return transformers.GPT2LMHeadModel(cfg).eval()


def to_lmstack(hf, dtype: torch.dtype = torch.float32):
    """The same weights in an lmstack model, through the importer users run (save_pretrained -> load_model)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return load_model(tmp, dtype=dtype).model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    """(transformers model, lmstack model with the same weights)."""
    hf = hf_llama(0) if request.param == "llama" else hf_gpt2(0)
    return hf, to_lmstack(hf)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(L),), generator=g).tolist() for L in torch.randint(3, 12, (n,), generator=g)]


def hf_generate(hf, prompt: list[int], **kw) -> list[int]:
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), eos_token_id=EOS, pad_token_id=EOS, **kw)
    return out[0, len(prompt):].tolist()


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# --------------------------------------------------------------------------------- logits processing


def test_top_k_matches_transformers():
    logits = torch.randn(4, 50)
    logits[0, :5] = logits[0, 5]  # ties with the k-th value are kept by both
    for k in (1, 3, 10, 50, 80):
        torch.testing.assert_close(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


def test_top_p_matches_transformers():
    logits = torch.randn(6, 100) * 3
    logits[1] = torch.tensor([20.0] + [0.0] * 99)  # one token above p on its own: it alone is kept
    for p in (0.05, 0.3, 0.5, 0.9, 0.99, 1.0):
        ours = apply_top_p(logits, p)
        torch.testing.assert_close(ours, TopPLogitsWarper(p)(None, logits.clone()))
        assert (ours.isfinite().sum(-1) >= 1).all()


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(3, 40)
    ids = torch.randint(0, 40, (3, 12))
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (0.7, 1.3, 2.0):
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty),
                                   RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1), dict(top_k=0),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0.0), dict(num_beams=0),
                                 dict(num_beams=2, temperature=0.7), dict(stop=[""]),
                                 dict(temperature=float("nan"))])
def test_invalid_sampling_values_raise(bad):
    with pytest.raises(LmstackError):
        GenerationConfig(**bad).validate()
    hf = hf_llama(0)
    with pytest.raises(LmstackError):
        Generator(to_lmstack(hf), byte_tokenizer()).generate([1, 2, 3], GenerationConfig(**bad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compute", ["float32", "input"])
@pytest.mark.parametrize("T", [1, 7])
def test_matmul_attention_matches_sdpa(dtype, compute, T):
    """The matmul attention of cached half-precision decoding (T=1, float32 products) and of short half-precision
    training steps (T>1, products in the input dtype), against SDPA in float32, for every kind of mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, s, 16, generator=g) for h, s in ((6, T), (2, 40), (2, 40)))
    keep = torch.rand(3, 1, T, 40, generator=g) > 0.3
    keep[..., 0] = True  # every query sees a key
    biases = torch.randn(1, 6, T, 40, generator=g), torch.randn(3, 6, 1, 40, generator=g)  # per head
    for mask, causal in ((None, False), (None, True), (keep, False), (keep[:, :, :1], False),
                         (biases[0], False), (biases[1], False)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True)
        got = matmul_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                               None if mask is None else mask.to(dtype if mask.is_floating_point() else torch.bool),
                               0.3, is_causal=causal, dtype=torch.float32 if compute == "float32" else None)
        assert got.dtype == (torch.float32 if compute == "float32" else dtype)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_query_attention_matches_sdpa(dtype):
    """The compiled decode step's attention over a half-precision cache: one query per row, grouped heads, the
    per-row slot mask of the cache pool (or none), against SDPA in float32 over the same (rounded) keys."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, h, s, 16, generator=g).to(dtype) for h, s in ((6, 1), (2, 40), (2, 40)))
    keep = torch.rand(3, 1, 1, 40, generator=g) > 0.3
    keep[..., 0] = True
    for mask in (None, keep):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3,
                                              enable_gqa=True)
        got = one_query_attention(q, k, v, mask, 0.3)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_short_half_precision_training_attends_with_matmuls_and_the_same_gradients(monkeypatch):
    """bf16 training steps on CPU with up to 256 keys skip SDPA for matmul_attention (twice as fast there, see
    _training_half_dtype), under autocast too; outputs and gradients stay those of the float32 module within
    bf16 resolution."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 40, 16, requires_grad=True), torch.randn(2, 2, 40, 16)
    assert _training_half_dtype(q.bfloat16(), k) == torch.bfloat16
    assert _training_half_dtype(q.detach().bfloat16(), k) is None  # inference: no backward to win on
    with torch.no_grad():
        assert _training_half_dtype(q.bfloat16(), k) is None
    assert _training_half_dtype(q.bfloat16(), torch.randn(2, 2, 512, 16)) is None  # long: flash saves memory
    assert _training_half_dtype(q, k) is None  # float32: SDPA is as fast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _training_half_dtype(q, k) == torch.bfloat16  # RoPE may have promoted q to float32

    def make() -> Attention:
        torch.manual_seed(1)
        return Attention(*(torch.nn.Linear(96, out, bias=False) for out in (96, 32, 32, 96)), n_head=6,
                         n_kv_head=2, head_dim=16)

    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    x = torch.randn(2, 40, 96, generator=g)
    ref, half, mixed = make(), make().bfloat16(), make()
    want = ref(x, is_causal=True)
    assert len(sdpa_calls) == 1
    got = half(x.bfloat16(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_mixed = mixed(x, is_causal=True)
    assert len(sdpa_calls) == 1 and got.dtype == got_mixed.dtype == torch.bfloat16
    want.square().sum().backward()
    for model, out in ((half, got), (mixed, got_mixed)):
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
        out.float().square().sum().backward()
        for a, b in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(b.grad.float(), a.grad, atol=0.1, rtol=5e-2)


# ------------------------------------------------------------------------------- parity: greedy, sampling


def test_greedy_cache_equals_recompute_and_transformers(pair):
    hf, model = pair
    gen = Generator(model, None)
    for p in prompts(3):
        ours = gen.generate(p, GenerationConfig(max_new_tokens=24))
        n = ours.new_tokens
        assert ours.token_ids == recompute_greedy(model, p, n)
        assert ours.token_ids == hf_generate(hf, p, max_new_tokens=24, do_sample=False)
        assert ours.finish_reason == ("stop" if ours.token_ids[-1] == EOS else "length")


def test_sampling_matches_transformers(pair):
    """Same seed, same filters -> the same draws as transformers' sampler (multinomial on the same probs)."""
    hf, model = pair
    gen = Generator(model, None)
    p = prompts(1, seed=3)[0]
    for kw in (dict(temperature=1.0), dict(temperature=0.8, top_k=20), dict(temperature=1.2, top_p=0.8),
               dict(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3)):
        ours = gen.generate(p, GenerationConfig(max_new_tokens=20, seed=7, **kw))
        torch.manual_seed(7)
        theirs = hf_generate(hf, p, max_new_tokens=20, do_sample=True, **{"top_k": None, **kw})
        assert ours.token_ids == theirs, kw


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    hf, model = pair
    gen = Generator(model, None)
    for p in prompts(2, seed=4):
        ours = gen.generate(p, GenerationConfig(max_new_tokens=20, repetition_penalty=1.5))
        assert ours.token_ids == hf_generate(hf, p, max_new_tokens=20, do_sample=False, repetition_penalty=1.5)


def test_seed_reproducibility(pair):
    _, model = pair
    gen = Generator(model, None)
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=123)
    a, b = gen.generate([5, 6, 7], cfg), gen.generate([5, 6, 7], cfg)
    c = gen.generate([5, 6, 7], GenerationConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=124))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


# ------------------------------------------------------------------------------------ parity: beam search


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(pair, num_beams):
    hf, model = pair
    gen = Generator(model, None)
    ended_early = 0
    for eos_from in range(3):  # make EOS a token the model likes, so beams finish at different lengths
        for p in prompts(3, seed=10 + eos_from):
            eos = recompute_greedy(model, p, 6)[3 + eos_from]
            model.config.eos_token_id = eos
            gen = Generator(model, None)
            for lp in (1.0, 0.5, 2.0):
                ours = gen.generate(p, GenerationConfig(max_new_tokens=16, num_beams=num_beams, length_penalty=lp))
                x = torch.tensor([p])
                theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, num_beams=num_beams,
                                     do_sample=False, length_penalty=lp, eos_token_id=eos,
                                     pad_token_id=eos)[0, len(p):].tolist()
                assert ours.token_ids == theirs, (p, eos, lp)
                assert ours.finish_reason == ("stop" if theirs[-1] == eos and len(theirs) <= 16 else "length")
                ended_early += len(theirs) < 16
    model.config.eos_token_id = EOS
    assert ended_early > 0  # the finished-beam bookkeeping was exercised


def test_beam_search_batch_equals_single(pair):
    _, model = pair
    gen = Generator(model, None)
    ps = prompts(3, seed=20)
    cfg = GenerationConfig(max_new_tokens=12, num_beams=3, length_penalty=1.5)
    batch = gen.generate_batch(ps, cfg)
    assert [r.token_ids for r in batch] == [gen.generate(p, cfg).token_ids for p in ps]


# ------------------------------------------------------------------------------------- batching, precision


def test_batched_padded_equals_single(pair):
    _, model = pair
    gen = Generator(model, byte_tokenizer())
    ps = prompts(4, seed=5)
    assert len({len(p) for p in ps}) > 1  # padding is exercised
    cfg = GenerationConfig(max_new_tokens=20)
    batch = gen.generate_batch(ps, cfg)
    for p, r in zip(ps, batch):
        alone = gen.generate(p, cfg)
        assert r.token_ids == alone.token_ids
        assert r.text == alone.text and r.prompt_tokens == len(p)


def test_bf16_cached_logits_equal_recompute():
    """In bf16 the cached single-row step and a full forward round differently (other matmul kernels), so a
    near-tie can flip a greedy token: compare the teacher-forced logits within bf16's resolution instead. A wrong
    cache slot or mask moves them by O(1)."""
    hf = hf_llama(2)
    model = to_lmstack(hf, dtype=torch.bfloat16)
    gen = Generator(model, None)
    p = prompts(1, seed=6)[0]
    ours = gen.generate(p, GenerationConfig(max_new_tokens=8)).token_ids
    with torch.inference_mode():
        full = model(torch.tensor([p + ours]))[0, len(p) - 1:-1].float()  # [8, V]
        steps = [gen.adapter.prefill([p], len(ours))[0]] + [gen.adapter.step(torch.tensor([[t]]))[0]
                                                            for t in ours[:-1]]
    torch.testing.assert_close(torch.stack(steps), full, atol=0.15, rtol=0.02)


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    hf = hf_llama(0)
    eager, compiled = Generator(to_lmstack(hf), None), Generator(to_lmstack(hf), None, compile=True, max_len=64)
    cfg = GenerationConfig(max_new_tokens=16)
    for p in prompts(2, seed=8):
        assert compiled.generate(p, cfg).token_ids == eager.generate(p, cfg).token_ids


# --------------------------------------------------------------------------------- stopping and streaming


def test_a_compiled_step_over_a_quantized_float32_model_keeps_a_float16_cache():
    """engine.compiled_cache_dtype: a quantized float32 model's compiled CPU step halves its cache; a float32
    model that is not quantized stays the exact reference, and a bf16 model keeps its own dtype."""
    from lmstack.generation.engine import compiled_cache_dtype
    from lmstack.quant.quantize import quantize_
    model = to_lmstack(hf_llama(0))
    assert compiled_cache_dtype(model) == torch.float32
    assert compiled_cache_dtype(to_lmstack(hf_llama(0), torch.bfloat16)) == torch.bfloat16
    quantize_(model, "int8")
    assert compiled_cache_dtype(model) == torch.float16


def test_stop_on_eos_token():
    hf = hf_llama(0)
    model = to_lmstack(hf)
    p = prompts(1, seed=9)[0]
    free = Generator(model, None).generate(p, GenerationConfig(max_new_tokens=20)).token_ids
    eos_id = free[4]
    first = free.index(eos_id)
    tok = byte_tokenizer()
    eos_token = tok.backend.id_to_token(eos_id)
    gen = Generator(model, Tokenizer(tok.backend, eos_token=eos_token))
    r = gen.generate(p, GenerationConfig(max_new_tokens=20))
    assert r.token_ids == free[:first + 1] and r.finish_reason == "stop"
    assert r.text == tok.decode(free[:first])  # the stop token is not in the text


def _reference_cut(tok: Tokenizer, ids: list[int], stop: str) -> tuple[list[int], str]:
    """The tokens up to the one completing the first `stop`, and the text before it."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        if stop in text:
            return ids[:n], text[:text.index(stop)]
    raise AssertionError("stop string not in the text")


def _multi_token_stop(tok: Tokenizer, ids: list[int]) -> str:
    """A stop string the free run produces, spanning 3 (else 2) tokens of whole characters, not at the start."""
    full = tok.decode(ids)
    for n in (3, 2):
        for i in range(2, len(ids) - n):
            s = tok.decode(ids[i:i + n])
            if "\ufffd" not in s and s in full and EOS not in ids[i:i + n]:
                return s
    raise AssertionError("no multi-token stretch of whole characters")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_strings_generate_and_stream(family):
    hf = hf_llama(3) if family == "llama" else hf_gpt2(3)
    tok = byte_tokenizer()
    gen = Generator(to_lmstack(hf), tok)
    p = prompts(1, seed=11)[0]
    cfg = dict(max_new_tokens=60, temperature=1.0, seed=5)  # sampling gives varied text; the seed repeats it
    free = gen.generate(p, GenerationConfig(**cfg))
    stop = _multi_token_stop(tok, free.token_ids)
    want_ids, want_text = _reference_cut(tok, free.token_ids, stop)

    r = gen.generate(p, GenerationConfig(**cfg, stop=["\x00never", stop]))
    assert r.token_ids == want_ids and r.text == want_text and r.finish_reason == "stop"

    pieces = list(gen.stream(p, GenerationConfig(**cfg, stop=[stop])))
    assert "".join(pieces) == want_text and gen.last_result.text == want_text
    assert all(stop not in piece for piece in pieces)
    # No piece was emitted that the stop string later took back: every prefix is a prefix of the answer.
    assert all(want_text.startswith("".join(pieces[:i])) for i in range(len(pieces) + 1))


def test_stop_string_in_beam_search():
    hf = hf_llama(3)
    tok = byte_tokenizer()
    gen = Generator(to_lmstack(hf), tok)
    p = prompts(1, seed=12)[0]
    free = gen.generate(p, GenerationConfig(max_new_tokens=30, num_beams=2))
    stop = tok.decode(free.token_ids[5:7])
    r = gen.generate(p, GenerationConfig(max_new_tokens=30, num_beams=2, stop=[stop]))
    assert stop not in r.text and r.finish_reason == "stop"
    assert stop in tok.decode(r.token_ids)


def test_stream_pieces_concatenate_to_text():
    hf = hf_gpt2(4)
    tok = byte_tokenizer()
    gen = Generator(to_lmstack(hf), tok)
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=1)
    pieces = list(gen.stream("héllo", cfg))
    result = gen.last_result
    assert "".join(pieces) == result.text == gen.generate("héllo", cfg).text
    assert result.prompt_tokens == len("héllo".encode()) and result.new_tokens == len(result.token_ids)
    assert result.text == tok.decode([t for t in result.token_ids if t != EOS])


def test_stream_decoder_never_splits_characters():
    tok = byte_tokenizer()
    text = "naïve café — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: every multi-byte character spans tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_held_back_prefixes():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world", "lo!"]) == 2
    assert held_back("hello", ["xyz"]) == 0


# ------------------------------------------------------------------------------------------ error paths


def test_prompt_too_long_raises():
    gen = Generator(to_lmstack(hf_llama(0)), byte_tokenizer())
    with pytest.raises(LmstackError, match=f"prompt is {CTX} tokens; the context is {CTX}"):
        gen.generate([1] * CTX, GenerationConfig())
    with pytest.raises(LmstackError, match="prompt is 200 tokens"):
        list(gen.stream("x" * 200, GenerationConfig()))
    # A prompt that fits generates up to the context end and says so.
    r = gen.generate([1] * (CTX - 5), GenerationConfig(max_new_tokens=50))
    assert r.new_tokens == 5 and r.finish_reason == "length"


def test_bad_prompts_raise():
    gen = Generator(to_lmstack(hf_llama(0)), None)
    with pytest.raises(LmstackError, match="outside the vocabulary"):
        gen.generate([1, V + 3], GenerationConfig())
    with pytest.raises(LmstackError, match="empty"):
        gen.generate([], GenerationConfig())
    with pytest.raises(LmstackError, match="tokenizer"):
        gen.generate("text", GenerationConfig())


def test_chat_prompt_uses_template():
    tok = byte_tokenizer()
    gen = Generator(to_lmstack(hf_llama(0)), tok)
    messages = [{"role": "user", "content": "hi"}]
    assert gen.chat_prompt(messages) == tok.encode("<|user|>hi\n<|assistant|>", add_special_tokens=False)


# ------------------------------------------------------------------------------------ encoder-decoder (T5)


@pytest.fixture(scope="module")
def t5_pair():
    from lmstack.checkpoints.hf import config_from_hf_t5, from_hf_t5_state_dict

    cfg = transformers.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, initializer_factor=4.0)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    config = config_from_hf_t5(cfg.to_dict())
    return hf, instantiate(config, from_hf_t5_state_dict(hf.state_dict(), config), dtype=torch.float32)


def t5_generate(hf, src: list[int], **kw) -> list[int]:
    x = torch.tensor([src])
    out = hf.generate(x, attention_mask=torch.ones_like(x), **kw)
    return out[0, 1:].tolist()  # drop the decoder start token


def test_seq2seq_greedy_and_beams_match_transformers(t5_pair):
    hf, model = t5_pair
    gen = Generator(model, None)
    ended_early = 0
    for src in prompts(3, seed=30):
        ours = gen.generate(src, GenerationConfig(max_new_tokens=20))
        assert ours.token_ids == t5_generate(hf, src, max_new_tokens=20, do_sample=False)
        eos = ours.token_ids[4]  # a token the model likes, so that beams end at different lengths
        model.config.eos_token_id = eos
        gen = Generator(model, None)
        for nb, lp in ((2, 1.0), (4, 0.5), (3, 2.0)):
            ours = gen.generate(src, GenerationConfig(max_new_tokens=16, num_beams=nb, length_penalty=lp))
            theirs = t5_generate(hf, src, max_new_tokens=16, num_beams=nb, length_penalty=lp, do_sample=False,
                                 eos_token_id=eos)
            assert ours.token_ids == theirs, (src, nb, lp)
            ended_early += len(theirs) < 16
        model.config.eos_token_id = 1
        gen = Generator(model, None)
    assert ended_early > 0


def test_seq2seq_batch_sampling_and_stream(t5_pair):
    hf, model = t5_pair
    gen = Generator(model, byte_tokenizer())
    srcs = prompts(3, seed=31)
    cfg = GenerationConfig(max_new_tokens=12)
    assert [r.token_ids for r in gen.generate_batch(srcs, cfg)] == [gen.generate(s, cfg).token_ids for s in srcs]
    sample = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=30, seed=3)
    ours = gen.generate(srcs[0], sample)
    torch.manual_seed(3)
    assert ours.token_ids == t5_generate(hf, srcs[0], max_new_tokens=12, do_sample=True, temperature=0.9, top_k=30)
    assert "".join(gen.stream(srcs[0], sample)) == ours.text


# ------------------------------------------------------------------------- no-repeat n-grams, JSON mode


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    """Greedy, sampling and beam search with transformers' `no_repeat_ngram_size`; the prompt counts too."""
    hf = hf_llama(0)
    model = to_lmstack(hf)
    gen = Generator(model, None)
    for p in prompts(2, seed=40 + n):
        p = p + p[:4]  # a repeated stretch in the prompt: its n-grams are banned from the start
        ours = gen.generate(p, GenerationConfig(max_new_tokens=24, no_repeat_ngram_size=n))
        assert ours.token_ids == hf_generate(hf, p, max_new_tokens=24, do_sample=False, no_repeat_ngram_size=n)
        ours = gen.generate(p, GenerationConfig(max_new_tokens=16, temperature=1.0, seed=3, no_repeat_ngram_size=n))
        torch.manual_seed(3)
        assert ours.token_ids == hf_generate(hf, p, max_new_tokens=16, do_sample=True, top_k=None,
                                             no_repeat_ngram_size=n)
        ours = gen.generate(p, GenerationConfig(max_new_tokens=12, num_beams=2, no_repeat_ngram_size=n))
        assert ours.token_ids == hf_generate(hf, p, max_new_tokens=12, num_beams=2, do_sample=False,
                                             no_repeat_ngram_size=n)
        ids = p + ours.token_ids
        for end in range(max(len(p), n - 1), len(ids)):  # no n-gram ending in the output occurred before it
            gram = ids[end - n + 1:end + 1]
            assert all(ids[i:i + n] != gram for i in range(end - n + 1))


def test_no_repeat_ngram_size_is_validated():
    for bad in (-1, 1.5):
        with pytest.raises(LmstackError, match="no_repeat_ngram_size"):
            GenerationConfig(no_repeat_ngram_size=bad).validate()


def test_json_mode_through_generator():
    """JSON mode is a constraint any caller gets: a random model's greedy and sampled output parses as an
    object, and a short budget still closes the object."""
    import json
    hf = hf_llama(5)
    gen = Generator(to_lmstack(hf), byte_tokenizer())
    for cfg in (GenerationConfig(max_new_tokens=40, json_mode=True),
                GenerationConfig(max_new_tokens=40, temperature=1.0, seed=2, json_mode=True),
                GenerationConfig(max_new_tokens=6, json_mode=True)):
        r = gen.generate("data: ", cfg)
        assert isinstance(json.loads(r.text), dict), r.text
        assert r.new_tokens <= cfg.max_new_tokens
    with pytest.raises(LmstackError, match="beam search"):
        GenerationConfig(num_beams=2, json_mode=True).validate()


def test_copy_constraint_copies_a_span_and_ends_at_a_word_end():
    """Copy mode: the best token that keeps the text a span of a source wins; a stop token only at a word end;
    the first letter may change case; a source's end completes the span."""
    from lmstack.generation import CopyConstraint

    texts = ["", "G", "GDPR", " and", " BLOOM", "x", "Gd", " GPT", "<stop>", "\n", "DPR"]
    stop = {8}

    def run(order: list[int], sources: list[str], steps: int = 6) -> tuple[str, CopyConstraint]:
        c = CopyConstraint(sources, texts, stop)
        out = ""
        for _ in range(steps):
            logits = torch.full((len(texts),), -1e9)
            for rank, token in enumerate(order):
                logits[token] = -rank  # `order` best first
            token = c.choose(logits, greedy=True, generator=None, budget=10)
            if token in stop or c.complete:
                out += "" if token in stop else texts[token]
                break
            out += texts[token]
        return out, c

    # "x" and "Gd" are not spans; "G" is, but the stop after it is refused mid-word ("G|DPR")
    out, c = run([5, 6, 1, 8, 10, 3, 4], ["comply with GDPR and BLOOM rules"])
    assert out == "GDPR" and c.source == 0
    out, c = run([5, 6, 1, 10, 3, 4, 8], ["comply with GDPR and BLOOM rules"])
    assert out == "GDPR and BLOOM"
    # " GPT" starts at a word start of the second source, which then ends: complete
    out, c = run([7, 8], ["no", "GPT"])
    assert out == " GPT" and c.complete and c.source == 1
    # the first letter may change case; a line break is never copied
    c = CopyConstraint(["gDPR rules"], texts, stop)
    logits = torch.zeros(len(texts))
    logits[9], logits[2] = 2.0, 1.0
    assert c.choose(logits, greedy=True, generator=None, budget=5) == 2


def test_copy_mode_through_generator_and_validation():
    """A random model's greedy and sampled output in copy mode is a span of a source starting at a word."""
    hf = hf_llama(6)
    gen = Generator(to_lmstack(hf), byte_tokenizer())
    sources = ["Well known examples are GPT and BLOOM.", "LoRA inserts low-rank matrices"]
    for cfg in (GenerationConfig(max_new_tokens=12, copy_from=sources),
                GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4, copy_from=sources)):
        text = gen.generate("Question: which models?", cfg).text.strip()
        assert text, "an empty span"
        assert any(src[i].lower() == text[0].lower() and src.startswith(text[1:], i + 1)
                   and (i == 0 or not src[i - 1].isalnum()) for src in sources for i in range(len(src))), text
    for bad, match in ((GenerationConfig(copy_from=["a"], num_beams=2), "beam search"),
                       (GenerationConfig(copy_from=["a"], json_mode=True), "one of JSON mode"),
                       (GenerationConfig(copy_from=["", " "]), "copy_from")):
        with pytest.raises(LmstackError, match=match):
            bad.validate()


# ------------------------------------------------------------------------------ no process-wide switch


def test_one_row_bf16_decoding_leaves_global_state_alone():
    """The decode step flips no process-wide switch: another thread sees torch's oneDNN flag unchanged for the
    whole of a one-row bf16 generation (the server's scheduler thread decodes while request threads run the
    embedding encoder)."""
    import threading
    model = to_lmstack(hf_llama(2), dtype=torch.bfloat16)
    gen = Generator(model, None)
    before = torch.backends.mkldnn.enabled
    seen: set[bool] = set()
    done = threading.Event()

    def decode() -> None:
        try:
            for p in prompts(3, seed=9):
                gen.generate(p, GenerationConfig(max_new_tokens=24))
        finally:
            done.set()

    worker = threading.Thread(target=decode)
    worker.start()
    while not done.wait(0.0005):  # sample every half millisecond (a busy loop starved the decoding thread)
        seen.add(torch.backends.mkldnn.enabled)
    worker.join()
    assert seen == {before}
