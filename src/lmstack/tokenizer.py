"""Tokenizers: a thin wrapper over HF `tokenizers`, plus chat templates (jinja2) and streaming detokenization.

Files on disk follow the HF layout (tokenizer.json + tokenizer_config.json), so a native checkpoint and an HF
folder read the same way. GGUF vocabularies are turned into the same object in `checkpoints/gguf.py`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from lmstack.errors import LmstackError
from lmstack.io import atomic_write_json, atomic_write_text


def _special(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, add_bos: bool = False,
                 add_eos: bool = False, extra_stop_tokens: list[str] | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos, self.add_eos = add_bos, add_eos
        self.extra_stop_tokens = list(extra_stop_tokens or [])

    # ------------------------------------------------------------------------------------- files

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise LmstackError(f"tokenizer.json not found in {path}")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust parser's message is already one line
            raise LmstackError(f"{tok_file}: cannot read tokenizer ({e})") from None
        # Files saved by transformers may carry fixed padding/truncation (MiniLM: pad to 128); transformers
        # overrides them on every call, and callers here pad and truncate themselves.
        backend.no_padding()
        backend.no_truncation()
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # HF allows named templates; use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(backend, bos_token=_special(cfg.get("bos_token")), eos_token=_special(cfg.get("eos_token")),
                   pad_token=_special(cfg.get("pad_token")), chat_template=template,
                   add_bos=bool(cfg.get("add_bos_token", False)), add_eos=bool(cfg.get("add_eos_token", False)),
                   extra_stop_tokens=cfg.get("lmstack_stop_tokens"))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        atomic_write_text(path / "tokenizer.json", self.backend.to_str())
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
               "add_bos_token": self.add_bos, "add_eos_token": self.add_eos, "chat_template": self.chat_template,
               "lmstack_stop_tokens": self.extra_stop_tokens, "tokenizer_class": "PreTrainedTokenizerFast"}
        atomic_write_json(path / "tokenizer_config.json", {k: v for k, v in cfg.items() if v is not None})

    def hash(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    # ---------------------------------------------------------------------------------- token ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS plus any end-of-turn tokens (e.g. ChatML's <|im_end|>) that end a generation."""
        ids = {self.token_to_id(t) for t in [self.eos_token, *self.extra_stop_tokens]}
        return {i for i in ids if i is not None}

    # ----------------------------------------------------------------------------- encode/decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor adds what transformers adds (BERT's [CLS] ... [SEP]); add_bos/add_eos
        # come on top, without doubling a token the post-processor already put there.
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids, added = enc.ids, enc.special_tokens_mask
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id, *ids]
            if self.add_eos and self.eos_token_id is not None and not (added and added[-1] and
                                                                        ids[-1] == self.eos_token_id):
                ids = [*ids, self.eos_token_id]
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` with the model's jinja2 template, as transformers' `apply_chat_template` does."""
        if not self.chat_template:
            raise LmstackError("this model's tokenizer has no chat template, so it cannot render chat messages; "
                               "use a chat (instruct) model, or a plain prompt (`generate` without --chat, "
                               "`finetune --template alpaca`, `flan` or `plain`)")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)


def _raise(message: str) -> None:
    raise LmstackError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers: sandboxed, trim_blocks, lstrip_blocks, raise_exception, tojson.
    if source not in _TEMPLATE_CACHE:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


class StreamDecoder:
    """Turns token ids into text pieces one at a time, never splitting a multi-byte character.

    Incremental, as in TGI and vLLM: each push decodes only a short window (the last emitted token or so as
    context, plus the pending ids) and returns the text the newest ids add. Text that ends in U+FFFD (a partial
    UTF-8 sequence) is held back until the rest of the character arrives. Pieces plus `flush()` concatenate to
    `decode(ids)`. The context token matters for tokenizers whose decoder strips a leading space.
    """

    max_pending = 4  # a UTF-8 character is at most 4 bytes: a longer U+FFFD run is invalid text, emit it

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] are context, already emitted
        self.read_offset = 0  # ids[read_offset:] are not emitted yet

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        pending = len(self.ids) - self.read_offset
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and pending < self.max_pending):
            return ""  # nothing new yet, or wait for the rest of the character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end of a generation)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]
