"""`lmstack quantize`: calibration-free post-training quantization of a model into a packed native checkpoint.

The model is loaded in bf16, fused (q|k|v, gate|up) and quantized in place with `quant.quantize_`; the packed
tensors go to model.safetensors with the scheme in the metadata (`quant.state`), never in a file name. The
verb then reloads the written checkpoint and reports bytes on disk, perplexity on held-out text (the tail of
tinyshakespeare, scored with evaluation.scoring's strided windows) and greedy decode tok/s, next to the source
model's.

Until the native loader learns quantized checkpoints, `load_quantized` here rebuilds one: config from
lmstack.json, a meta skeleton, `quant.state.rebuild_quantized_` over the memory-mapped safetensors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import config_from_dict, config_to_dict
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json
from lmstack.quant.quantize import LayerChoice, check_scheme, fuse_projections_, quantize_
from lmstack.quant.state import METADATA_KEY, quantized_state_dict, rebuild_quantized_
from lmstack.tokenizer import Tokenizer


NATIVE_FORMAT = "lmstack-native-v1"  # the native checkpoint's format tag (checkpoints/), with quantization metadata
HELD_OUT_CHARS = 20_000  # the tail of tinyshakespeare scored for perplexity


def save_quantized(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors (packed tensors; the quantization metadata in its header), lmstack.json (config +
    metadata, with "quantization") and the tokenizer, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, meta = quantized_state_dict(model)
    state = {k: v.cpu() for k, v in state.items()}
    header = {"format": NATIVE_FORMAT, METADATA_KEY: json.dumps(meta)}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=header))
    if tokenizer is not None:
        tokenizer.save(out)
    atomic_write_json(out / "lmstack.json", {"format": NATIVE_FORMAT, "config": config_to_dict(model.config),
                                             "metadata": {**(extra or {}), "quantization": meta}})
    return out


def load_quantized(path: str | Path) -> tuple[nn.Module, Tokenizer | None]:
    """Rebuild a quantized native checkpoint: the packed tensors are adopted, never requantized."""
    from lmstack.checkpoints import skip_init
    from lmstack.models import build_model
    path = Path(path)
    info = read_json(path / "lmstack.json")
    meta = info.get("metadata", {}).get("quantization")
    if info.get("format") != NATIVE_FORMAT or meta is None:
        raise LmstackError(f"{path / 'lmstack.json'}: not a quantized lmstack checkpoint")
    config = config_from_dict(info["config"])
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise LmstackError(f"{path / 'model.safetensors'}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    with torch.device("meta"), skip_init():  # wiring: the loader's own skeleton builder replaces this
        model = build_model(config)
    rebuild_quantized_(model, state, meta)
    model.reset_buffers()
    return model.eval(), (Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None)


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


def quantize(*, model: str, scheme: str, out: str, embedding_scheme: str | None = None, fuse: bool = True,
             eval_text: str | None = None,
             eval_chars: int = HELD_OUT_CHARS, window: int = 512, decode_tokens: int = 64,
             compare: bool = True) -> dict[str, Any]:
    """Quantize a model without calibration data and write a packed native checkpoint.

    Args:
        model: a model name or path (anything `lmstack generate` loads).
        scheme: int4-g32, int4-g64, int4-g128, int8 (weight-only), w8a8 or nf4.
        out: the output folder.
        embedding_scheme: the token embedding's (and tied head's) scheme; default: scheme. int8 keeps SmolLM2's
            greedy answers where an int4 head changes some.
        fuse: fuse q|k|v and gate|up into one matmul each before quantizing (inference only).
        eval_text: a text file for held-out perplexity (default: the last eval_chars of tinyshakespeare).
        eval_chars: how many characters from the end of the text to score (0 skips the perplexity).
        window: perplexity window in tokens (stride half of it).
        decode_tokens: greedy tokens for the decode tok/s figure (0 skips it).
        compare: measure the source model too (perplexity and decode tok/s).

    Returns:
        A report: bytes on disk, perplexity and decode tok/s of the quantized and source models, fallbacks.
    """
    from lmstack.checkpoints import load_model
    check_scheme(scheme)
    check_scheme(embedding_scheme or scheme)
    loaded = load_model(model, dtype=torch.bfloat16)
    source, tokenizer = loaded.model, loaded.tokenizer
    text = _held_out(eval_text, eval_chars) if eval_chars and tokenizer is not None else None
    report: dict[str, Any] = {"model": model, "scheme": scheme, "out": str(out)}
    if compare and tokenizer is not None:
        report["source"] = _measure(source, tokenizer, text, window, decode_tokens)
        report["source"]["bytes"] = _source_bytes(loaded.source)
    qmodel = source  # measured above; quantized in place from here on (no second copy in memory)
    if fuse:
        fuse_projections_(qmodel)
    choices: list[LayerChoice] = quantize_(qmodel, scheme, embedding_scheme=embedding_scheme)
    t0 = time.perf_counter()
    path = save_quantized(qmodel, tokenizer, out, {"source": loaded.source, "scheme": scheme,
                                                          "embedding_scheme": embedding_scheme or scheme})
    report["save_s"] = round(time.perf_counter() - t0, 3)
    del qmodel, source, loaded
    t0 = time.perf_counter()
    reloaded, tokenizer = load_quantized(path)
    report["load_s"] = round(time.perf_counter() - t0, 3)
    report["bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.name == "model.safetensors")
    report["fallbacks"] = [vars(c) for c in choices if c.used != c.scheme]
    if tokenizer is not None:
        report["quantized"] = _measure(reloaded, tokenizer, text, window, decode_tokens)
    _print(report)
    return report


def _held_out(path: str | None, chars: int) -> str:
    if path is None:
        from lmstack.runconfig import data_root
        file = data_root() / "tinyshakespeare" / "input.txt"
    else:
        file = Path(path)
    if not file.exists():
        raise LmstackError(f"held-out text not found: {file} (pass eval_text, or eval_chars=0 to skip)")
    return file.read_text(encoding="utf-8")[-chars:]


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
            print(f"  {name:9s} " + ", ".join(p for p in parts if p))


