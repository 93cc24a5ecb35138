"""`make demo`: a short tour of generation with SmolLM2-135M-Instruct, through the Python API.

Greedy completion, sampling, a streamed two-turn chat and beam search, each with its timings. Run it with
`python -m lmstack.demo [--model NAME_OR_PATH]`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lmstack.errors import LmstackError
from lmstack.generation import GenerationResult
from lmstack.checkpoints.registry import DEFAULT_MODEL
from lmstack.generation.chat import ChatSession, generation_config, load_generator, run_generation
from lmstack.models.blocks import count_weights


def _rule(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def _timings(result: GenerationResult, wall_s: float) -> None:
    print(f"[{result.prompt_tokens} prompt tokens, {result.new_tokens} new ({result.finish_reason}); "
          f"prefill {result.prefill_tokens_per_s:.0f} tok/s, decode {result.decode_tokens_per_s:.1f} tok/s; "
          f"{wall_s:.1f} s]", flush=True)


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def tour(model: str, max_new_tokens: int) -> None:
    print(f"Loading {model} ...", flush=True)
    generator, loaded, load_s = load_generator(model)
    n_params = count_weights(loaded.model)
    print(f"loaded in {load_s:.1f} s: {loaded.config.n_layer} layers, {n_params / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} CPU threads, dtype {loaded.dtype}, weights {loaded.weights} (--dtype auto: "
          "bfloat16 where the CPU has native bf16, else float32; a GGUF's Q4 weights stay packed in bf16)",
          flush=True)

    def run(title: str, prompt: str | list[int], shown: str, **sampling: object) -> None:
        _rule(title)
        print(f"prompt: {shown}\n", flush=True)
        cfg = generation_config(max_new_tokens=max_new_tokens, **sampling)
        start = time.perf_counter()
        result = run_generation(generator, prompt, cfg, on_text=_stream)
        print()
        _timings(result, time.perf_counter() - start)

    question = "What is the capital of France?"
    chat_ids = generator.chat_prompt([{"role": "user", "content": question}])
    run("1. greedy completion (temperature 0)", "The three primary colors are", "The three primary colors are")
    run("2. sampled (temperature 0.8, top-p 0.9, seed 0)",
        generator.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}]),
        "[chat] Write a short poem about the sea.", temperature=0.8, top_p=0.9, seed=0)
    run("3. beam search (4 beams; the text appears at the end)", chat_ids, f"[chat] {question}", num_beams=4)

    _rule("4. streamed chat, two turns (the second sees the first)")
    session = ChatSession(generator, generation_config(max_new_tokens=max_new_tokens),
                                   context=loaded.config.max_seq_len)
    for turn in [question, "And what is a famous landmark there?"]:
        print(f"user: {turn}\nassistant: ", end="", flush=True)
        start = time.perf_counter()
        result = session.ask(turn, on_text=_stream)
        print()
        _timings(result, time.perf_counter() - start)

    _rule("next")
    print(f"lmstack generate --chat --prompt '{question}'   # one answer (add --json for timings)")
    print("lmstack chat                                   # interactive; /reset, /system TEXT, /exit")
    print("lmstack models list                            # what is installed")
    print("lmstack serve                                  # OpenAI-compatible HTTP server + web chat")
    print("  then open http://127.0.0.1:8000/ or use OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lmstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name or checkpoint path")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    try:
        tour(args.model, args.max_new_tokens)
    except LmstackError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
