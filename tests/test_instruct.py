"""Instruction / chat fine-tuning data: readers, templates and response-only labels, length handling, packing,
multi-task mixing, determinism, and the real GSM8K and self-instruct files with the SmolLM2 tokenizer."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.config import from_name
from lmstack.data.batching import IGNORE_INDEX
from lmstack.data.instruct import (
    Example,
    InstructionDataset,
    InstructionSource,
    InstructionTask,
    build_instruction_source,
    pack_rows,
    pad_rows,
    parse_fields,
    parse_record,
    read_examples,
    tokenize_example,
)
from lmstack.data.prepare import load_tokenizer
from lmstack.errors import LmstackError
from lmstack.models.decoder import Decoder
from lmstack.tokenizer import Tokenizer
from lmstack.training.objectives import causal_lm

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "train.jsonl"
SEED_TASKS = DATA / "self-instruct" / "seed_tasks.jsonl"
GSM8K_FIELDS = {"instruction": "question", "output": "answer"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("smollm2-135m-instruct")  # GGUF metadata only: fast


def _enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as their label ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ templates


ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_template_masks_exactly_the_prompt(tok: Tokenizer, with_input: bool) -> None:
    record = {"instruction": "Add the numbers.", "input": "2 and 3" if with_input else "", "output": "The sum is 5."}
    example = parse_record(record, "alpaca")[0]
    ids, labels = tokenize_example(example, tok, "alpaca")
    if with_input:
        prompt = (ALPACA_PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
                  "### Response:\n")
    else:
        prompt = ALPACA_PREAMBLE + "### Instruction:\nAdd the numbers.\n\n### Response:\n"
    eos = tok.eos_token_id
    assert not tok.add_bos  # SmolLM2: no BOS, so the sequence is prompt, response, EOS
    assert ids == _enc(tok, prompt) + _enc(tok, "The sum is 5.") + [eos]
    n_prompt = len(_enc(tok, prompt))
    assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False) == "The sum is 5.<|im_end|>"


def test_flan_template_masks_exactly_the_prompt(tok: Tokenizer) -> None:
    example = parse_record({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, "alpaca")[0]
    ids, labels = tokenize_example(example, tok, "flan")
    prompt = "Instruction: Translate to French.\n\nInput: cat\n\nAnswer:"
    assert tok.decode(ids, skip_special_tokens=False) == prompt + " chat<|im_end|>"
    n_prompt = len(_enc(tok, prompt))
    assert ids[:n_prompt] == _enc(tok, prompt)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == _enc(tok, " chat") + [tok.eos_token_id]
    # without an input there is no "Input:" line
    bare = parse_record({"instruction": "Name a colour.", "output": "Blue"}, "alpaca")[0]
    ids, labels = tokenize_example(bare, tok, "flan")
    assert tok.decode(ids, skip_special_tokens=False) == "Instruction: Name a colour.\n\nAnswer: Blue<|im_end|>"


def test_chat_template_single_turn(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital of France."}]
    ids, labels = tokenize_example(Example(messages), tok, "chat")
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True)  # what inference feeds the model
    n_prompt = len(_enc(tok, prompt))
    im_end = tok.token_to_id("<|im_end|>")
    assert ids == _enc(tok, tok.apply_chat_template(messages, add_generation_prompt=False))
    assert ids[:n_prompt] == _enc(tok, prompt)
    target = _enc(tok, "Paris is the capital of France.") + [im_end]
    assert labels == [IGNORE_INDEX] * n_prompt + target + [IGNORE_INDEX]  # the "\n" after <|im_end|> is layout
    assert _labelled_runs(labels) == [target]


def test_chat_template_multi_turn_labels_every_assistant_turn(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "William Shakespeare wrote it."},
                {"role": "user", "content": "And when?"},
                {"role": "assistant", "content": "Around 1600."},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You are welcome!"}]
    ids, labels = tokenize_example(Example(messages), tok, "chat")
    assert ids == _enc(tok, tok.apply_chat_template(messages, add_generation_prompt=False))
    runs = _labelled_runs(labels)
    decoded = [tok.decode(run, skip_special_tokens=False) for run in runs]
    assert decoded == ["William Shakespeare wrote it.<|im_end|>", "Around 1600.<|im_end|>",
                       "You are welcome!<|im_end|>"]
    assert runs == [_enc(tok, m["content"]) + [tok.token_to_id("<|im_end|>")] for m in messages
                    if m["role"] == "assistant"]
    # every labelled position starts right after that turn's generation prompt, so no system/user token is labelled
    for turn, run in zip([2, 4, 6], runs):
        start = len(_enc(tok, tok.apply_chat_template(messages[:turn], add_generation_prompt=True)))
        assert labels[start:start + len(run)] == run and labels[start - 1] == IGNORE_INDEX
    assert sum(len(r) for r in runs) == sum(t != IGNORE_INDEX for t in labels)


def test_template_that_is_not_prefix_stable_raises(tok: Tokenizer) -> None:
    reversed_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    odd = Tokenizer(tok.backend, eos_token=tok.eos_token, chat_template=reversed_template)
    example = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "x.jsonl:7")
    with pytest.raises(LmstackError, match=r"^x\.jsonl:7: the chat template does not render message 1"):
        tokenize_example(example, odd, "chat")


def test_instruction_prompt_is_tokenized_as_at_inference(tok: Tokenizer) -> None:
    # "Say hi " + "there": encoded whole, the space would join " there"; the prompt is encoded alone instead,
    # as generation encodes it, and the completion's tokens follow it
    example = parse_record({"prompt": "Say hi ", "completion": "there"}, "prompt-completion", where="p.jsonl:2")[0]
    ids, labels = tokenize_example(example, tok, "plain")
    assert ids == _enc(tok, "Say hi ") + _enc(tok, "there") + [tok.eos_token_id]
    assert ids != _enc(tok, "Say hi there") + [tok.eos_token_id]
    n_prompt = len(_enc(tok, "Say hi "))
    assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def test_chat_boundary_inside_a_token_raises(tok: Tokenizer) -> None:
    # a generation prompt ending in a space: " hello" is one token in the whole render, so the turn's first
    # token would straddle prompt and response
    spaced = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    odd = Tokenizer(tok.backend, eos_token=tok.eos_token, chat_template=spaced)
    example = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "c.jsonl:3")
    with pytest.raises(LmstackError, match=r"^c\.jsonl:3: the prompt/response boundary at character 20"):
        tokenize_example(example, odd, "chat")


def test_instruction_templates_refuse_multi_turn(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(LmstackError, match="one user message and one assistant reply"):
        tokenize_example(Example(messages, "c.jsonl:1"), tok, "alpaca")
    with pytest.raises(LmstackError, match="unknown template 'nope'"):
        tokenize_example(Example(messages), tok, "nope")


# ------------------------------------------------------------------------------------------ readers


def test_readers_and_format_detection(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    files = {
        "alpaca": [{"instruction": "i", "input": "x", "output": "o"}, {"instruction": "j", "output": "p"}],
        "chat": [chat],
        "prompt-completion": [{"prompt": "p", "completion": "c"}],
        "self-instruct": [{"instruction": "i", "instances": [{"input": "", "output": "o1"},
                                                             {"input": "y", "output": "o2"}]}],
    }
    for fmt, records in files.items():
        path = _write(tmp_path / f"{fmt}.jsonl", [json.dumps(r) for r in records])
        examples, found = read_examples(path)
        assert found == fmt
        assert all(e.messages[-1]["role"] == "assistant" for e in examples)
    examples, _ = read_examples(tmp_path / "alpaca.jsonl")
    assert examples[0].messages == [{"role": "user", "content": "i\n\nx"}, {"role": "assistant", "content": "o"}]
    assert (examples[0].instruction, examples[0].input, examples[1].input) == ("i", "x", "")
    assert examples[0].where == f"{tmp_path / 'alpaca.jsonl'}:1"
    examples, _ = read_examples(tmp_path / "self-instruct.jsonl")
    assert [(e.instruction, e.input, e.messages[-1]["content"]) for e in examples] == [("i", "", "o1"),
                                                                                      ("i", "y", "o2")]
    # a field mapping (GSM8K's question/answer), from the CLI spelling; gzip and blank lines are fine
    assert parse_fields("instruction=question, output=answer") == GSM8K_FIELDS
    gz = tmp_path / "qa.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": "q?", "answer": "a #### 1"}) + "\n\n")
    examples, found = read_examples(gz, fields=GSM8K_FIELDS)
    assert found == "alpaca" and examples[0].messages[-1]["content"] == "a #### 1"


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    ok = json.dumps({"instruction": "i", "output": "o"})
    path = _write(tmp_path / "a.jsonl", [ok, "", json.dumps({"instruction": "i", "input": "x"})])
    with pytest.raises(LmstackError, match=f"^{re.escape(str(path))}:3: missing field 'output' \\(format alpaca\\)$"):
        read_examples(path)
    path = _write(tmp_path / "b.jsonl", [ok, '{"instruction": "i", "output": '])
    with pytest.raises(LmstackError, match=f"^{re.escape(str(path))}:2: invalid JSON \\("):
        read_examples(path)
    path = _write(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "a"}), json.dumps({"question": "q"})])
    with pytest.raises(LmstackError, match=f"^{re.escape(str(path))}:2: missing field 'answer' \\(format alpaca\\)$"):
        read_examples(path, fields=GSM8K_FIELDS)
    with pytest.raises(LmstackError, match=f"^{re.escape(str(path))}:1: cannot tell the format"):
        read_examples(path)
    path = _write(tmp_path / "d.jsonl", [json.dumps({"messages": [{"role": "human", "content": "x"}]})])
    with pytest.raises(LmstackError, match=r":1: message 0 has role 'human'"):
        read_examples(path)
    path = _write(tmp_path / "e.jsonl", [json.dumps({"instruction": "i", "instances": [{"input": "x"}]})])
    with pytest.raises(LmstackError, match=r":1: instance 0: missing field 'output' \(format self-instruct\)$"):
        read_examples(path)
    path = _write(tmp_path / "f.jsonl", [ok, "[1, 2]"])
    with pytest.raises(LmstackError, match=r":2: expected a JSON object, got list$"):
        read_examples(path)
    path = _write(tmp_path / "g.jsonl", [json.dumps({"instruction": "i", "output": 3})])
    with pytest.raises(LmstackError, match=r":1: field 'output' is int, not str \(format alpaca\)$"):
        read_examples(path)
    with pytest.raises(LmstackError, match="unknown field name"):
        parse_fields("question=instruction")
    with pytest.raises(LmstackError, match="file not found"):
        read_examples(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ lengths


def test_truncate_and_drop_counts(tok: Tokenizer) -> None:
    short = Example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    long_answer = Example([{"role": "user", "content": "Count"},
                           {"role": "assistant", "content": " ".join(str(i) for i in range(40))}])
    long_prompt = Example([{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}])
    examples = [short, long_answer, short, long_prompt]
    full = [tokenize_example(e, tok, "plain") for e in examples]
    lengths = [len(ids) - 1 for ids, _ in full]  # model positions: the last token is only ever a target
    max_len = 30
    assert lengths[0] <= max_len < lengths[1] and lengths[3] > max_len
    first_target = next(i for i, t in enumerate(full[3][1]) if t != IGNORE_INDEX)
    assert first_target > max_len + 1  # the prompt alone overflows: nothing left to learn after truncation

    truncated = InstructionDataset.from_examples(examples, tok, max_len, "plain", "truncate")
    targets = sum(t != IGNORE_INDEX for _, lab in full[:3] for t in lab[1:][:max_len])
    assert truncated.summary == {"examples": 4, "kept": 3, "truncated": 1, "dropped": 1,
                                 "tokens": lengths[0] * 2 + max_len, "target_tokens": targets, "template": "plain"}
    ids, labels = truncated.row(1)  # the cut example keeps its first max_len positions
    assert ids.tolist() == full[1][0][:max_len] and labels.tolist() == full[1][1][1:max_len + 1]

    dropped = InstructionDataset.from_examples(examples, tok, max_len, "plain", "drop")
    assert dropped.summary == {"examples": 4, "kept": 2, "truncated": 0, "dropped": 2, "tokens": lengths[0] * 2,
                               "target_tokens": 2 * sum(t != IGNORE_INDEX for t in full[0][1]),
                               "template": "plain"}
    ids, labels = dropped.row(0)
    assert ids.tolist() == full[0][0][:-1] and labels.tolist() == full[0][1][1:]  # shifted by one
    with pytest.raises(LmstackError, match="overflow must be truncate or drop"):
        InstructionDataset.from_examples(examples, tok, max_len, "plain", "cut")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ packing


def _toy_dataset(name: str, lengths: list[int], seed: int, vocab: int = 256) -> InstructionDataset:
    """Random rows of the given lengths: ids in [0, vocab), the first third of each row unlabelled (a prompt)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    labels = [np.where(np.arange(n) < n // 3, IGNORE_INDEX, rng.integers(0, vocab, n)).astype(np.int32)
              for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    summary = {"examples": len(lengths), "kept": len(lengths), "truncated": 0, "dropped": 0, "tokens": sum(lengths),
               "target_tokens": int(sum((lab != IGNORE_INDEX).sum() for lab in labels))}
    return InstructionDataset(name, np.concatenate(ids), np.concatenate(labels), offsets,
                              np.zeros(len(lengths), bool), max(lengths), summary)


@pytest.fixture(scope="module")
def tiny_llama() -> Decoder:
    torch.manual_seed(0)
    return Decoder(from_name("tiny-llama")).eval()


def _alone(model: Decoder, ids: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, float, int]:
    batch = {"input_ids": torch.from_numpy(ids.astype(np.int64))[None],
             "labels": torch.from_numpy(labels.astype(np.int64))[None]}
    with torch.no_grad():
        out = causal_lm(model, batch)
        return model(batch["input_ids"])[0], out.loss_sum.item(), int(out.n_targets)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_packed_row_equals_each_example_alone(preset: str) -> None:
    torch.manual_seed(0)
    model = Decoder(from_name(preset)).eval()  # RoPE (llama) and learned positions (gpt2) both restart per example
    data = _toy_dataset("toy", [11, 5, 17, 9, 23], seed=1)
    rows = [[data.row(0), data.row(1), data.row(2)], [data.row(3), data.row(4)]]  # lengths 33 and 32: one pad
    batch = pack_rows(rows, pad_id=0)
    assert batch["attn_mask"].shape == (2, 1, 33, 33) and batch["position_ids"][0, 11:16].tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        logits = model(batch["input_ids"], attn_mask=batch["attn_mask"], position_ids=batch["position_ids"])
        packed = causal_lm(model, batch)
    assert torch.isfinite(logits).all()  # the padding tail attends to itself: no fully masked query row
    total_loss, total_targets = 0.0, 0
    for b, row in enumerate(rows):
        start = 0
        for ids, labels in row:
            ref_logits, loss, n = _alone(model, ids, labels)
            torch.testing.assert_close(logits[b, start:start + len(ids)], ref_logits, atol=1e-5, rtol=1e-5)
            total_loss, total_targets, start = total_loss + loss, total_targets + n, start + len(ids)
    assert int(packed.n_targets) == total_targets
    torch.testing.assert_close(packed.loss_sum.item(), total_loss, atol=1e-5 * total_targets, rtol=1e-5)


def test_padded_batch_equals_each_example_alone(tiny_llama: Decoder) -> None:
    data = _toy_dataset("toy", [7, 12, 4], seed=2)
    rows = [data.row(i) for i in range(3)]
    batch = pad_rows(rows, pad_id=3, task_ids=[0, 1, 0])
    assert batch["input_ids"].shape == (3, 12) and set(batch) == {"input_ids", "labels", "task_ids"}
    assert (batch["input_ids"][2, 4:] == 3).all() and (batch["labels"][2, 4:] == IGNORE_INDEX).all()
    assert batch["task_ids"][1].tolist() == [1] * 12 and batch["task_ids"][2].tolist() == [0] * 4 + [-1] * 8
    with torch.no_grad():
        logits = tiny_llama(batch["input_ids"])
    for b, (ids, labels) in enumerate(rows):
        torch.testing.assert_close(logits[b, :len(ids)], _alone(tiny_llama, ids, labels)[0], atol=1e-5, rtol=1e-5)


def test_source_packed_batches_match_unpacked_loss(tok: Tokenizer, tiny_llama: Decoder) -> None:
    a, b = _toy_dataset("a", [20, 35, 8, 50, 14, 27], 3), _toy_dataset("b", [5, 9, 60, 12], 4)
    source = InstructionSource([a, b], [1, 1], tok, 64, pack=True, seed=7)
    refs = source.sample(3, 1, 4)
    assert len(refs) == 4 and all(sum(source.train[t].length(i) for t, i in row) <= 64 for row in refs)
    batch = source.train_batch(3, 1, 4)
    with torch.no_grad():
        packed = causal_lm(tiny_llama, batch)
    alone = [_alone(tiny_llama, *source.train[t].row(i)) for row in refs for t, i in row]
    assert int(packed.n_targets) == sum(n for _, _, n in alone)
    torch.testing.assert_close(packed.loss_sum.item(), sum(loss for _, loss, _ in alone), atol=1e-3, rtol=1e-5)
    # task_ids follow the examples
    expected = torch.cat([torch.full((source.train[t].length(i),), t) for t, i in refs[0]])
    assert batch["task_ids"][0, :len(expected)].tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------ mixing


def test_mixing_weights_are_respected(tok: Tokenizer) -> None:
    a, b = _toy_dataset("a", [10] * 50, 5), _toy_dataset("b", [10] * 400, 6)
    source = InstructionSource([a, b], [3, 1], tok, 64, seed=0)
    draws = [t for step in range(250) for row in source.sample(step, 0, 8) for t, _ in row]  # 2000 draws
    assert len(draws) == 2000
    share = draws.count(0) / 2000
    assert abs(share - 0.75) < 0.04  # 4 standard deviations (sd = 0.0097)
    # every example of the small task comes up (uniform within a task)
    assert {i for step in range(250) for row in source.sample(step, 0, 8) for t, i in row if t == 0} == set(range(50))
    # default weights: proportional to task size (50 : 400)
    by_size = InstructionSource([a, b], None, tok, 64, seed=0)
    assert by_size.probs.tolist() == pytest.approx([50 / 450, 400 / 450])
    draws = [t for step in range(250) for row in by_size.sample(step, 1, 8) for t, _ in row]
    assert abs(draws.count(0) / 2000 - 1 / 9) < 0.03
    # packed rows keep the proportions too (over examples)
    packed = InstructionSource([a, b], [3, 1], tok, 64, pack=True, seed=0)
    draws = [t for step in range(60) for row in packed.sample(step, 0, 6) for t, _ in row]
    assert len(draws) > 1500 and abs(draws.count(0) / len(draws) - 0.75) < 0.04
    with pytest.raises(LmstackError, match="weights must be 2 non-negative numbers"):
        InstructionSource([a, b], [1, -1], tok, 64)


@pytest.mark.parametrize("pack", [False, True])
def test_batches_are_pure_functions_of_step_and_index(tok: Tokenizer, pack: bool) -> None:
    def make(seed: int) -> InstructionSource:
        return InstructionSource([_toy_dataset("a", [9, 30, 14, 21, 6] * 4, 8), _toy_dataset("b", [40, 3, 17], 9)],
                                 [2, 1], tok, 48, pack=pack, seed=seed)

    one, two = make(11), make(11)
    keys = [(0, 0), (0, 1), (5, 0), (123, 3)]
    first = {k: one.train_batch(*k, 4) for k in keys}
    for k in reversed(keys):  # another object, another call order: the same batches
        batch = two.train_batch(*k, 4)
        assert batch.keys() == first[k].keys()
        for name in batch:
            assert torch.equal(batch[name], first[k][name])
    assert not torch.equal(first[0, 0]["input_ids"][:, :5], first[0, 1]["input_ids"][:, :5])
    assert not torch.equal(first[0, 0]["input_ids"][:, :5], first[5, 0]["input_ids"][:, :5])
    other_seed = make(12).train_batch(0, 0, 4)
    assert not torch.equal(other_seed["input_ids"][:, :5], first[0, 0]["input_ids"][:, :5])


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("pack", [False, True])
def test_validation_split_and_per_task_batches(tok: Tokenizer, pack: bool) -> None:
    a, b = _toy_dataset("a", list(range(5, 45)), 10), _toy_dataset("b", list(range(3, 23)), 11)
    source = InstructionSource([a, b], None, tok, 64, pack=pack, seed=1, val_fraction=0.1)
    assert [len(d) for d in source.train] == [36, 18] and [len(d) for d in source.val] == [4, 2]
    # held-out rows never appear in training: rows of the toy sets have distinct lengths
    for full, train, val in zip([a, b], source.train, source.val):
        train_lengths = {train.length(i) for i in range(len(train))}
        val_lengths = {val.length(i) for i in range(len(val))}
        assert not train_lengths & val_lengths and len(train_lengths | val_lengths) == len(full)
    by_task = source.val_batches_by_task(2)
    assert list(by_task) == ["a", "b"]
    for name, val in zip(["a", "b"], source.val):
        batches = by_task[name]
        task = source.task_names.index(name)
        assert all(set(x["task_ids"].unique().tolist()) <= {task, -1} for x in batches)
        assert sum(int((x["labels"] != IGNORE_INDEX).sum()) for x in batches) == val.summary["target_tokens"]
    # val_batch walks every task's batches round-robin, all of them once per cycle
    n = source.num_val_batches(2)
    assert n == sum(len(v) for v in by_task.values())
    tasks_in_order = [int(source.val_batch(i, 2)["task_ids"].max()) for i in range(n)]
    assert tasks_in_order[:2] == [0, 1]
    assert torch.equal(source.val_batch(n, 2)["input_ids"], source.val_batch(0, 2)["input_ids"])
    summary = source.summary()
    assert summary["a"]["train"] == 36 and summary["a"]["val"] == 4 and summary["a"]["examples"] == 40
    no_val = InstructionSource([a], None, tok, 64)
    with pytest.raises(LmstackError, match="no validation examples"):
        no_val.val_batch(0, 2)


# ------------------------------------------------------------------------------------------ real data


def test_gsm8k_and_self_instruct_with_smollm2(tok: Tokenizer, tmp_path: Path) -> None:
    gsm = InstructionDataset.from_jsonl(GSM8K, tok, 512, "chat", fields=GSM8K_FIELDS, limit=200)
    assert gsm.name == "train" and gsm.summary["format"] == "alpaca" and gsm.summary["examples"] == 200
    assert gsm.summary["kept"] == 200 and gsm.summary["dropped"] == 0
    first = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])
    ids, labels = gsm.row(0)
    target = [int(t) for t in labels if t != IGNORE_INDEX]
    assert tok.decode(target, skip_special_tokens=False) == first["answer"] + "<|im_end|>"
    assert first["answer"].endswith("#### 72")
    # the prompt is exactly the chat render of the question: inputs start with it (SmolLM2's default system prompt)
    prompt = tok.apply_chat_template([{"role": "user", "content": first["question"]}], add_generation_prompt=True)
    assert ids[:len(_enc(tok, prompt))].tolist() == _enc(tok, prompt)

    records = [json.loads(line) for line in SEED_TASKS.read_text(encoding="utf-8").splitlines() if line.strip()]
    seed = InstructionDataset.from_jsonl(SEED_TASKS, tok, 256, "alpaca", overflow="drop")
    assert seed.summary["format"] == "self-instruct"
    assert seed.summary["examples"] == sum(len(r["instances"]) for r in records)
    assert seed.summary["kept"] + seed.summary["dropped"] == seed.summary["examples"] and seed.summary["dropped"] > 0
    assert int(max(seed.offsets[1:] - seed.offsets[:-1])) <= 256
    ids, labels = seed.row(1)  # antonym_relation: has an input, so the "### Input:" prompt
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert "### Input:\nNight : Day :: Right : Left\n\n### Response:\n" in text
    response = tok.decode([int(t) for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert response == records[1]["instances"][0]["output"] + "<|im_end|>"

    # both tasks mixed through the command's entry point, with a val file for GSM8K
    val = _write(tmp_path / "gsm_dev.jsonl", GSM8K.read_text(encoding="utf-8").splitlines()[200:240])
    source = build_instruction_source(
        [InstructionTask(str(GSM8K), weight=3, val_path=str(val), fields=GSM8K_FIELDS, limit=200),
         InstructionTask(str(SEED_TASKS), weight=1, template="alpaca")], tok, 512, pack=True, seed=0, val_fraction=0.1)
    assert source.task_names == ["train", "seed_tasks"] and source.probs.tolist() == [0.75, 0.25]
    kept = source.summary()["seed_tasks"]["kept"]
    assert [len(d) for d in source.train] == [200, kept - round(kept * 0.1)]
    assert len(source.val[0]) == 40
    batch = source.train_batch(0, 0, 2)
    T = batch["input_ids"].shape[1]
    assert T <= 512 and batch["attn_mask"].shape == (2, 1, T, T)
    assert set(source.val_batches_by_task(4)) == {"train", "seed_tasks"}
    with pytest.raises(LmstackError, match="give a weight for every task or for none"):
        build_instruction_source([InstructionTask(str(GSM8K), weight=1), InstructionTask(str(SEED_TASKS))], tok, 128)
