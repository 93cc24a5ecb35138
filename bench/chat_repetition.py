"""Repetition in `generate --chat` / `chat` answers: 32 chat prompts, before and after the default guard.

    python bench/chat_repetition.py [--max-new-tokens 128] [--dtype bfloat16]

"before": greedy, no guard (the old defaults: temperature 0, repetition_penalty 1).
"after": `generation.chat.sampling_defaults(model source, {})`, i.e. what `generate` / `chat` use when the user
sets nothing: the model files' own sampling settings (SmolLM2-135M-Instruct's GGUF carries none) over the
repetition guard. A reply "repeats" when some 8-gram of its words occurs twice (rag/grounding.repeated_ngram,
the issue's measure). The 32 prompts run as one batch per setting (each row equals its single-prompt run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.", "Tell me a story about a dragon.", "What is machine learning?",
    "Explain how a car engine works.", "Give me three tips for better sleep.", "Describe your ideal holiday.",
    "What are the benefits of exercise?", "Write a haiku about autumn.", "How do plants make food?",
    "Explain what a computer virus is.", "Why is the sky blue?", "Write a limerick about a cat.",
    "What is the capital of France and what is it known for?", "How do I make a cup of tea?",
    "Explain gravity to a child.", "What is the difference between weather and climate?",
    "Write a short letter to a friend.", "List five fruits and their colours.", "What is photosynthesis?",
    "Describe a busy city street.", "How does the internet work?", "Write a poem about the moon.",
    "What is a neural network?", "Give me a recipe for pancakes.", "Why do we need to drink water?",
    "Tell me about the history of the bicycle.", "What makes a good friend?", "Explain what money is.",
    "Write a short song about rain.", "How do birds fly?", "What is the purpose of a library?",
    "Describe the four seasons.",
]


def run(generator, cfg, prompts: list[str]) -> tuple[float, float, list[str]]:
    from lmstack.rag.grounding import repeated_ngram

    ids = [generator.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    t0 = time.perf_counter()
    results = generator.generate_batch(ids, cfg)
    seconds = time.perf_counter() - t0
    texts = [r.text for r in results]
    return sum(map(repeated_ngram, texts)) / len(texts), seconds, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    from lmstack.generation.chat import generation_config, load_generator, sampling_defaults

    generator, loaded, _ = load_generator(None, args.dtype)
    after = sampling_defaults(loaded.source, {})
    settings = {"before (greedy, no guard)": {}, f"after (defaults: {after})": after}
    rows = []
    for label, fields in settings.items():
        cfg = generation_config(max_new_tokens=args.max_new_tokens, **fields)
        rate, seconds, texts = run(generator, cfg, PROMPTS)
        words = statistics.median(len(t.split()) for t in texts)
        rows.append(f"| {label} | {rate:.3f} ({round(rate * len(PROMPTS))}/{len(PROMPTS)}) | {words:.0f} | "
                    f"{seconds:.0f} |")
        print(rows[-1], flush=True)
        print("   e.g.", repr(texts[0][:160]), flush=True)
    body = "\n".join(["| setting | replies with a repeated 8-gram | median words | batch s (contended) |",
                      "|---|---:|---:|---:|", *rows, "",
                      f"SmolLM2-135M-Instruct ({args.dtype}), 32 chat prompts, max_new_tokens {args.max_new_tokens}, "
                      "one batch per setting; the 2 cores were shared with other jobs, so the seconds are "
                      "contended. The model's GGUF carries no general.sampling.* keys, so the guard is the "
                      "default."])
    record("Chat repetition: the default guard", body,
           f"python bench/chat_repetition.py --max-new-tokens {args.max_new_tokens} --dtype {args.dtype}")


if __name__ == "__main__":
    main()
