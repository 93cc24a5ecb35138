"""Generation speed on SmolLM2-135M-Instruct: lmstack against transformers (fp32, bf16) and llama.cpp.

    python bench/generate.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--repeats 3]

Each engine runs in its own subprocess and reports its own peak RSS (getrusage of that process alone): load the
model, prefill a 512-token prompt, then 128 greedy tokens, one at a time. Reports load time, peak RSS, prefill tokens/s and decode tokens/s (medians over the
repeats), and ratios against transformers bf16 measured in the same run. llama-cpp-python is used when
installed; it is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import median, record  # noqa: E402
from lmstack.runconfig import data_root  # noqa: E402

PROMPT_TEXT = (data_root() / "tinyshakespeare" / "input.txt")


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    text = PROMPT_TEXT.read_text()[:20_000]
    return tokenizer_encode(text)[:n]


def run_lmstack(args: argparse.Namespace) -> dict:
    import torch
    from lmstack.checkpoints import load_model
    from lmstack.generation import GenerationConfig, Generator
    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    gen = Generator(loaded.model, loaded.tokenizer, compile=args.compile)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(loaded.tokenizer.encode, args.prompt_tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop=[])
    gen.generate(ids, GenerationConfig(max_new_tokens=8))  # warm-up (and compilation when --compile)
    prefill, decode, tokens = [], [], []
    for _ in range(args.repeats):
        res = gen.generate(ids, cfg)
        prefill.append(res.prefill_tokens_per_s)
        decode.append(res.decode_tokens_per_s)
        tokens.append(res.token_ids)
    return {"load_s": load_s, "prefill": median(prefill), "decode": median(decode), "tokens": tokens[-1],
            "new_tokens": len(tokens[-1]), "torch": torch.__version__}


def run_transformers(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lmstack.checkpoints import resolve
    path = resolve(args.model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(lambda t: tok(t)["input_ids"], args.prompt_tokens)])
    prefill, decode, tokens = [], [], []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)  # prefill: last logits only, as lmstack's prefill
            t1 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            t2 = time.perf_counter()
            n = out.shape[1] - ids.shape[1]
            prefill.append(ids.shape[1] / (t1 - t0))
            decode.append((n - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))  # generate = prefill + n-1 decode steps
            tokens.append(out[0, ids.shape[1]:].tolist())
    return {"load_s": load_s, "prefill": median(prefill), "decode": median(decode), "tokens": tokens[-1],
            "new_tokens": len(tokens[-1]), "transformers": transformers.__version__}


def run_llamacpp(args: argparse.Namespace) -> dict:
    from llama_cpp import Llama
    from lmstack.checkpoints import resolve
    t0 = time.perf_counter()
    llm = Llama(model_path=str(resolve(args.model)), n_ctx=2048, n_threads=args.threads, verbose=False)
    load_s = time.perf_counter() - t0
    text = PROMPT_TEXT.read_text()[:20_000]
    ids = llm.tokenize(text.encode(), add_bos=False)[: args.prompt_tokens]
    prefill, decode, tokens = [], [], []
    for _ in range(args.repeats):
        # Prefill once, then one token at a time (sample, eval): `llm.generate(ids, reset=False)` would evaluate
        # the prompt a second time inside the decode timing.
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)  # greedy
        t1 = time.perf_counter()
        new = [token]
        while len(new) < args.new_tokens:
            llm.eval([token])
            token = llm.sample(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
            new.append(token)
        t2 = time.perf_counter()
        prefill.append(len(ids) / (t1 - t0))
        decode.append((len(new) - 1) / (t2 - t1))  # as lmstack: the first token comes out of the prefill
        tokens.append(new)
    return {"load_s": load_s, "prefill": median(prefill), "decode": median(decode), "tokens": tokens[-1],
            "new_tokens": len(tokens[-1])}


ENGINES = {"lmstack": run_lmstack, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def child(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    result = ENGINES[args.engine](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(args: argparse.Namespace, engine: str, dtype: str, compile: bool = False,
          model: str | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--dtype", dtype, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--model", model or args.model] + (["--compile"] if compile else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{engine} {dtype}: skipped ({tail})", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", choices=sorted(ENGINES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--no-compile-row", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    native = Path("runs/bench/smollm2-native-bf16")  # the same weights, converted once: load time from our format
    if not (native / "lmstack.json").exists():
        from lmstack.checkpoints import convert
        convert(args.model, str(native), to="native", dtype="bfloat16")
    rows = [("transformers fp32", spawn(args, "transformers", "float32")),
            ("transformers bf16", spawn(args, "transformers", "bfloat16")),
            ("lmstack fp32", spawn(args, "lmstack", "float32")),
            ("lmstack bf16", spawn(args, "lmstack", "bfloat16")),
            ("lmstack bf16, native checkpoint", spawn(args, "lmstack", "bfloat16", model=str(native)))]
    if not args.no_compile_row:
        rows.append(("lmstack bf16 + compile", spawn(args, "lmstack", "bfloat16", compile=True)))
    rows.append(("llama.cpp Q4_1", spawn(args, "llama.cpp", "q4_1")))
    ref = dict(rows)["transformers bf16"]
    same = ""
    if ref and dict(rows).get("lmstack bf16"):
        same = ("identical" if dict(rows)["lmstack bf16"]["tokens"] == ref["tokens"] else "different")
    table = ["| engine | load s | peak RSS MB | prefill tok/s | decode tok/s | prefill × tf-bf16 | decode × tf-bf16 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if r is None:
            table.append(f"| {name} | not installed / failed | | | | | |")
            continue
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}") if ref else (lambda k: "")
        table.append(f"| {name} | {r['load_s']:.2f} | {r['peak_rss_mb']:,.0f} | {r['prefill']:,.0f} | "
                     f"{r['decode']:,.1f} | {ratio('prefill')} | {ratio('decode')} |")
    body = "\n".join(table) + (f"\n\n{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, "
                               f"{args.threads} threads, medians of {args.repeats} runs. Greedy tokens of lmstack bf16 "
                               f"vs transformers bf16: {same or 'n/a'}.")
    print(body)
    record("Generation: SmolLM2-135M on CPU", body,
           f"python bench/generate.py --threads {args.threads} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
