"""The RAFT loop on the course notes: build a RAFT set from training questions, LoRA fine-tune SmolLM2-135M on
it, and compare plain RAG with RAFT-tuned RAG on held-out questions.

    OMP_NUM_THREADS=1 python bench/raft_loop.py --threads 1 [--budget 600] [--held-out 14]

1. The 47 course-notes questions (tests/data/course_notes_qa.jsonl) are shuffled (seed 0) and split into
   train and held-out questions; the held-out questions are never in the RAFT set.
2. `raft build` over the notes with the train questions, `--copies` times with different seeds (other
   distractors, other oracle coins): chat examples with the oracle (p=0.8) and `--distractors` distractors of
   `--chunk-tokens` tokens.
3. LoRA (rank 8 on q, k, v, o) on SmolLM2 with lmstack's Trainer, the loss on the assistant turn only, batch 1,
   for at most `--budget` seconds of training (CPU) or `--max-steps` steps. The adapter is saved in the lmstack
   format, so `lmstack rag ask --adapter DIR` uses it.
4. Held-out questions, each with the same top-(distractors+1) hybrid chunks from an index of the notes chunked
   the same way, answered by: (a) the base model with `rag ask`'s prompt (plain RAG), (b) the base model with
   the RAFT prompt, (c) the RAFT-tuned model with the RAFT prompt. Scored by exact match and token F1 of the
   final answer (the text after `<ANSWER>:` for RAFT prompts), plus how often the answer quotes a retrieved
   chunk between the quote markers.

The fine-tuning verb (`lmstack finetune`) is on another branch; this script drives the same pieces (Trainer,
apply_lora, save_adapter) directly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT.parent / "shared" / "data" / "course-notes"
QA = ROOT / "tests" / "data" / "course_notes_qa.jsonl"
MODEL = "smollm2-135m-instruct"


class ChatExamples:
    """Tokenized chat examples as next-token batches (batch 1): labels only on the assistant turn."""

    def __init__(self, rows: list[tuple[list[int], int]], seed: int = 0) -> None:
        self.rows, self.seed = rows, seed
        self.seq_len = max(len(ids) for ids, _ in rows)

    def _row(self, i: int) -> dict[str, torch.Tensor]:
        from lmstack.training.objectives import IGNORE

        ids, n_prompt = self.rows[i]
        labels = list(ids[1:])
        labels[:n_prompt - 1] = [IGNORE] * (n_prompt - 1)  # predict only the response tokens
        return {"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([labels])}  # [1, T] each

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        order = random.Random(self.seed + step // len(self.rows)).sample(range(len(self.rows)), len(self.rows))
        return self._row(order[(step * batch_size + index) % len(self.rows)])

    def val_batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        return self._row(index % len(self.rows))


def tokenize(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True),
                              add_special_tokens=False)
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False),
                            add_special_tokens=False)
    assert full[:len(prompt)] == prompt, "the chat template must render the prompt as a prefix"
    return full, len(prompt)


def raft_messages(question: str, texts: list[str]) -> list[dict[str, str]]:
    from lmstack.rag.raft import SYSTEM

    documents = "\n".join(f"<DOCUMENT>{t}</DOCUMENT>" for t in texts)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{documents}\n\nQuestion: {question}"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=14)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--distractors", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=96)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", default=None, help="keep the RAFT set and the adapter in this folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmstack.checkpoints import load_model
    from lmstack.generation.chat import generation_config
    from lmstack.generation import Generator
    from lmstack.peft.methods import PeftSpec, apply_method, save_adapter
    from lmstack.rag import raft_build, rag_index
    from lmstack.rag.answer import build_messages
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.evaluate import exact_match, token_f1
    from lmstack.rag.raft import BEGIN_QUOTE, END_QUOTE, final_answer
    from lmstack.rag.retrieve import search
    from lmstack.rag.store import open_index
    from lmstack.training.objectives import causal_lm
    from lmstack.training.trainer import TrainConfig, Trainer

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="raft_loop."))
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    train, held = rows[:-args.held_out], rows[-args.held_out:]
    (work / "train_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))

    # 2. the RAFT set
    examples = []
    for copy in range(args.copies):
        out = work / f"raft{copy}.jsonl"
        raft_build(corpus=str(NOTES), out=str(out), qa=str(work / "train_qa.jsonl"), distractors=args.distractors,
                   chunk_tokens=args.chunk_tokens, seed=copy, progress=False)
        examples += [json.loads(line) for line in out.read_text().splitlines()]
    shown = sum(e["raft"]["oracle_included"] for e in examples)

    # 3. LoRA fine-tuning
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    data = ChatExamples([tokenize(tok, e["messages"]) for e in examples])
    spec = PeftSpec(method="lora", rank=8, alpha=16.0)
    tuned = apply_method(loaded.model, spec)
    config = TrainConfig(out_dir=str(work / "run"), max_steps=args.max_steps, max_time=args.budget, batch_size=1,
                         lr=args.lr, min_lr=args.lr / 10, warmup_steps=5, weight_decay=0.0, eval_every=10**6,
                         eval_batches=1, log_every=10, peak_flops=1e12, progress=False)
    t0 = time.perf_counter()
    result = Trainer(tuned, causal_lm, data, config).fit(resume=False)
    train_s = time.perf_counter() - t0
    save_adapter(tuned, spec, work / "adapter", MODEL)
    tuned.eval()

    # 4. held-out comparison on the same retrieved chunks
    rag_index([str(NOTES)], index=str(work / "notes.sqlite"), chunk_tokens=args.chunk_tokens, progress=False)
    base = Generator(load_model(MODEL).model.eval(), tok)
    raft_gen = Generator(tuned, tok)
    cfg = generation_config(max_new_tokens=args.max_new_tokens)
    embedder = get_embedder("minilm-l6")
    systems = {"plain RAG (base, rag ask prompt)": [], "base model, RAFT prompt": [], "RAFT-tuned, RAFT prompt": []}
    per_question = []
    with open_index(str(work / "notes.sqlite")) as store:
        for item in held:
            hits = search(store, embedder, item["question"], args.distractors + 1, "hybrid")
            texts = [h.chunk.text for h in hits]
            replies = {
                "plain RAG (base, rag ask prompt)":
                    base.generate(base.chat_prompt(build_messages(item["question"], hits)), cfg).text,
                "base model, RAFT prompt": base.generate(base.chat_prompt(raft_messages(item["question"], texts)),
                                                         cfg).text,
                "RAFT-tuned, RAFT prompt": raft_gen.generate(raft_gen.chat_prompt(raft_messages(item["question"],
                                                                                              texts)), cfg).text}
            row = {"question": item["question"], "reference": item["answer"]}
            for name, reply in replies.items():
                final = final_answer(reply)
                quote = re.search(rf"{BEGIN_QUOTE}(.*?){END_QUOTE}", reply, re.S)
                quoted = bool(quote) and any(" ".join(quote.group(1).split()) in " ".join(t.split()) for t in texts)
                systems[name].append((exact_match(final, item["answer"]), token_f1(final, item["answer"]), quoted))
                row[name] = reply
            per_question.append(row)
    (work / "held_out_answers.json").write_text(json.dumps(per_question, indent=2, ensure_ascii=False))

    n = len(held)
    lines = [f"{len(train)} train / {n} held-out questions; RAFT set: {len(examples)} chat examples ({args.copies} "
             f"copies, oracle shown in {shown}, {args.distractors} distractors, {args.chunk_tokens}-token chunks, "
             f"longest {data.seq_len} tokens). LoRA r=8 on q,k,v,o, lr {args.lr}, batch 1: {result.step} steps "
             f"in {train_s:.0f} s ({result.stop_reason}), last train loss {result.train_loss:.3f}. Held-out "
             f"questions get the same top-{args.distractors + 1} hybrid chunks; greedy, {args.max_new_tokens} new "
             "tokens.", "",
             "| system | exact match | token F1 | quotes a retrieved chunk |", "|---|---:|---:|---:|"]
    for name, scores in systems.items():
        lines.append(f"| {name} | {sum(s[0] for s in scores) / n:.3f} | {sum(s[1] for s in scores) / n:.3f} | "
                     f"{sum(s[2] for s in scores) / n:.3f} |")
    body = "\n".join(lines)
    print(body)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    record("RAFT loop: SmolLM2-135M + LoRA on the course notes", body,
           f"{threads}python bench/raft_loop.py " + " ".join(sys.argv[1:]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
