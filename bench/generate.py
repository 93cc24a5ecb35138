"""Generation speed on SmolLM2-135M-Instruct: lmstack against transformers (fp32, bf16) and llama.cpp, and the
quantized lmstack models (int4 kept from the GGUF, quantize_ int4 / int8 / w8a8) against llama.cpp Q4_1.

    python bench/generate.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--repeats 3]
                             [--tables speed quant] [--ppl-tokens 4096] [--chat-prompts 32]

Each engine runs in its own subprocess and reports its own peak RSS (getrusage of that process alone): load the
model, prefill a 512-token prompt, then 128 greedy tokens, one at a time. Reports load time, peak RSS, prefill
tokens/s and decode tokens/s (medians over the repeats), and ratios against transformers bf16 measured in the same
run.

The quantization table adds quality, against the float32 dequantized model, on token ids prepared once by the
parent so every engine scores the same ones: perplexity of the first --ppl-tokens of tinyshakespeare and of the
course notes (windows of 512, stride 256), and the share of --chat-prompts chat prompts (self-instruct) whose
64 greedy tokens equal the float32 model's. llama.cpp's perplexity comes from its logits (logits_all=True, a
second context made after the speed part, so its peak RSS is read before). Peak RSS is read before the quality
part for every engine.

llama-cpp-python is a peer, not a dependency: when missing it is installed from the wheel cached under
.venv/wheels (building it takes 5-45 minutes; `pip wheel llama-cpp-python==0.3.36 -w .venv/wheels` once).
"""

from __future__ import annotations

import argparse
import json
import math
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
    # as the generate verb loads: the inference swaps (packed bf16, fused projections; the head only when
    # compiling)
    loaded = load_model(args.model, dtype=args.dtype, quant=args.quant, inference=True, compile=args.compile)
    gen = Generator(loaded.model, loaded.tokenizer, compile=args.compile)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(loaded.tokenizer.encode, args.prompt_tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop=[])
    t0 = time.perf_counter()
    gen.generate(ids, GenerationConfig(max_new_tokens=8))  # warm-up (and compilation when --compile)
    warmup_s = time.perf_counter() - t0
    prefill, decode, tokens = [], [], []
    for _ in range(args.repeats):
        res = gen.generate(ids, cfg)
        prefill.append(res.prefill_tokens_per_s)
        decode.append(res.decode_tokens_per_s)
        tokens.append(res.token_ids)
    result = {"load_s": load_s, "warmup_s": warmup_s, "prefill": median(prefill), "decode": median(decode),
              "tokens": tokens[-1], "new_tokens": len(tokens[-1]), "torch": torch.__version__,
              "peak_rss_mb": peak_rss_mb(),
              "n_params": loaded.model.num_params(), "weights": loaded.weights}
    if args.quality:
        quality = json.loads(Path(args.quality).read_text())

        def logits(window: list[int]):  # [T, V] float64
            return loaded.model(torch.tensor([window]))[0].double().numpy()

        with torch.inference_mode():
            result["perplexity"] = {name: window_perplexity(ids, logits) for name, ids in quality["ppl"].items()}
            chat = GenerationConfig(max_new_tokens=quality["chat_tokens"], temperature=0.0)
            result["chat"] = [gen.generate(ids, chat).token_ids for ids in quality["chat"]]
    return result


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM of its memory map. getrusage's ru_maxrss is not: Linux carries the
    forking parent's high-water mark across exec, so every child reported the parent's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def window_perplexity(ids: list[int], logits_fn, window: int = 512, stride: int = 256) -> float:
    """exp(mean NLL) of ids[1:] over windows of `window` tokens moved by `stride`; each token is scored once,
    with the longest context a window gives it. `logits_fn(window_ids)` -> [T, V] logits."""
    import numpy as np
    nll, count, scored, start = 0.0, 0, 1, 0  # `scored`: the next token index to score
    while scored < len(ids):
        end = min(start + window, len(ids))
        logits = np.asarray(logits_fn(ids[start:end]), dtype=np.float64)  # [T, V]
        logits = logits - logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = np.arange(max(scored, start + 1), end)  # token positions scored in this window
        nll -= float(logp[targets - start - 1, np.asarray(ids)[targets]].sum())
        count += len(targets)
        scored, start = end, start + stride
    return math.exp(nll / count)


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
    result = {"load_s": load_s, "prefill": median(prefill), "decode": median(decode), "tokens": tokens[-1],
              "new_tokens": len(tokens[-1]), "peak_rss_mb": peak_rss_mb()}
    if args.quality:
        quality = json.loads(Path(args.quality).read_text())
        stops = set(quality["stop"])
        result["chat"] = [llama_greedy(llm, ids, quality["chat_tokens"], stops) for ids in quality["chat"]]
        del llm
        scorer = Llama(model_path=str(resolve(args.model)), n_ctx=2048, n_threads=args.threads, logits_all=True,
                       verbose=False)

        def logits(window: list[int]):
            scorer.reset()
            scorer.eval(window)
            return scorer.scores[:len(window)]

        result["perplexity"] = {name: window_perplexity(ids, logits) for name, ids in quality["ppl"].items()}
    return result


def llama_greedy(llm, ids: list[int], n: int, stops: set[int]) -> list[int]:
    """Greedy tokens after `ids`, up to n, ending with the stop token as lmstack's Generator does."""
    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    while len(new) < n:
        token = llm.sample(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        new.append(token)
        if token in stops:
            break
        llm.eval([token])
    return new


ENGINES = {"lmstack": run_lmstack, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def child(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    result = ENGINES[args.engine](args)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print("RESULT " + json.dumps(result))


def spawn(args: argparse.Namespace, engine: str, dtype: str, compile: bool = False,
          model: str | None = None, quant: str = "dequantize", quality: Path | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--dtype", dtype, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--model", model or args.model, "--quant", quant]
    cmd += (["--compile"] if compile else []) + (["--quality", str(quality)] if quality else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{engine} {dtype} {quant} {model or ''}: skipped ({tail})", file=sys.stderr)
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
    parser.add_argument("--tables", nargs="+", choices=("speed", "quant"), default=["speed", "quant"])
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of each text scored for perplexity")
    parser.add_argument("--chat-prompts", type=int, default=32)
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--quant", default="dequantize", help="(child) load_model's GGUF quant mode")
    parser.add_argument("--quality", help="(child) the token ids to score, written by the parent")
    parser.add_argument("--rows", nargs="+", default=[], help="quant table: only the rows whose names contain one "
                        "of these (the fp32 reference always runs)")
    parser.add_argument("--rounds", type=int, default=1, help="quant table: run every row's speed child this many "
                        "times in turn and report medians (the first round also measures quality)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    ensure_llama_cpp()
    if "speed" in args.tables:
        speed_table(args)
    if "quant" in args.tables:
        quant_table(args)


def ensure_llama_cpp() -> None:
    """Install llama-cpp-python from the wheel cached under .venv/wheels when it is missing."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    wheels = Path(sys.prefix) / "wheels"
    found = sorted(wheels.glob("llama_cpp_python-0.3.36-*.whl")) if wheels.exists() else []
    if not found:
        print(f"llama-cpp-python missing and no wheel under {wheels}: the llama.cpp rows are skipped "
              f"(build one with `pip wheel llama-cpp-python==0.3.36 -w {wheels}`)", file=sys.stderr)
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--find-links", str(wheels), str(found[-1])],
                   check=False)


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def speed_table(args: argparse.Namespace) -> None:
    native = Path("runs/bench/smollm2-native-bf16")  # the same weights, converted once: load time from our format
    if not (native / "lmstack.json").exists():
        from lmstack.checkpoints import convert
        convert(args.model, str(native), to="native", dtype="bfloat16")
    rows = [("transformers fp32", spawn(args, "transformers", "float32")),
            ("transformers bf16", spawn(args, "transformers", "bfloat16")),
            ("lmstack fp32", spawn(args, "lmstack", "float32")),
            ("lmstack bf16", spawn(args, "lmstack", "bfloat16")),
            ("lmstack default (--dtype auto: the GGUF's Q4 kept as int4, bf16 head)",
             spawn(args, "lmstack", "auto", quant="auto"))]
    warm_page_cache(native / "model.safetensors")  # read just before its row: as warm as the GGUF the others read
    rows.append(("lmstack bf16, native checkpoint", spawn(args, "lmstack", "bfloat16", model=str(native))))
    if not args.no_compile_row:
        rows.append(("lmstack bf16 + compile", spawn(args, "lmstack", "bfloat16", compile=True)))
    rows.append(("llama.cpp Q4_1", spawn(args, "llama.cpp", "q4_1")))
    ref = dict(rows)["transformers bf16"]
    same = ""
    if ref and dict(rows).get("lmstack bf16"):
        same = ("identical" if dict(rows)["lmstack bf16"]["tokens"] == ref["tokens"] else "different")
    fp32 = dict(rows)["lmstack fp32"]
    table = ["| engine | load s | peak RSS MB | prefill tok/s | decode tok/s | prefill × tf-bf16 | decode × tf-bf16 "
             "| decode × lmstack fp32 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if r is None:
            table.append(f"| {name} | not installed / failed | | | | | | |")
            continue
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}") if ref else (lambda k: "")
        vs_fp32 = f"{r['decode'] / fp32['decode']:.2f}" if fp32 else ""
        table.append(f"| {name} | {r['load_s']:.2f} | {r['peak_rss_mb']:,.0f} | {r['prefill']:,.0f} | "
                     f"{r['decode']:,.1f} | {ratio('prefill')} | {ratio('decode')} | {vs_fp32} |")
    body = "\n".join(table) + (f"\n\n{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, "
                               f"{args.threads} threads, medians of {args.repeats} runs. Greedy tokens of lmstack bf16 "
                               f"vs transformers bf16: {same or 'n/a'}.")
    print(body)
    record("Generation: SmolLM2-135M on CPU", body, "python bench/generate.py " + " ".join(sys.argv[1:]))


def quality_inputs(args: argparse.Namespace, path: Path) -> Path:
    """Token ids every engine scores: the perplexity texts and the chat prompts (self-instruct, chat template
    applied), with the stop tokens. Written once, so tokenization is the same for all."""
    from lmstack.checkpoints import load_model
    tok = load_model(args.model, dtype="bfloat16").tokenizer
    root = data_root()
    notes = "\n\n".join(f.read_text() for f in sorted((root / "course-notes").glob("*.txt")))
    texts = {"tinyshakespeare": PROMPT_TEXT.read_text()[-200_000:], "course-notes": notes}
    ppl = {name: tok.encode(text, add_special_tokens=False)[: args.ppl_tokens] for name, text in texts.items()}
    tasks = [json.loads(line) for line in (root / "self-instruct" / "seed_tasks.jsonl").read_text().splitlines()]
    questions = [t["instruction"] for t in tasks if not t["instances"][0]["input"]][: args.chat_prompts]
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in questions]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ppl": ppl, "chat": chat, "chat_tokens": args.chat_tokens,
                                "stop": sorted(tok.stop_token_ids)}))
    return path


CHECKPOINTS = {"keep": "smollm2-native-keep", "keep-int8": "smollm2-native-keep-int8", "int4-g32": "smollm2-int4-g32",
               "int8": "smollm2-int8", "w8a8": "smollm2-w8a8"}  # quant mode or scheme -> folder under runs/bench


def quantized_checkpoints(args: argparse.Namespace, used: set[str]) -> None:
    """The native checkpoints of the rows that run (`used`: their model paths), made once under runs/bench (not
    timed)."""
    from lmstack.checkpoints import convert
    from lmstack.compression.quantize import quantize
    for mode, folder in CHECKPOINTS.items():
        path = Path("runs/bench") / folder
        if str(path) not in used or (path / "lmstack.json").exists():
            continue
        if mode.startswith("keep"):
            convert(args.model, str(path), to="native", dtype="bfloat16", quant=mode)
        else:
            quantize(model=args.model, scheme=mode, out=str(path), eval_chars=0, decode_tokens=0, compare=False)


def file_bytes(path: Path) -> int:
    from lmstack.checkpoints import resolve
    path = resolve(str(path)) if not path.exists() else path
    return (path / "model.safetensors").stat().st_size if path.is_dir() else path.stat().st_size


def same_answer(a: list[int], b: list[int], stops: set[int]) -> bool:
    strip = lambda t: t[:-1] if t and t[-1] in stops else t  # noqa: E731
    return strip(a) == strip(b)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two answers share before they first differ (a softer agreement than equality:
    one bf16 rounding flip early in an answer changes everything after it)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


DEFAULT_ROW = "lmstack default (--dtype auto), loaded from the .gguf"
COMPILED_ROW = "lmstack default (--dtype auto) + --compile (torch.compile with the C++ wrapper)"
BLOCKS_ROW = "lmstack --quant blocks (the GGUF's Q4_1 / Q8_0 blocks, lmstack's kernel)"
BLOCKS_COMPILED_ROW = BLOCKS_ROW + " + --compile"
COMPILED_ROWS = (COMPILED_ROW, BLOCKS_COMPILED_ROW)
LLAMA_ROW = "llama.cpp Q4_1 (same GGUF)"


def speed_rounds(args: argparse.Namespace, specs: list[tuple[str, str, str, str, str]],
                 rows: list[tuple[str, Path, dict | None]]) -> dict[str, float]:
    """--rounds N: N - 1 more speed-only child runs of every row but the fp32 reference, in turn; each row's
    load, peak RSS, prefill and decode become the medians over all rounds (in place), and -> each row's median
    decode ratio to the llama.cpp child of the same round."""
    if args.rounds <= 1:
        return {}
    results = {name: [r] for name, _, r in rows[1:] if r is not None}
    for _ in range(args.rounds - 1):
        for name, engine, dtype, model, quant in specs[1:]:
            if name in results:
                r = spawn(args, engine, dtype, model=model, quant=quant, compile=name in COMPILED_ROWS)
                results[name].append(r)
    for name, _, r in rows[1:]:
        if name in results:
            runs = [x for x in results[name] if x is not None]
            for key in ("load_s", "peak_rss_mb", "prefill", "decode"):
                r[key] = median([x[key] for x in runs])
    if LLAMA_ROW not in results:
        return {}
    return {name: median([a["decode"] / b["decode"] for a, b in zip(runs, results[LLAMA_ROW])
                          if a is not None and b is not None]) for name, runs in results.items()}


def quant_table(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import resolve
    quality = quality_inputs(args, Path("runs/bench/quality_ids.json"))
    stops = set(json.loads(quality.read_text())["stop"])
    ckpt = {mode: Path("runs/bench") / folder for mode, folder in CHECKPOINTS.items()}
    gguf = resolve(args.model)
    specs = [  # name, engine, dtype, model, quant
        ("lmstack fp32 (GGUF dequantized: the reference)", "lmstack", "float32", str(gguf), "dequantize"),
        ("lmstack bf16", "lmstack", "bfloat16", str(gguf), "dequantize"),
        (DEFAULT_ROW, "lmstack", "auto", str(gguf), "auto"),
        (COMPILED_ROW, "lmstack", "auto", str(gguf), "auto"),
        (BLOCKS_ROW, "lmstack", "float32", str(gguf), "blocks"),
        (BLOCKS_COMPILED_ROW, "lmstack", "float32", str(gguf), "blocks"),
        ("lmstack int4 kept from the GGUF (int4 head), loaded from the .gguf", "lmstack", "bfloat16", str(gguf),
         "keep"),
        ("lmstack int4 kept from the GGUF (int4 head), native", "lmstack", "bfloat16", str(ckpt["keep"]),
         "dequantize"),
        ("lmstack int4 kept from the GGUF (int8 head), native", "lmstack", "bfloat16", str(ckpt["keep-int8"]),
         "dequantize"),
        ("lmstack quantize int4-g32 (from bf16)", "lmstack", "bfloat16", str(ckpt["int4-g32"]), "dequantize"),
        ("lmstack quantize int8", "lmstack", "bfloat16", str(ckpt["int8"]), "dequantize"),
        ("lmstack quantize w8a8", "lmstack", "bfloat16", str(ckpt["w8a8"]), "dequantize"),
        (LLAMA_ROW, "llama.cpp", "q4_1", str(gguf), "dequantize"),
    ]
    # --rows: a subset by name (the fp32 reference, which agreement is measured against, always runs)
    specs = [spec for i, spec in enumerate(specs) if i == 0 or not args.rows or any(r in spec[0] for r in args.rows)]
    quantized_checkpoints(args, {model for _, _, _, model, _ in specs})
    rows = [(name, Path(model), spawn(args, engine, dtype, model=model, quant=quant, quality=quality,
                                      compile=name in COMPILED_ROWS))
            for name, engine, dtype, model, quant in specs]
    ratios = speed_rounds(args, specs, rows)
    ref = rows[0][2]
    llama = dict((name, r) for name, _, r in rows).get(LLAMA_ROW)
    n_params = ref["n_params"] if ref else None
    table = ["| engine / scheme | bytes per weight | file MB | load s | first 8 tokens s | peak RSS MB | prefill tok/s "
             "| decode tok/s "
             f"| decode × llama.cpp | ppl tinyshakespeare | ppl course notes "
             f"| same {args.chat_tokens} greedy tokens as fp32 | tokens before the first difference (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, model, r in rows:
        if r is None:
            table.append(f"| {name} | failed or not installed | | | | | | | | | | | |")
            continue
        shown = name.replace("--dtype auto", f"--dtype auto: {r.get('weights')}")  # what auto resolved to here
        size = file_bytes(model)
        per_weight = f"{size / n_params:.2f}" if n_params else ""
        vs = f"{ratios[name]:.2f}" if name in ratios else f"{r['decode'] / llama['decode']:.2f}" if llama else ""
        ppl = [f"{r['perplexity'][k]:.3f}" if "perplexity" in r else "" for k in ("tinyshakespeare", "course-notes")]
        agree = prefix = ""
        if ref and "chat" in r:
            same = sum(same_answer(a, b, stops) for a, b in zip(r["chat"], ref["chat"]))
            agree = f"{same}/{len(ref['chat'])}"
            prefix = f"{sum(common_prefix(a, b) for a, b in zip(r['chat'], ref['chat'])) / len(ref['chat']):.1f}"
        warmup = f"{r['warmup_s']:.2f}" if "warmup_s" in r else "-"
        table.append(f"| {shown} | {per_weight} | {size / 1e6:.1f} | {r['load_s']:.2f} | {warmup} | "
                     f"{r['peak_rss_mb']:,.0f} | "
                     f"{r['prefill']:,.0f} | {r['decode']:,.1f} | {vs} | {ppl[0]} | {ppl[1]} | {agree} | {prefix} |")
    body = "\n".join(table) + (
        f"\n\n{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, {args.threads} threads, medians "
        f"of {args.repeats} runs" + (
            f"; load, peak RSS, prefill and decode: medians over {args.rounds} rounds of every row's child process, "
            "run in turn, "
            "and decode x llama.cpp the median of each round's ratio (the machine's speed drifts between "
            "processes)" if args.rounds > 1 else "")
        + f". Bytes per weight: file bytes / {n_params or 0:,} weights (fp32 row: the GGUF file). "
        f"Perplexity: the first {args.ppl_tokens} tokens of each text, windows of 512, stride 256. Agreement: "
        f"{args.chat_prompts} self-instruct chat prompts, {args.chat_tokens} greedy tokens. Targets (issue 14): "
        "decode >= 1.0x llama.cpp, load <= 1 s, RSS <= 1.3x llama.cpp's, agreement >= 90%, perplexity within 1% "
        "(int8) / 5% of bf16 (int4).")
    print(body)
    title = "Quantized generation: SmolLM2-135M on CPU, lmstack vs llama.cpp"
    record(title + (f" (rows: {', '.join(args.rows)})" if args.rows else ""), body,
           "python bench/generate.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
