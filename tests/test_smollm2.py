"""Real-model parity: SmolLM2-135M-Instruct (Q4_1 GGUF) loaded by lmstack vs transformers' GGUF loader, fp32.

Both sides dequantize the same file, so the weights are the same numbers and only the arithmetic differs.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.checkpoints import LoadedModel, load_model, resolve
from lmstack.generation import GenerationConfig, Generator

pytestmark = pytest.mark.slow
torch.set_num_threads(2)

PARAGRAPH = (
    "The history of computing is longer than the history of computing hardware and modern computing technology "
    "and includes the history of methods intended for pen and paper or for chalk and slate, with or without the "
    "aid of tables. Digital computing is intimately tied to the representation of numbers, and the earliest "
    "known tool for use in computation was the abacus, thought to have been invented in Babylon."
)
CHATS = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You answer in a single short line."},
     {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "What is 12 times 11?"}, {"role": "assistant", "content": "132."},
     {"role": "user", "content": "And 12 times 12?"}],
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    path = resolve("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_config_and_metadata(ours: LoadedModel, theirs) -> None:
    cfg, ref = ours.config, theirs.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size) == (
        ref.num_hidden_layers, ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads,
        ref.intermediate_size, ref.vocab_size)
    assert cfg.rope_base == ref.rope_parameters["rope_theta"] and cfg.norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.tie_embeddings and cfg.max_seq_len == 8192
    assert ours.metadata["quant_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert ours.metadata["architecture"] == "llama" and ours.metadata["file_type"] == "Q4_1"


def test_logits_match_transformers(ours: LoadedModel, theirs) -> None:
    ids = ours.tokenizer.encode(PARAGRAPH)
    assert len(ids) >= 64
    ids = torch.tensor([ids[:64]])
    with torch.no_grad():
        got = ours.model(ids)  # [1, 64, V]
        want = theirs(ids).logits
    assert got.shape == want.shape == (1, 64, 49152)
    assert (got - want).abs().max().item() < 1e-3


def greedy_reference(model, ids: list[int], n: int, stop_ids: set[int]) -> list[int]:
    """transformers' greedy continuation, stopping on the same ids as ours (the stop token is kept, as ours)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_greedy_matches_transformers(ours: LoadedModel, theirs, chat: int) -> None:
    gen = Generator(ours.model, ours.tokenizer)
    ids = gen.chat_prompt(CHATS[chat])
    result = gen.generate(ids, GenerationConfig(max_new_tokens=32))
    expected = greedy_reference(theirs, ids, 32, ours.tokenizer.stop_token_ids)
    assert result.token_ids == expected
    assert len(expected) == 32 or expected[-1] in ours.tokenizer.stop_token_ids


def test_capital_of_france(ours: LoadedModel) -> None:
    gen = Generator(ours.model, ours.tokenizer)
    result = gen.generate(gen.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]),
                          GenerationConfig(max_new_tokens=32))
    assert "Paris" in result.text
