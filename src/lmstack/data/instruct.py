"""Instruction and chat fine-tuning data: JSONL readers, prompt templates, response-only labels, packing, mixing.

The pipeline, one stage after another:

  read_examples(path)             JSONL -> [Example]; each Example is a list of chat messages {role, content}
  tokenize_example(ex, tok, tpl)  Example -> (token ids, labels): labels are -100 everywhere but the responses
  InstructionDataset              one task, every example tokenized, shifted for next-token prediction, and
                                  truncated or dropped when longer than max_seq_len (with counts in `summary`)
  InstructionSource               the trainer's BatchSource over one or more tasks: weighted mixing, optional
                                  packing, a validation split and per-task validation batches

Formats (auto-detected from the first record; every later line must have the same fields):
  alpaca             {"instruction", "input" (optional), "output", "system" (optional)}
  chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  prompt-completion  {"prompt", "completion"}
  self-instruct      {"instruction", "instances": [{"input", "output"}, ...]}: one example per instance
A field mapping renames fields first: {"instruction": "question", "output": "answer"} reads GSM8K as alpaca.

Templates:
  chat     the tokenizer's own chat template (SmolLM2: ChatML). Loss on every assistant turn, including the
           end-of-turn token after it (<|im_end|>) so the model learns to stop; nothing from system/user turns.
  alpaca   the Stanford Alpaca prompt (with or without "### Input:"), response, EOS.
  flan     "Instruction: ...\n\nInput: ...\n\nAnswer:" then " response", EOS (one FLAN-style phrasing).
  plain    the instruction (or prompt) verbatim, then the response (or completion) verbatim, EOS.
The instruction templates take one user/assistant exchange (an optional system message goes first).

How the response tokens are found. Instruction templates: the prompt and the response are tokenized
separately and joined (prompt, response, EOS), so the prompt tokens are exactly what generation feeds the
model for that prompt, and the boundary is a token boundary by construction. Chat template: the conversation
is rendered whole, and again up to each assistant turn (with the generation prompt) and through it; those
prefix renders must be prefixes of the whole render, and each boundary must be a token boundary: tokenizing
the text before it gives exactly the first tokens of the whole (chat templates end the generation prompt on a
newline or a special token, so this holds). A template or tokenizer that breaks either rule raises an
LmstackError naming the file and line, rather than mislabel silently.

Sequences: an example of n tokens gives input_ids = ids[:-1] and labels = labels[1:] (n - 1 positions), so
max_seq_len counts model positions. Unpacked batches pad on the right to the longest row. Packed rows put
several examples end to end; attn_mask [B, 1, T, T] is causal inside each example and False across examples,
and position_ids restart at 0 for each, so a packed row gives exactly the logits of its examples run alone.

Mixing and determinism: each row of train_batch(step, index, batch_size) draws a task by weight (default:
proportional to task size, FLAN's examples-proportional mixing) and an example uniformly from it (with
replacement), from an RNG seeded by (seed, step, index) alone. A batch is a pure function of its arguments,
so a resumed run sees the same batches. Packing fills rows greedily with successive draws.

Validation: each task's val set is its own val file, or a seeded `val_fraction` of its examples held out from
training. val_batches_by_task(batch_size) gives each task's fixed batches for per-task losses; val_batch(i, bs)
walks the tasks round-robin, for the trainer's overall val loss. Every batch carries task_ids [B, T] (-1 on
padding) next to input_ids/labels (and attn_mask/position_ids when packed); objectives ignore it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np
import torch
from torch import Tensor

from lmstack.data.batching import IGNORE_INDEX
from lmstack.data.prepare import _lines
from lmstack.errors import LmstackError
from lmstack.io import json_records, require_file
from lmstack.tokenizer import Tokenizer

Message = dict[str, str]
Overflow = Literal["truncate", "drop"]
FORMATS = ("alpaca", "chat", "prompt-completion", "self-instruct")
ROLES = ("system", "user", "assistant")
FIELD_NAMES = ("instruction", "input", "output", "system", "prompt", "completion", "messages", "instances")

_ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                 "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
# name -> (prompt without input, prompt with input, text put before the response). Prompt and response are
# tokenized separately (see _instruction_ids), so the boundary is a token boundary whatever the texts end with.
INSTRUCTION_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "alpaca": (_ALPACA_NO_INPUT, _ALPACA_INPUT, ""),
    "flan": ("Instruction: {instruction}\n\nAnswer:", "Instruction: {instruction}\n\nInput: {input}\n\nAnswer:", " "),
    "plain": ("{instruction}", "{instruction}\n\n{input}", ""),
}
TEMPLATES = ("chat", *INSTRUCTION_TEMPLATES)


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Example:
    """One conversation. Alpaca-like records also keep instruction and input apart, for the instruction
    templates ("### Input:" appears only when there is an input); chat records leave them None / ""."""

    messages: list[Message]
    where: str = "<memory>"  # "file:line", named in errors
    instruction: str | None = None
    input: str = ""


def parse_fields(spec: str | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'} (CLI --fields)."""
    fields: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, source = part.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise LmstackError(f"--fields: expected name=field, got {part.strip()!r}")
        fields[name.strip()] = source.strip()
    _check_fields(fields)
    return fields


def _check_fields(fields: dict[str, str]) -> None:
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise LmstackError(f"unknown field name(s) {', '.join(unknown)} in the field mapping; "
                           f"known: {', '.join(FIELD_NAMES)}")


def detect_format(record: dict[str, Any], fields: dict[str, str] | None = None) -> str | None:
    """The format a record's fields suggest, or None."""
    fields = fields or {}

    def has(name: str) -> bool:
        return fields.get(name, name) in record

    if has("messages"):
        return "chat"
    if has("instances"):
        return "self-instruct"
    if has("instruction"):
        return "alpaca"
    if has("prompt"):
        return "prompt-completion"
    return None


def _field(record: dict[str, Any], name: str, fields: dict[str, str], where: str, fmt: str,
           required: bool = True, kind: type = str) -> Any:
    """record[name] through the field mapping, type-checked; a missing optional field (or null) is None."""
    key = fields.get(name, name)
    value = record.get(key)
    if value is None:
        if required:
            raise LmstackError(f"{where}: missing field '{key}' (format {fmt})")
        return None
    if not isinstance(value, kind):
        raise LmstackError(f"{where}: field '{key}' is {type(value).__name__}, not {kind.__name__} (format {fmt})")
    return value


def _alpaca_example(instruction: str, input: str, output: str, system: str | None, where: str) -> Example:
    # The chat rendering puts the input under the instruction, as most Alpaca-to-chat conversions do.
    user = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(messages, where, instruction, input)


def parse_record(record: Any, fmt: str, fields: dict[str, str] | None = None,
                 where: str = "<memory>") -> list[Example]:
    """One JSON object in format `fmt` -> its examples (one, or one per instance for self-instruct)."""
    fields = fields or {}
    if not isinstance(record, dict):
        raise LmstackError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        return [_alpaca_example(_field(record, "instruction", fields, where, fmt),
                                _field(record, "input", fields, where, fmt, required=False) or "",
                                _field(record, "output", fields, where, fmt),
                                _field(record, "system", fields, where, fmt, required=False), where)]
    if fmt == "self-instruct":
        instruction = _field(record, "instruction", fields, where, fmt)
        instances = _field(record, "instances", fields, where, fmt, kind=list)
        if not instances:
            raise LmstackError(f"{where}: field '{fields.get('instances', 'instances')}' is empty (format {fmt})")
        examples = []
        for k, instance in enumerate(instances):
            at = f"{where}: instance {k}"
            if not isinstance(instance, dict):
                raise LmstackError(f"{at}: expected a JSON object, got {type(instance).__name__}")
            examples.append(_alpaca_example(instruction, _field(instance, "input", fields, at, fmt, False) or "",
                                            _field(instance, "output", fields, at, fmt), None, where))
        return examples
    if fmt == "prompt-completion":
        return [Example([{"role": "user", "content": _field(record, "prompt", fields, where, fmt)},
                         {"role": "assistant", "content": _field(record, "completion", fields, where, fmt)}], where)]
    if fmt == "chat":
        raw = _field(record, "messages", fields, where, fmt, kind=list)
        messages: list[Message] = []
        for k, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LmstackError(f"{where}: message {k} needs string 'role' and 'content' fields (format chat)")
            if m["role"] not in ROLES:
                raise LmstackError(f"{where}: message {k} has role {m['role']!r}; use system, user or assistant "
                                   "(format chat)")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in messages):
            raise LmstackError(f"{where}: no assistant message, so nothing to learn (format chat)")
        return [Example(messages, where)]
    raise LmstackError(f"unknown format {fmt!r}; use auto, {', '.join(FORMATS)}")


def read_examples(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None,
                  limit: int | None = None) -> tuple[list[Example], str]:
    """(examples, format used) from a JSONL file (.gz too); `limit` caps the records read. Blank lines are skipped."""
    path = require_file(Path(path).expanduser(), "JSONL file")
    if limit is not None and limit < 1:  # a negative limit must not act as a slice from the end
        raise LmstackError(f"limit must be >= 1, not {limit}")
    fields = fields or {}
    _check_fields(fields)
    if format != "auto" and format not in FORMATS:
        raise LmstackError(f"unknown format {format!r}; use auto, {', '.join(FORMATS)}")
    examples: list[Example] = []
    fmt, records = None if format == "auto" else format, 0
    for lineno, record in json_records(path, _lines(path, None)):
        if limit is not None and records >= limit:
            break
        where = f"{path}:{lineno}"
        if fmt is None:
            fmt = detect_format(record, fields) if isinstance(record, dict) else None
            if fmt is None:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                missing = [f"{name}={key}" for name, key in fields.items()
                           if isinstance(record, dict) and key not in record]
                if missing:  # the mapping points at fields this file lacks: say so, not "cannot tell"
                    raise LmstackError(f"{where}: the field mapping names field(s) this record lacks "
                                       f"({', '.join(missing)}); its fields: {keys}")
                raise LmstackError(f"{where}: cannot tell the format from the fields ({keys}); expected "
                                   "instruction/output, messages, prompt/completion or instances, or a field mapping")
        examples.extend(parse_record(record, fmt, fields, where))
        records += 1
    if not examples:
        raise LmstackError(f"{path}: no records")
    return examples, fmt or format


# ------------------------------------------------------------------------------------------ templates


def _render(tokenizer: Tokenizer, messages: list[Message], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except (LmstackError, jinja2.TemplateError) as e:
        raise LmstackError(f"{where}: {e}") from None


def _chat_spans(example: Example, tokenizer: Tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The whole render and the character span of each assistant turn (content + end-of-turn marker)."""
    messages, where = example.messages, example.where
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        # Trailing whitespace after the end-of-turn token (ChatML's "\n") is layout, not something to generate.
        through = _render(tokenizer, messages[:i + 1], False, where).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise LmstackError(f"{where}: the chat template does not render message {i} as a continuation of "
                               "the messages before it, so the response tokens cannot be found; use an "
                               "instruction template (alpaca, flan, plain)")
        if message["content"].strip() not in full[len(before):len(through)]:
            raise LmstackError(f"{where}: the chat template does not render assistant message {i} verbatim, so "
                               "its tokens cannot be found")
        spans.append((len(before), len(through)))
    return full, spans


def _instruction_text(example: Example, template: str) -> tuple[str, str]:
    """(prompt, response) for an instruction template; the EOS token is added after tokenizing."""
    messages = example.messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if [m["role"] for m in turns] != ["user", "assistant"]:
        raise LmstackError(f"{example.where}: template {template!r} takes one user message and one assistant "
                           f"reply, got {len(turns)} messages; use the chat template for conversations")
    no_input, with_input, response_prefix = INSTRUCTION_TEMPLATES[template]
    instruction = example.instruction if example.instruction is not None else turns[0]["content"]
    prompt = (with_input if example.input else no_input).format(instruction=instruction, input=example.input)
    if system:
        prompt = f"{system}\n\n{prompt}"
    return prompt, response_prefix + turns[1]["content"]


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer,
                      template: str = "chat") -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) per example; labels[i] = ids[i] on response tokens, -100 elsewhere (not shifted).

    Chat templates carry their own special tokens (as transformers' apply_chat_template(tokenize=True) does);
    instruction templates get BOS when the tokenizer adds one, and a labelled EOS after the response. Texts
    are encoded in batches (the Rust side runs them in parallel).
    """
    if template == "chat":
        return _chat_ids(examples, tokenizer)
    if template in INSTRUCTION_TEMPLATES:
        return _instruction_ids(examples, tokenizer, template)
    raise LmstackError(f"unknown template {template!r}; use {', '.join(TEMPLATES)}")


def _instruction_ids(examples: Sequence[Example], tokenizer: Tokenizer,
                     template: str) -> list[tuple[list[int], list[int]]]:
    """Prompt and response are encoded separately and joined: encode(prompt) is exactly what generation feeds
    the model, and the response tokens are what it should produce after it, whatever the prompt ends with
    (a trailing space would otherwise merge into the response's first token and blur the boundary)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise LmstackError(f"template {template!r} ends each response with EOS, and this tokenizer has none")
    texts = [_instruction_text(e, template) for e in examples]
    encode = tokenizer.backend.encode_batch
    prompts = encode([p for p, _ in texts], add_special_tokens=False)
    responses = encode([r for _, r in texts], add_special_tokens=False)
    head = [bos] if tokenizer.add_bos and bos is not None else []
    out = []
    for prompt, response in zip(prompts, responses):
        ids = [*head, *prompt.ids, *response.ids, eos]
        n_prompt = len(head) + len(prompt.ids)
        out.append((ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]))
    return out


def _chat_ids(examples: Sequence[Example], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """The whole conversation is encoded once (the model's own template decides every token); each assistant
    span's edges must be token boundaries: the text before an edge encodes to a prefix of the whole ids."""
    rendered = [_chat_spans(e, tokenizer) for e in examples]
    encode = tokenizer.backend.encode_batch  # no special tokens added: the template has written them
    all_ids = [enc.ids for enc in encode([text for text, _ in rendered], add_special_tokens=False)]
    cuts = [(k, pos) for k, (text, spans) in enumerate(rendered) for span in spans for pos in span
            if pos < len(text)]
    prefixes = encode([rendered[k][0][:pos] for k, pos in cuts], add_special_tokens=False)
    boundary = {}
    for (k, pos), enc in zip(cuts, prefixes):
        ids, prefix = all_ids[k], enc.ids
        if ids[:len(prefix)] != prefix:
            text = rendered[k][0]
            raise LmstackError(f"{examples[k].where}: the prompt/response boundary at character {pos} "
                               f"({text[max(0, pos - 12):pos]!r} | {text[pos:pos + 12]!r}) is not a token boundary; "
                               "the chat template must end the generation prompt where the tokenizer splits "
                               "(e.g. on a newline), or use an instruction template (alpaca, flan, plain)")
        boundary[k, pos] = len(prefix)
    out = []
    for k, ((text, spans), ids) in enumerate(zip(rendered, all_ids)):
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            a, b = (len(ids) if pos == len(text) else boundary[k, pos] for pos in (start, end))
            labels[a:b] = ids[a:b]
        out.append((ids, labels))
    return out


def tokenize_example(example: Example, tokenizer: Tokenizer, template: str = "chat") -> tuple[list[int], list[int]]:
    """One example's (token ids, labels); see `tokenize_examples`."""
    return tokenize_examples([example], tokenizer, template)[0]


# ------------------------------------------------------------------------------------------ one task


class InstructionDataset:
    """One task's tokenized examples. Row i is (input_ids [L_i], labels [L_i]), L_i <= max_seq_len, labels
    already shifted (labels[t] is the token after input_ids[t], or -100). Rows are stored end to end in two
    int32 arrays with offsets, so a few hundred thousand examples cost little memory."""

    def __init__(self, name: str, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 truncated: np.ndarray, max_seq_len: int, summary: dict[str, Any]) -> None:
        self.name = name
        self.input_ids, self.labels = input_ids, labels  # [N] int32 each, all rows end to end
        self.offsets = offsets  # [n + 1] int64: row i is [offsets[i], offsets[i + 1])
        self.truncated = truncated  # [n] bool
        self.max_seq_len = max_seq_len
        self.summary = summary  # examples, kept, truncated, dropped, tokens, target_tokens (+ format, template)

    @classmethod
    def from_examples(cls, examples: Sequence[Example], tokenizer: Tokenizer, max_seq_len: int,
                      template: str = "chat", overflow: Overflow = "truncate", name: str = "task") -> InstructionDataset:
        """Tokenize `examples`; one longer than max_seq_len positions is cut to fit ("truncate") or skipped
        ("drop"). An example left without any response token (its prompt fills max_seq_len) is dropped."""
        if overflow not in ("truncate", "drop"):
            raise LmstackError(f"overflow must be truncate or drop, not {overflow!r}")
        if max_seq_len < 1:
            raise LmstackError(f"max_seq_len must be >= 1, got {max_seq_len}")
        rows_ids: list[list[int]] = []
        rows_labels: list[list[int]] = []
        truncated: list[bool] = []
        dropped = 0
        tokenized = (pair for i in range(0, len(examples), 1024)  # in chunks: bounded memory, batched encodes
                     for pair in tokenize_examples(examples[i:i + 1024], tokenizer, template))
        for ids, labels in tokenized:
            inputs, targets = ids[:-1], labels[1:]  # predict token t + 1 at position t
            cut = len(inputs) > max_seq_len
            if cut and overflow == "drop":
                dropped += 1
                continue
            inputs, targets = inputs[:max_seq_len], targets[:max_seq_len]
            if all(t == IGNORE_INDEX for t in targets):
                dropped += 1
                continue
            rows_ids.append(inputs)
            rows_labels.append(targets)
            truncated.append(cut)
        lengths = np.array([len(r) for r in rows_ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat_ids = np.array([t for r in rows_ids for t in r], dtype=np.int32)
        flat_labels = np.array([t for r in rows_labels for t in r], dtype=np.int32)
        summary = {"examples": len(examples), "kept": len(rows_ids), "truncated": int(sum(truncated)),
                   "dropped": dropped, "tokens": int(lengths.sum()),
                   "target_tokens": int((flat_labels != IGNORE_INDEX).sum()), "template": template}
        return cls(name, flat_ids, flat_labels, offsets, np.array(truncated, dtype=bool), max_seq_len, summary)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Tokenizer, max_seq_len: int, template: str = "chat",
                   format: str = "auto", fields: dict[str, str] | None = None, overflow: Overflow = "truncate",
                   name: str | None = None, limit: int | None = None) -> InstructionDataset:
        examples, fmt = read_examples(path, format, fields, limit)
        dataset = cls.from_examples(examples, tokenizer, max_seq_len, template, overflow, name or _stem(path))
        dataset.summary["format"] = fmt
        return dataset

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [L], labels [L]) of example i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def subset(self, indices: Sequence[int], name: str | None = None) -> InstructionDataset:
        """The rows at `indices`, in that order (for a validation split)."""
        rows = [self.row(i) for i in indices]
        lengths = np.array([len(r[0]) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32)
        labels = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.int32)
        truncated = self.truncated[np.asarray(indices, dtype=np.int64)]
        summary = {**self.summary, "examples": len(rows), "kept": len(rows), "truncated": int(truncated.sum()),
                   "dropped": 0, "tokens": int(lengths.sum()), "target_tokens": int((labels != IGNORE_INDEX).sum())}
        return InstructionDataset(name or self.name, ids, labels, offsets, truncated, self.max_seq_len, summary)


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(suffix)
    return name


# ------------------------------------------------------------------------------------------ collation

Row = tuple[np.ndarray, np.ndarray]  # (input_ids [L], labels [L])


def pad_rows(rows: Sequence[Row], pad_id: int, task_ids: Sequence[int] | None = None) -> dict[str, Tensor]:
    """One example per row, right-padded to the longest: input_ids, labels, task_ids [B, T] (-100 / -1 on pads).
    Padding comes after every real token, so the plain causal mask already keeps it out of view."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    tasks = torch.full((len(rows), T), -1, dtype=torch.long)  # [B, T]
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
        labels[b, :len(ids)] = torch.from_numpy(lab.astype(np.int64))
        tasks[b, :len(ids)] = task_ids[b] if task_ids is not None else 0
    return {"input_ids": input_ids, "labels": labels, "task_ids": tasks}


def pack_rows(rows: Sequence[Sequence[Row]], pad_id: int,
              task_ids: Sequence[Sequence[int]] | None = None) -> dict[str, Tensor]:
    """Several examples per row, end to end, right-padded to the longest row.

    -> input_ids, labels, task_ids, position_ids [B, T] and attn_mask [B, 1, T, T] (True = may attend). Each
    example attends causally to itself only and its positions restart at 0, as if it ran alone. The padding
    tail is one more block of its own, so no query row is fully masked (that would give NaN in SDPA).
    """
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    tasks = torch.full((B, T), -1, dtype=torch.long)  # [B, T]
    segment = torch.zeros(B, T, dtype=torch.long)  # [B, T] which example each position belongs to
    position_ids = torch.zeros(B, T, dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        start = 0
        for k, (ids, lab) in enumerate(row):
            end = start + len(ids)
            input_ids[b, start:end] = torch.from_numpy(ids.astype(np.int64))
            labels[b, start:end] = torch.from_numpy(lab.astype(np.int64))
            tasks[b, start:end] = task_ids[b][k] if task_ids is not None else 0
            segment[b, start:end] = k
            position_ids[b, start:end] = torch.arange(len(ids))
            start = end
        segment[b, start:] = len(row)
        position_ids[b, start:] = torch.arange(T - start)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, T]
    attn_mask = (segment[:, :, None] == segment[:, None, :]) & causal  # [B, T, T]
    return {"input_ids": input_ids, "labels": labels, "task_ids": tasks, "position_ids": position_ids,
            "attn_mask": attn_mask[:, None]}  # attn_mask [B, 1, T, T]


# ------------------------------------------------------------------------------------------ mixing

Ref = tuple[int, int]  # (task, example index)


class InstructionSource:
    """The trainer's BatchSource over one or more instruction tasks (see the module notes for the design).

    datasets:     the tasks' training data (InstructionDataset each; names label per-task val losses)
    weights:      sampling weight per task, any scale; None = proportional to each task's training examples
    val_fraction: share of each task held out for validation when it has no val set of its own
    val:          per task, its own validation InstructionDataset, or None to hold out val_fraction
    """

    def __init__(self, datasets: Sequence[InstructionDataset], weights: Sequence[float] | None, tokenizer: Tokenizer,
                 max_seq_len: int, pack: bool = False, seed: int = 0, val_fraction: float = 0.0,
                 val: Sequence[InstructionDataset | None] | None = None) -> None:
        if not datasets:
            raise LmstackError("no instruction datasets given")
        if val is not None and len(val) != len(datasets):
            raise LmstackError(f"{len(val)} validation sets for {len(datasets)} tasks; give one (or None) per task")
        if not 0.0 <= val_fraction < 1.0:
            raise LmstackError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.seq_len, self.pack, self.seed = max_seq_len, pack, seed
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.task_names = _unique_names([d.name for d in datasets])
        self.train: list[InstructionDataset] = []
        self.val: list[InstructionDataset | None] = []
        self._summaries = [d.summary for d in datasets]  # the whole file's counts, before any val split
        for k, dataset in enumerate(datasets):
            if dataset.max_seq_len > max_seq_len:
                raise LmstackError(f"task {self.task_names[k]} was tokenized for max_seq_len {dataset.max_seq_len}, "
                                   f"longer than the source's {max_seq_len}")
            own_val = val[k] if val is not None else None
            train, held_out = (dataset, own_val) if own_val is not None else self._split(dataset, val_fraction, k)
            if len(train) == 0:
                raise LmstackError(f"task {self.task_names[k]} has no training examples left "
                                   f"(summary: {dataset.summary})")
            self.train.append(train)
            self.val.append(held_out if held_out is not None and len(held_out) else None)
        sizes = [len(d) for d in self.train]
        w = np.asarray(sizes if weights is None else weights, dtype=np.float64)
        if w.shape != (len(datasets),) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise LmstackError(f"weights must be {len(datasets)} non-negative numbers, not all zero; got "
                               f"{list(weights) if weights is not None else sizes}")
        self.probs = w / w.sum()  # [tasks]
        self._cum_weights = np.cumsum(self.probs).tolist()
        self._val_rows: dict[int, list[tuple[int, list[list[Ref]]]]] = {}

    def _split(self, dataset: InstructionDataset, fraction: float,
               task: int) -> tuple[InstructionDataset, InstructionDataset | None]:
        """A seeded random `fraction` of the rows (at least one) held out; None when fraction is 0."""
        n = len(dataset)
        if fraction == 0 or n < 2:
            return dataset, None
        order = list(range(n))
        random.Random(f"val-split:{self.seed}:{task}").shuffle(order)
        n_val = min(n - 1, max(1, round(n * fraction)))
        return dataset.subset(sorted(order[n_val:])), dataset.subset(sorted(order[:n_val]))

    # ---------------------------------------------------------------------------------- training

    def sample(self, step: int, index: int, batch_size: int) -> list[list[Ref]]:
        """The (task, example) references of train batch (step, index): one per row, or several when packing.
        A pure function of (seed, step, index, batch_size)."""
        rng = random.Random(f"instruct:{self.seed}:{step}:{index}")
        tasks = range(len(self.train))

        def draw() -> Ref:
            task = rng.choices(tasks, cum_weights=self._cum_weights)[0]
            return task, rng.randrange(len(self.train[task]))

        if not self.pack:
            return [[draw()] for _ in range(batch_size)]
        rows: list[list[Ref]] = []
        row: list[Ref] = []
        used = 0
        while True:
            ref = draw()
            n = self.train[ref[0]].length(ref[1])
            if used + n > self.seq_len:  # the row is full: close it; this example opens the next one
                rows.append(row)
                if len(rows) == batch_size:
                    return rows
                row, used = [], 0
            row.append(ref)
            used += n

    def collate(self, rows: Sequence[Sequence[Ref]], split: Sequence[InstructionDataset | None]) -> dict[str, Tensor]:
        examples = [[split[t].row(i) for t, i in row] for row in rows]  # type: ignore[union-attr]
        tasks = [[t for t, _ in row] for row in rows]
        if self.pack:
            return pack_rows(examples, self.pad_id, tasks)
        return pad_rows([r[0] for r in examples], self.pad_id, [t[0] for t in tasks])

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, Tensor]:
        return self.collate(self.sample(step, index, batch_size), self.train)

    # ---------------------------------------------------------------------------------- validation

    def _val_batch_rows(self, batch_size: int) -> list[tuple[int, list[list[Ref]]]]:
        """Every val example once, in order, as (task, rows) batches of one task each; cached per batch size
        (the references only: packed masks are built on demand)."""
        if batch_size not in self._val_rows:
            per_task: list[list[tuple[int, list[list[Ref]]]]] = []
            for task, dataset in enumerate(self.val):
                rows: list[list[Ref]] = []
                used = self.seq_len + 1
                for i in range(len(dataset) if dataset is not None else 0):
                    n = dataset.length(i)  # type: ignore[union-attr]
                    if not self.pack or used + n > self.seq_len:
                        rows.append([])
                        used = 0
                    rows[-1].append((task, i))
                    used += n
                per_task.append([(task, rows[j:j + batch_size]) for j in range(0, len(rows), batch_size)])
            # round-robin over tasks, so the first few val batches already cover every task
            longest = max((len(b) for b in per_task), default=0)
            self._val_rows[batch_size] = [b[j] for j in range(longest) for b in per_task if j < len(b)]
        return self._val_rows[batch_size]

    def num_val_batches(self, batch_size: int) -> int:
        return len(self._val_batch_rows(batch_size))

    def val_batch(self, index: int, batch_size: int) -> dict[str, Tensor]:
        """Val batch `index` (wrapping around), all rows from one task; the batch's task_ids say which."""
        batches = self._val_batch_rows(batch_size)
        if not batches:
            raise LmstackError("no validation examples: set a val_fraction or give validation files")
        _, rows = batches[index % len(batches)]
        return self.collate(rows, self.val)

    def val_batches_by_task(self, batch_size: int) -> dict[str, list[dict[str, Tensor]]]:
        """Task name -> all of that task's val batches (every val example exactly once), for per-task losses."""
        out: dict[str, list[dict[str, Tensor]]] = {name: [] for name, v in zip(self.task_names, self.val) if v}
        for task, rows in self._val_batch_rows(batch_size):
            out[self.task_names[task]].append(self.collate(rows, self.val))
        return out

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per task: sampling probability, train/val example counts and the tokenization summary."""
        return {name: {"weight": float(p), "train": len(t), "val": len(v) if v is not None else 0, **s}
                for name, p, t, v, s in zip(self.task_names, self.probs, self.train, self.val, self._summaries)}


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


# ------------------------------------------------------------------------------------------ from files


@dataclass
class InstructionTask:
    """One task for `build_instruction_source`, as the finetune command reads it from flags or a config."""

    path: str
    weight: float | None = None
    val_path: str | None = None
    name: str | None = None
    format: str = "auto"
    fields: dict[str, str] | None = None
    template: str = "chat"
    limit: int | None = None


def build_instruction_source(tasks: Sequence[InstructionTask], tokenizer: Tokenizer, max_seq_len: int,
                             pack: bool = False, seed: int = 0, val_fraction: float = 0.05,
                             overflow: Overflow = "truncate") -> InstructionSource:
    """Read, tokenize and mix the tasks. Weights: all given, or none (then proportional to task size)."""
    if not tasks:
        raise LmstackError("no instruction data given")
    given = [t.weight is not None for t in tasks]
    if any(given) and not all(given):
        raise LmstackError("give a weight for every task or for none (none = proportional to task size)")

    def load(path: str, task: InstructionTask) -> InstructionDataset:
        return InstructionDataset.from_jsonl(path, tokenizer, max_seq_len, task.template, task.format, task.fields,
                                             overflow, task.name, task.limit)

    train = [load(t.path, t) for t in tasks]
    val = [load(t.val_path, t) if t.val_path else None for t in tasks]
    weights = [float(t.weight) for t in tasks] if all(given) else None  # type: ignore[arg-type]
    return InstructionSource(train, weights, tokenizer, max_seq_len, pack, seed, val_fraction,
                             val if any(v is not None for v in val) else None)
