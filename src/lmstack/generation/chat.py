"""The `generate` and `chat` verbs: typed functions whose signatures are the CLI (`lmstack generate`, `lmstack
chat`), with the helpers other verbs and the demo share (generation_config, load_generator, run_generation,
ChatSession).

    from lmstack.generation.chat import generate
    out = generate(prompt="Name three colours.", chat=True, sampling=SamplingOptions(max_new_tokens=32))
    print(out.text, out.decode_tokens_per_s)

Heavy modules (torch, the models) are imported inside the functions, so `lmstack --help` starts fast.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

from lmstack.checkpoints.registry import DEFAULT_MODEL
from lmstack.errors import LmstackError
from lmstack.generation.sampling import GenerationConfig, SamplingOptions, sampling_config
from lmstack.runconfig import given
from lmstack.io import check_utf8

if TYPE_CHECKING:
    from lmstack.checkpoints import LoadedModel
    from lmstack.generation import GenerationResult, Generator

DType = Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 on a GPU or a CPU with native bf16, else float32
Device = Literal["auto", "cpu", "cuda"]  # auto: the GPU when torch sees one, else the CPU


# ------------------------------------------------------------------------------------------ generate


@dataclass
class GenerateOutput:
    """What `generate` returns, and what `lmstack generate --json` prints."""

    text: str
    prompt_tokens: int
    new_tokens: int
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    finish_reason: str
    dtype: str  # the compute dtype the model ran in (what --dtype auto chose)
    device: str  # where it ran (what --device auto chose)
    weights: str  # how the weights are stored (e.g. "int4-g32 + bfloat16": a GGUF's Q4 weights kept packed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_config(**values: Any) -> GenerationConfig:
    """A validated GenerationConfig from keyword values (a LmstackError names a bad value) before any model loads."""
    return sampling_config(SamplingOptions(**values))


# The repetition guard of `generate` and `chat` when neither the user nor the model's files set these fields
# (measured in bench/chat_repetition.py). A penalty, not no_repeat_ngram_size: that rule also forbids copying
# any n-gram of the prompt (a quoted name, code being edited), which chat needs.
REPETITION_GUARD: dict[str, Any] = {"repetition_penalty": 1.1}
# GGUF keys llama.cpp reads as the model's sampling defaults -> GenerationConfig fields
_GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                  "general.sampling.top_p": "top_p", "general.sampling.penalty_repeat": "repetition_penalty"}
_HF_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def recommended_sampling(source: str) -> dict[str, Any]:
    """The sampling settings a model's own files recommend, as GenerationConfig fields: `general.sampling.*` in a
    GGUF file (llama.cpp) or generation_config.json in a model folder (transformers: temperature / top_k / top_p
    count only with do_sample true, since transformers decodes greedily otherwise). {} when they carry none
    (SmolLM2-135M-Instruct's GGUF carries none)."""
    import json
    from pathlib import Path

    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lmstack.checkpoints.gguf import read_gguf

        meta = read_gguf(path).metadata
        return {field: meta[key] for key, field in _GGUF_SAMPLING.items() if key in meta}
    config = path / "generation_config.json"
    if not config.is_file():
        return {}
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmstackError(f"{config}: not readable JSON ({e})") from None
    sampled = bool(values.get("do_sample"))
    return {k: values[k] for k in _HF_SAMPLING
            if values.get(k) is not None and (sampled or k in ("repetition_penalty", "no_repeat_ngram_size"))}


def sampling_defaults(source: str, given: dict[str, Any]) -> dict[str, Any]:
    """GenerationConfig fields for a `generate` / `chat` run: what the user set (`given`, the options they passed),
    else what the model's files recommend, else the repetition guard. Parity tests pass every field explicitly,
    so they never see these defaults."""
    return {**REPETITION_GUARD, **recommended_sampling(source), **given}


def load_generator(model: str | None, dtype: DType = "auto", compile: bool = False,
                   adapter: str | None = None, device: str = "auto") -> tuple["Generator", "LoadedModel", float]:
    """Load `model` (registry name or path) onto `device`, with `adapter` applied unmerged when given, and wrap it
    in a Generator; also returns the load time in s. No model: the adapter's base, else DEFAULT_MODEL."""
    from lmstack.checkpoints import load_model
    from lmstack.checkpoints.load import resolve_device
    from lmstack.generation import Generator
    device = resolve_device(device)  # a bad name fails before the model loads
    start = time.perf_counter()
    loaded = load_model(model or (None if adapter else DEFAULT_MODEL), adapter=adapter, dtype=dtype,
                        device=device, inference=True, compile=compile)
    if loaded.tokenizer is None:  # the verbs take text: name the folder and the missing file
        raise LmstackError(f"{loaded.source}: no tokenizer.json beside the weights, so text cannot be encoded; "
                           "copy the tokenizer.json of the model it was trained from into the folder")
    generator = Generator(loaded.model, loaded.tokenizer, compile=compile)
    return generator, loaded, time.perf_counter() - start


def run_generation(generator: "Generator", prompt: "str | list[int]", cfg: "GenerationConfig",
                   on_text: Callable[[str], None] | None = None) -> "GenerationResult":
    """Generate, streaming text pieces to `on_text` as they decode (beam search only knows its text at the end)."""
    if on_text is None:
        return generator.generate(prompt, cfg)
    if cfg.num_beams > 1:
        result = generator.generate(prompt, cfg)
        on_text(result.text)
        return result
    for piece in generator.stream(prompt, cfg):
        on_text(piece)
    return generator.last_result


def generate(*, prompt: str, model: str | None = None, chat: bool = False, system: str | None = None,
             sampling: SamplingOptions | None = None, dtype: DType = "auto", device: Device = "auto",
             compile: bool = False, adapter: str | None = None,
             on_text: Callable[[str], None] | None = None) -> GenerateOutput:
    """Continue a prompt (or answer it as a chat message with --chat) and report timings.

    Args:
        prompt: The text to continue, or the user message with --chat.
        model: A registry name (see `lmstack models list`), a GGUF file, an HF folder or a native folder
            (default smollm2-135m-instruct; with --adapter, the adapter's base model).
        chat: Wrap the prompt in the model's chat template as one user turn.
        system: A system message for --chat.
        sampling: The sampling options; unset ones come from the model's files (GGUF general.sampling.*,
            generation_config.json), else greedy decoding, 128 tokens and a repetition penalty of 1.1.
        dtype: Compute dtype of the weights: auto (bfloat16 where the CPU has native bf16 or on a GPU, else
            float32), float32 or bfloat16.
        device: Where the model runs: auto (the GPU when torch sees one, else the CPU), cpu or cuda.
        compile: torch.compile the decode step (slow first call, faster after).
        adapter: An adapter folder from `lmstack finetune` (or a peft LoRA folder), applied unmerged.
        on_text: Called with each new piece of text as it is decoded.
    """
    sampling_config(sampling)  # a bad value fails before the model loads
    if system is not None and not chat:
        raise LmstackError("--system needs --chat (a plain prompt has no system message)")
    generator, loaded, load_s = load_generator(model, dtype, compile, adapter, device)
    cfg = sampling_config(None, **sampling_defaults(loaded.source, given(sampling)))
    source: str | list[int] = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        source = generator.chat_prompt([*messages, {"role": "user", "content": prompt}])
    result = run_generation(generator, source, cfg, on_text)
    return GenerateOutput(text=result.text, prompt_tokens=result.prompt_tokens, new_tokens=result.new_tokens,
                          load_s=round(load_s, 3), prefill_tokens_per_s=round(result.prefill_tokens_per_s, 1),
                          decode_tokens_per_s=round(result.decode_tokens_per_s, 1),
                          finish_reason=result.finish_reason, dtype=loaded.dtype, device=str(loaded.model.device),
                          weights=loaded.weights)


# ---------------------------------------------------------------------------------------------- chat


class ChatSession:
    """A multi-turn conversation: the message history, a system message, and the generator that answers.

    When the history no longer fits the context window (prompt + max_new_tokens), the oldest turns are dropped.
    """

    def __init__(self, generator: "Generator", cfg: "GenerationConfig", context: int,
                 system: str | None = None) -> None:
        self.generator, self.cfg, self.context, self.system = generator, cfg, context, system
        self.messages: list[dict[str, str]] = []  # user/assistant turns, without the system message

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def _prompt_ids(self) -> list[int]:
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.generator.chat_prompt([*system, *self.messages])
            if len(ids) + self.cfg.max_new_tokens <= self.context or len(self.messages) <= 1:
                return ids  # a single turn that is still too long is the generator's error to report
            self.messages = self.messages[2:]  # drop the oldest user/assistant pair

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> "GenerationResult":
        """Answer `text` as the next user turn, streaming to `on_text`; the answer joins the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            result = run_generation(self.generator, self._prompt_ids(), self.cfg, on_text)
        except BaseException:
            self.messages.pop()  # a failed turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": result.text})
        return result


CHAT_HELP = "/reset clears the history, /system TEXT sets the system message, /exit quits"


def chat(*, model: str | None = None, system: str | None = None, sampling: SamplingOptions | None = None,
         dtype: DType = "auto", device: Device = "auto", compile: bool = False, adapter: str | None = None,
         input: TextIO | None = None, output: TextIO | None = None, notices: TextIO | None = None) -> int:
    """Chat with a model: one message per line on stdin, streamed replies on stdout, until EOF or /exit.

    Commands: /reset clears the history, /system TEXT sets the system message, /exit quits. Replies go to
    stdout one per turn; prompts and notices go to stderr, so the command works in a pipe. A failed turn is
    reported on stderr and the chat goes on; the number of failed turns is returned (the CLI exits with 1).

    Args:
        model: A registry name (see `lmstack models list`), a GGUF file, an HF folder or a native folder
            (default smollm2-135m-instruct; with --adapter, the adapter's base model).
        system: The system message that starts each conversation.
        sampling: The sampling options; unset ones come from the model's files, else greedy decoding, 256 tokens
            per reply and a repetition penalty of 1.1 (with beams, replies appear whole).
        dtype: Compute dtype of the weights: auto (bfloat16 where the CPU has native bf16 or on a GPU, else
            float32), float32 or bfloat16.
        device: Where the model runs: auto (the GPU when torch sees one, else the CPU), cpu or cuda.
        compile: torch.compile the decode step (slow first call, faster after).
        adapter: An adapter folder from `lmstack finetune` (or a peft LoRA folder), applied unmerged.
        input: Where the user's lines come from (default stdin).
        output: Where replies go (default stdout).
        notices: Where prompts, notices and per-turn errors go (default stderr).
    """
    input, output, notices = input or sys.stdin, output or sys.stdout, notices or sys.stderr
    if hasattr(input, "reconfigure"):  # a line that is not UTF-8 fails its turn, not the whole chat
        input.reconfigure(errors="surrogateescape")
    sampling_config(sampling, max_new_tokens=256)  # a bad value fails before the model loads
    generator, loaded, load_s = load_generator(model, dtype, compile, adapter, device)
    cfg = sampling_config(None, **sampling_defaults(loaded.source, {"max_new_tokens": 256, **given(sampling)}))
    context = getattr(loaded.model, "config", loaded.config).max_seq_len  # prompt tuning takes N positions
    session = ChatSession(generator, cfg, context=context, system=system)
    interactive = input.isatty()

    def say(text: str) -> None:
        notices.write(text)
        notices.flush()

    def write(piece: str) -> None:
        output.write(piece)
        output.flush()

    if interactive:
        say(f"loaded {loaded.source} ({loaded.weights}) in {load_s:.1f} s; {CHAT_HELP}\n")
    failures, number = 0, 0
    while True:
        if interactive:
            say("> ")
        line = input.readline()
        number += 1
        if not line:  # EOF
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                say("[history cleared]\n")
            elif command == "/system":
                session.set_system(arg.strip())
                say("[system message set]\n" if arg.strip() else "[system message removed]\n")
            else:
                say(f"[unknown command {command}; {CHAT_HELP}]\n")
            continue
        try:
            session.ask(check_utf8(text, f"input line {number}"), on_text=write)
        except LmstackError as e:
            failures += 1
            say(f"error: {e}\n")
            continue
        write("\n")
    return failures
