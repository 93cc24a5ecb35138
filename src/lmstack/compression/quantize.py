"""`lmstack quantize`: post-training quantization of a model into a packed native checkpoint.

The model is loaded in bf16, fused (q|k|v, gate|up) and quantized in place with `quant.quantize_` (round to
nearest), its int4 blocks first calibrated with GPTQ (`quant.gptq`) when `calibrate` tokens are given; the packed
tensors go to model.safetensors with the scheme in the metadata (`quant.state`), never in a file name. The
verb then reloads the written checkpoint and reports bytes on disk, perplexity on held-out text (the tail of
tinyshakespeare, scored with evaluation.scoring's strided windows) and greedy decode tok/s, next to the source
model's.

The checkpoint is the native one (`checkpoints.save_native`), and `checkpoints.load_model` reads it back: the
one loader rebuilds the quantized modules from lmstack.json's metadata and adopts the memory-mapped packed tensors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.quant.gptq import gptq_
from lmstack.quant.quantize import LayerChoice, check_scheme, fuse_projections_, quantize_
from lmstack.tokenizer import Tokenizer


HELD_OUT_CHARS = 20_000  # the tail of tinyshakespeare scored for perplexity


def held_out_perplexity(model: nn.Module, tokenizer: Tokenizer, text: str, window: int = 512) -> float:
    """Perplexity of `text` with strided windows of `window` tokens (half-window stride)."""
    from lmstack.evaluation.scoring import Scorer, perplexity_windows, window_perplexity
    windows = perplexity_windows(tokenizer.encode(text, add_special_tokens=False), window, window // 2)
    scores = Scorer(model, tokenizer, batch_size=4, progress=False).score(
        [(w.context, w.continuation) for w in windows])
    return window_perplexity(windows, scores)[0]


def decode_speed(model: nn.Module, tokenizer: Tokenizer, tokens: int, prompt: str = "The quick brown fox") -> float:
    """Greedy decode tok/s for `tokens` new tokens after a short prompt."""
    from lmstack.generation import GenerationConfig, Generator
    result = Generator(model, tokenizer).generate(prompt, GenerationConfig(max_new_tokens=tokens))
    return result.decode_tokens_per_s


Scheme = Literal["int4-g32", "int4-g64", "int4-g128", "int8", "w8a8", "nf4"]  # quant.quantize.SCHEMES


def quantize(*, model: str, scheme: Scheme, out: str, embedding_scheme: Scheme | None = None, fuse: bool = True,
             calibrate: int = 0, calibration_text: str | None = None, eval_text: str | None = None,
             eval_chars: int = HELD_OUT_CHARS, window: int = 512, decode_tokens: int = 64,
             compare: bool = True) -> dict[str, Any]:
    """Quantize a model (round to nearest, or GPTQ with `calibrate`) and write a packed native checkpoint; print
    (and return) its bytes on disk, held-out perplexity and decode tok/s next to the source model's, and any
    per-layer fallbacks.

    Args:
        model: a model name or path (anything `lmstack generate` loads).
        scheme: int4-g32, int4-g64, int4-g128, int8 (weight-only), w8a8 or nf4.
        out: the output folder.
        embedding_scheme: the token embedding's (and tied head's) scheme; default: scheme. int8 keeps SmolLM2's
            greedy answers where an int4 head changes some.
        fuse: fuse q|k|v and gate|up into one matmul each before quantizing (inference only).
        calibrate: GPTQ the blocks' int4 weights on this many tokens of calibration text, in windows of
            `window` tokens (0: round to nearest, no calibration). Int4 schemes only.
        calibration_text: a text file for calibration (default: the start of tinyshakespeare; the held-out
            perplexity reads its end).
        eval_text: a text file for held-out perplexity (default: the last eval_chars of tinyshakespeare).
        eval_chars: how many characters from the end of the text to score (0 skips the perplexity).
        window: perplexity window in tokens (stride half of it).
        decode_tokens: greedy tokens for the decode tok/s figure (0 skips it).
        compare: measure the source model too (perplexity and decode tok/s).
    """
    from lmstack.checkpoints import load_model, save_native
    check_scheme(scheme)
    check_scheme(embedding_scheme or scheme)
    if calibrate < 0 or (calibrate and not scheme.startswith("int4-g")):
        raise LmstackError(f"calibrate must be >= 0, and calibrates the int4 schemes only (scheme {scheme})")
    loaded = load_model(model, dtype=torch.bfloat16)
    source, tokenizer = loaded.model, loaded.tokenizer
    text = _held_out(eval_text, eval_chars) if eval_chars and tokenizer is not None else None
    if calibrate and tokenizer is None:
        raise LmstackError(f"{model}: calibration needs the model's tokenizer")
    calibration = _calibration_ids(tokenizer, calibration_text, calibrate, window) if calibrate else None
    report: dict[str, Any] = {"model": model, "scheme": scheme, "out": str(out)}
    if compare and tokenizer is not None:
        report["source"] = _measure(source, tokenizer, text, window, decode_tokens)
        report["source"]["bytes"] = _source_bytes(loaded.source)
    qmodel = source  # measured above; quantized in place from here on (no second copy in memory)
    if fuse:
        fuse_projections_(qmodel)
    choices: list[LayerChoice] = []
    if calibration is not None:
        t0 = time.perf_counter()
        choices += gptq_(qmodel, calibration, scheme)
        report["calibrate_s"] = round(time.perf_counter() - t0, 3)
    choices += quantize_(qmodel, scheme, embedding_scheme=embedding_scheme)
    t0 = time.perf_counter()
    path = save_native(qmodel, tokenizer, out, metadata={"source": loaded.source, "scheme": scheme,
                                                         "embedding_scheme": embedding_scheme or scheme,
                                                         "calibration": f"gptq, {calibrate} tokens" if calibrate
                                                         else "none (round to nearest)"})
    report["save_s"] = round(time.perf_counter() - t0, 3)
    del qmodel, source, loaded
    t0 = time.perf_counter()
    reloaded_model = load_model(str(path), dtype=torch.bfloat16)
    reloaded, tokenizer = reloaded_model.model, reloaded_model.tokenizer
    report["load_s"] = round(time.perf_counter() - t0, 3)
    report["bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.name == "model.safetensors")
    report["fallbacks"] = [vars(c) for c in choices if c.used != c.scheme]
    if tokenizer is not None:
        report["quantized"] = _measure(reloaded, tokenizer, text, window, decode_tokens)
    _print(report)
    return report


def _text_file(path: str | None, what: str) -> str:
    if path is None:
        from lmstack.runconfig import data_root
        file = data_root() / "tinyshakespeare" / "input.txt"
    else:
        file = Path(path)
    if not file.exists():
        raise LmstackError(f"{what} not found: {file}")
    return file.read_text(encoding="utf-8")


def _held_out(path: str | None, chars: int) -> str:
    return _text_file(path, "held-out text (pass eval_text, or eval_chars=0 to skip)")[-chars:]


def _calibration_ids(tokenizer: Tokenizer, path: str | None, tokens: int, window: int) -> torch.Tensor:
    """The first `tokens` tokens of the calibration text as rows of `window` tokens ([B, window]; one shorter row
    when tokens < window)."""
    text = _text_file(path, "calibration text")
    ids = tokenizer.encode(text[:tokens * 16], add_special_tokens=False)[:tokens]  # ~4 characters a token
    if len(ids) < tokens:
        raise LmstackError(f"the calibration text has {len(ids)} tokens, fewer than calibrate={tokens}")
    width = min(window, tokens)
    return torch.tensor(ids[:tokens // width * width]).view(-1, width)


def _measure(model: nn.Module, tokenizer: Tokenizer, text: str | None, window: int, tokens: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with torch.inference_mode():
        if text:
            result["perplexity"] = round(held_out_perplexity(model, tokenizer, text, window), 4)
        if tokens:
            result["decode_tok_s"] = round(decode_speed(model, tokenizer, tokens), 2)
    return result


def _source_bytes(source: str) -> int:
    path = Path(source)
    return sum(f.stat().st_size for f in (path.iterdir() if path.is_dir() else [path])
               if f.suffix in (".safetensors", ".gguf", ".bin", ".pt"))


def _print(report: dict[str, Any]) -> None:
    print(f"wrote {report['out']} ({report['scheme']}): {report['bytes'] / 1e6:.1f} MB on disk, "
          f"loads in {report['load_s']:.2f} s")
    for fb in report["fallbacks"]:
        print(f"  fallback: {fb['name']} -> {fb['used']} ({fb['reason']})")
    for name in ("source", "quantized"):
        if name in report:
            r = report[name]
            parts = [f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else "",
                     f"perplexity {r['perplexity']:.3f}" if "perplexity" in r else "",
                     f"decode {r['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in r else ""]
            if any(parts):
                print(f"  {name:9s} " + ", ".join(p for p in parts if p))


