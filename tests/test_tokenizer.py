"""The tokenizer built from SmolLM2's GGUF metadata, against transformers' tokenizer for the same file.

One known difference, on purpose: the file says `tokenizer.ggml.pre = "smollm"`, which llama.cpp (and SmolLM2's
own tokenizer.json) splits every digit off before the GPT-2 regex. transformers' GGUF loader has no entry for
"smollm" and uses the plain GPT-2 split, so on a whitespace run before a digit it differs ("a  1": llama.cpp and
SmolLM2's tokenizer.json give "a", "  ", "1"; transformers gives "a", " ", " ", "1"). We follow llama.cpp, and
compare ids with transformers' tokenizer given SmolLM2's tokenizer.json pre-tokenizer (Digits + ByteLevel),
and with the unmodified transformers tokenizer on every string without a digit.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from lmstack.checkpoints import resolve
from lmstack.checkpoints.gguf import gguf_tokenizer, read_gguf
from lmstack.tokenizer import StreamDecoder, Tokenizer

STRINGS = [
    "Hello world", "hello, world!", "The quick brown fox jumps over the lazy dog.", "", " ", "  ", "\n", "\t",
    "  leading spaces", "trailing spaces   ", "multiple   internal    spaces", "tabs\tand\ttabs\t\t",
    "line\nbreaks\n\n\nhere", "\r\nwindows\r\nnewlines", "   \n  \t mixed  \n", "I'm sure they'll say it's fine",
    "don't, won't, can't; we've", "CamelCaseIdentifier snake_case_identifier", "ALL CAPS TEXT!!!",
    "12345", "3.14159", "1,000,000", "a  1", "x 2024-01-01", "Call 555-0199 at 9:30pm", "version 2.0.1-beta",
    "2+2=4 and 10*10=100", "tab\tsep\t\t1", "  42", "0x1F 0b1010 1e-5",
    "héllo wörld", "Café naïve résumé façade Ångström", "日本語のテキスト", "你好，世界！这是一个测试。",
    "한국어 텍스트입니다", "Россия и Украина", "مرحبا بالعالم", "Ελληνικά γράμματα", "हिन्दी भाषा",
    "emoji 😀🎉", "family 👨‍👩‍👧 flags 🇫🇷🇯🇵", "mixed 😀 text 日本 and 123", "zero\u200bwidth", "e\u0301 combining",
    "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; i++) { sum += a[i]; }",
    "<html><body class=\"x\">Hi</body></html>", '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 42;", "$ pip install --no-deps lmstack && echo ok",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start|><|im_start|>", "<|im_start", "|im_end|>", "...!!!???", "—–-‒ dashes", "¡¿Qué?!", "~`^*&%$#@",
]


def has_digit(s: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in s)  # \p{N}


@pytest.fixture(scope="module")
def gguf_path():
    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return gguf_tokenizer(read_gguf(gguf_path))


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_smollm2(hf_tok) -> HFTokenizer:
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's tokenizer.json (what llama.cpp's "smollm" does)."""
    backend = HFTokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return backend


def test_string_set() -> None:
    assert len(STRINGS) >= 50 and len(set(STRINGS)) == len(STRINGS)
    assert sum(not has_digit(s) for s in STRINGS) >= 40


@pytest.mark.slow
def test_ids_match_transformers(tok: Tokenizer, hf_tok, hf_smollm2: HFTokenizer) -> None:
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == hf_smollm2.encode(s, add_special_tokens=True).ids, s
        if not has_digit(s):
            assert ids == hf_tok(s).input_ids, s
    assert tok.vocab_size == len(hf_tok) == 49152


def test_digits_split_like_llama_cpp(tok: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer: \p{N} alone first, then the GPT-2 regex on what is left
    ids = tok.encode("a  12")
    assert [tok.decode([i]) for i in ids] == ["a", "  ", "1", "2"]


@pytest.mark.slow
def test_decode_round_trips(tok: Tokenizer, hf_tok) -> None:
    for s in STRINGS:
        ids = tok.encode(s)
        assert tok.decode(ids, skip_special_tokens=False) == s
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"


def test_special_tokens(tok: Tokenizer) -> None:
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert {0, 2} <= tok.stop_token_ids  # <|endoftext|> and ChatML's end of turn <|im_end|>
    assert tok.encode("<|im_start|>hi<|im_end|>") == [1, tok.encode("hi")[0], 2]
    assert not tok.add_bos  # tokenizer.ggml.add_bos_token is false


CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, with émojis 🎨?"},
        {"role": "assistant", "content": "Red 🔴."}, {"role": "user", "content": "Thanks\n\n  bye"}],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, name: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("text", [
    "emoji 😀🎉👨‍👩‍👧 done", "日本語のテキストと中文", "🇫🇷🇯🇵 flags, Ελληνικά and हिन्दी", "a😀b😀c 你好",
])
def test_stream_decoder_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(re.findall(r"\S+", text))  # multi-byte characters span several tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_save_and_reload(tok: Tokenizer, tmp_path) -> None:
    """A GGUF tokenizer saved in the HF layout (what a native checkpoint stores) reloads unchanged."""
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.hash() == tok.hash()
    assert [again.encode(s) for s in STRINGS] == [tok.encode(s) for s in STRINGS]
    assert (again.bos_token, again.eos_token, again.stop_token_ids) == (tok.bos_token, tok.eos_token,
                                                                       tok.stop_token_ids)
    assert again.chat_template == tok.chat_template
