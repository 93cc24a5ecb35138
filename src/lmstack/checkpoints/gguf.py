"""GGUF import: llama.cpp's single-file format -> a DecoderConfig, an fp32 state dict and a Tokenizer.

The container is parsed here, over a memory map, rather than with `gguf.GGUFReader`: the reader builds a numpy
view per array element and takes over 2 s on SmolLM2's 49k-token vocabulary, where this parser takes ~0.1 s.
The `gguf` package still supplies the constants and dequantizes every type we have no kernel for here; the
tests check this parser and our kernels against `GGUFReader` and `gguf.quants.dequantize` (bit-exact).

Layout facts used below:
- a tensor's dims are stored in ggml order (ne0 = the contiguous row length first), so the PyTorch shape is the
  reverse; quantized rows are `ne0 / block_size` blocks of `type_size` bytes.
- llama.cpp's converter permutes the rows of attn_q / attn_k so that its RoPE can rotate adjacent pairs;
  `unpermute_qk` restores the HF rotate-half order that `models.blocks.apply_rope` uses.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor

from lmstack.config import DecoderConfig
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "gpt2")
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ------------------------------------------------------------------------------------- container


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (reversed ggml dims)
    qtype: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # strings, numbers, bools, lists of str, numpy arrays for numeric arrays
    tensors: list[GGUFTensor]
    buffer: mmap.mmap  # copy-on-write map of the whole file; tensors index into it

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes, a uint8 array that shares memory with the map."""
        return np.frombuffer(self.buffer, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)


# value type -> (struct format, numpy dtype); 7 = BOOL, 8 = STRING, 9 = ARRAY are handled apart
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class _Corrupt(Exception):
    """Raised while parsing; `read_gguf` turns it into one LmstackError naming the file."""


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Corrupt(f"unexpected end of file at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > self.size:
            raise _Corrupt(f"string of {n} bytes at byte {self.pos} runs past the end of the file")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        # The hot loop of the whole import (49k tokens + 49k merges): keep it to slicing and decoding.
        buf, pos, out, unpack_from = self.buf, self.pos, [], struct.unpack_from
        for _ in range(count):
            (n,) = unpack_from("<Q", buf, pos)
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
            if pos > self.size:
                raise _Corrupt("string array runs past the end of the file")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return self.strings(count)
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1])
                if self.pos + count * dtype.itemsize > self.size:
                    raise _Corrupt(f"array of {count} values runs past the end of the file")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr.astype(bool) if etype == _BOOL else arr
            if etype == _ARRAY:  # nested arrays are rare (none in llama.cpp's keys); read them element-wise
                return [self.value(_ARRAY) for _ in range(count)]
            raise _Corrupt(f"unknown array element type {etype}")
        if vtype in _SCALARS:
            value = self.unpack(_SCALARS[vtype][0])
            return bool(value) if vtype == _BOOL else value
        raise _Corrupt(f"unknown metadata value type {vtype} at byte {self.pos - 4}")


MADV_PAGEOUT = 21  # Linux 5.4+ (uapi mman-common.h); Python's mmap module names it from 3.13 only


def release_pages(tensor: Tensor) -> None:
    """Drop the whole pages inside `tensor`'s memory from this process's resident set (madvise MADV_PAGEOUT).

    For the blocks of a memory-mapped GGUF once they have been copied (fused projections), which would otherwise
    stay resident next to their copy. Never loses data: a page touched again is read back from the file (or
    swap). Best effort: a no-op off Linux, on older kernels, for files this user could not write, and for
    anonymous memory without swap."""
    if sys.platform != "linux" or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    first = tensor.data_ptr()
    start = -(-first // page) * page  # whole pages only: the neighbours' bytes stay resident
    end = (first + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF file; tensor data stays in the memory map."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"GGUF file not found: {path}")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, the file is never changed
        except ValueError:  # an empty file cannot be mapped
            raise LmstackError(f"{path}: not a GGUF file (empty)") from None
    cur = _Cursor(buf)
    try:
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            raise LmstackError(f"{path}: not a GGUF file (bad magic {magic!r})")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise LmstackError(f"{path}: unsupported GGUF version {version}{hint}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > cur.size or n_kv > cur.size:
            raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dims")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise _Corrupt(f"general.alignment is {alignment}")
        data_start = -(-cur.pos // alignment) * alignment
        tensors = []
        for name, dims, qtype, offset in infos:
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except ValueError:
                raise _Corrupt(f"tensor {name!r} has unknown type {qtype}") from None
            if dims and dims[0] % block_size:
                raise _Corrupt(f"tensor {name!r}: row of {dims[0]} is not a multiple of block size {block_size}")
            n_bytes = int(np.prod(dims, dtype=np.float64)) // block_size * type_size
            start = data_start + offset
            if start + n_bytes > cur.size:
                raise _Corrupt(f"tensor {name!r} ends at byte {start + n_bytes}, the file has {cur.size} "
                               f"(truncated?)")
            tensors.append(GGUFTensor(name, tuple(reversed(dims)), qtype, start, n_bytes))
    except (_Corrupt, struct.error, RecursionError) as e:  # struct.error: a read ran past the end of the file
        raise LmstackError(f"{path}: corrupt or truncated GGUF file ({e})") from None
    return GGUFFile(path, version, metadata, tensors, buf)


# -------------------------------------------------------------------------------- dequantization
# Vectorized numpy versions of ggml's reference dequantizers (ggml-quants.c), block by block:
# blocks [N, type_size] uint8 -> values [N, block_size] float32, with the bit layouts of gguf/quants.py.
# numpy rather than torch: these are cheap element-wise passes, and torch's OpenMP threads slow them down
# 20-40x on a busy 2-core machine, where numpy stays at ~3 ms per million weights.


def _f16(b: np.ndarray) -> np.ndarray:  # [N, 2] uint8 -> [N, 1] float32
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [..., k] uint8 -> [..., 2k] float32: all low nibbles, then all high
    k = qs.shape[-1]
    out = np.empty((*qs.shape[:-1], 2 * k), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[..., :k], casting="unsafe")
    np.right_shift(qs, 4, out=out[..., k:], casting="unsafe")
    return out


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:])
    q -= 8
    q *= _f16(b[:, :2])
    return q


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:])
    q *= _f16(b[:, :2])
    q += _f16(b[:, 2:4])
    return q


def _q5(b: np.ndarray, qh: slice, qs: slice) -> np.ndarray:  # 5-bit values: a nibble plus one bit of qh
    q = _nibbles(b[:, qs])
    q += np.unpackbits(b[:, qh], axis=-1, bitorder="little").astype(np.float32) * 16
    return q


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _q5(b, slice(2, 6), slice(6, None))
    q -= 16
    q *= _f16(b[:, :2])
    return q


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _q5(b, slice(4, 8), slice(8, None))
    q *= _f16(b[:, :2])
    q += _f16(b[:, 2:4])
    return q


def _q8_0(b: np.ndarray) -> np.ndarray:
    q = b[:, 2:].view(np.int8).astype(np.float32)
    q *= _f16(b[:, :2])
    return q


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)  # [N, 8] each


def _q4_k(b: np.ndarray) -> np.ndarray:  # 144 bytes: d, dmin, scales[12], qs[128] -> 8 sub-blocks of 32
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q *= (_f16(b[:, :2]) * sc)[..., None]
    q -= (_f16(b[:, 2:4]) * mn)[..., None]
    return q.reshape(n, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:  # 176 bytes: d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q += ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).astype(np.float32) * 16
    q *= (_f16(b[:, :2]) * sc)[..., None]
    q -= (_f16(b[:, 2:4]) * mn)[..., None]
    return q.reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:  # 210 bytes: ql[128], qh[64], scales[16] int8, d -> 16 sub-blocks of 16
    n = b.shape[0]
    q = _nibbles(b[:, :128].reshape(n, 2, 64))  # [N, 2, 128]
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q += qh.reshape(n, 2, 128).astype(np.float32) * 16
    q -= 32
    q = q.reshape(n, 16, 16)
    q *= (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8))[..., None]
    return q.reshape(n, 256)


# ggml type id -> block dequantizer
_KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}
F32, F16, BF16 = 0, 1, 30


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """raw: uint8 bytes of one tensor -> a new float32 array of `shape` (PyTorch order)."""
    if qtype == F32:
        out = raw.view(np.float32).copy()
    elif qtype == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        gtype = GGMLQuantizationType(qtype)
        block_size, type_size = GGML_QUANT_SIZES[gtype]
        if qtype in _KERNELS:
            out = _KERNELS[qtype](raw.reshape(-1, type_size))
        else:  # every other type the gguf package knows (IQ*, TQ*, Q2_K, Q3_K, MXFP4, ...)
            from gguf.quants import dequantize as gguf_dequantize

            try:
                out = gguf_dequantize(raw.reshape(-1, shape[-1] // block_size * type_size), gtype)
            except NotImplementedError:
                raise LmstackError(f"GGUF tensor type {gtype.name} cannot be dequantized (gguf package)") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


# ---------------------------------------------------------------------------------- config + weights


ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def unpermute_qk(w: ArrayT, n_head: int) -> ArrayT:
    """Undo llama.cpp's `permute` of a q or k projection ([n_head * D, C]): interleaved pairs -> halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _get(meta: dict[str, Any], key: str, path: Path, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise LmstackError(f"{path}: GGUF metadata has no {key!r}")
    return default


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def gguf_config(gf: GGUFFile) -> DecoderConfig:
    """DecoderConfig from `{arch}.*` metadata keys (llama.cpp's names, see gguf/constants.py Keys.LLM)."""
    meta, path = gf.metadata, gf.path
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmstackError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = {t.name for t in gf.tensors}
    emb = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise LmstackError(f"{path}: no token_embd.weight tensor")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else emb.shape[0]))
    n_head = int(_get(meta, f"{arch}.attention.head_count", path))
    d_model = int(_get(meta, f"{arch}.embedding_length", path))
    common = dict(
        name=str(meta.get("general.name", path.stem)), vocab_size=vocab,
        n_layer=int(_get(meta, f"{arch}.block_count", path)), n_head=n_head, d_model=d_model,
        d_ff=int(_get(meta, f"{arch}.feed_forward_length", path)),
        max_seq_len=int(_get(meta, f"{arch}.context_length", path)),
        tie_embeddings="output.weight" not in names,
        bos_token_id=_optional_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(meta.get("tokenizer.ggml.eos_token_id")),
        pad_token_id=_optional_int(meta.get("tokenizer.ggml.padding_token_id")))
    if arch == "gpt2":
        return DecoderConfig(**common, positions="learned", norm="layernorm", activation="gelu_tanh",
                             norm_eps=float(meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)))
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_head))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if rope_dims != head_dim or scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise LmstackError(f"{path}: RoPE scaling / partial rotary (type {scaling!r}, {rope_dims} of {head_dim} "
                           f"dims, rope_freqs: {'rope_freqs.weight' in names}) is not supported yet")
    return DecoderConfig(**common, n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)),
                         head_dim=head_dim, positions="rope", rope_base=float(meta.get("llama.rope.freq_base", 1e4)),
                         norm="rmsnorm", norm_eps=float(_get(meta, "llama.attention.layer_norm_rms_epsilon", path)),
                         activation="silu", gated_mlp=True, attn_bias=False, mlp_bias=False)


# GGUF tensor name (after "blk.N.") -> lmstack key (after "layers.N.")
_LLAMA_LAYER = {
    "attn_norm.weight": "attn_norm.weight", "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight", "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight", "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GPT2_LAYER = {
    f"{g}.{p}": f"{l}.{p}" for p in ("weight", "bias") for g, l in (
        ("attn_norm", "attn_norm"), ("attn_output", "attn.o_proj"), ("ffn_norm", "mlp_norm"),
        ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"))
}
_GLOBAL = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
           "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias", "output.weight": "lm_head.weight"}


KEEP_PACKED = ("Q4_0", "Q4_1")  # repacked into Int4Linear's codes as they are (quant/gguf_pack.py)


def gguf_state_dict(gf: GGUFFile, config: DecoderConfig, keep: bool = False, embedding_scheme: str = "int4-g32",
                    dtype: torch.dtype = torch.float32, blocks: bool = False
                    ) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Rename every tensor to lmstack's keys (q/k un-permuted, gpt2 qkv split): (state, quantization metadata).

    Default: every tensor dequantized to fp32 (metadata None). `keep`: llama Q4_0 / Q4_1 linears stay packed
    (the int4 kernel's portable `qweight` + bf16 scales and zeros: codes untouched, q/k rows un-permuted with
    their scales and zeros), and the token embedding (with a tied head, the head too) is stored as
    `embedding_scheme` ("int4-g32", "int8", or "none" for float); the metadata is quant.state's, so the loader
    rebuilds the quantized modules as for a native quantized checkpoint. Float tensors are cast to `dtype` one
    at a time, so a bf16 load never holds the whole model in fp32 (peak memory).
    `blocks`: every Q4_0 / Q4_1 / Q8_0 linear and token embedding keeps the file's own blocks (GGUFLinear, computed
    in float32; q/k rows un-permuted whole), the rest is dequantized to `dtype`; `keep` and `embedding_scheme`
    are then ignored.
    """
    arch = gf.metadata["general.architecture"]
    layer_map = _LLAMA_LAYER if arch == "llama" else _GPT2_LAYER
    state: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    keep = keep and arch == "llama"  # gpt2's fused qkv GGUFs dequantize (no packed split written)
    blocks = blocks and arch == "llama"
    for t in gf.tensors:
        if blocks and _keep_blocks(t, layer_map):
            _gguf_blocks(gf, t, config, layer_map, state, modules)
            continue
        if keep and _keep_int4(t, layer_map):
            _packed_int4(gf, t, config, layer_map, state, modules)
            continue
        if keep and t.name == "token_embd.weight" and embedding_scheme == "int8-g32" and type_name(t.qtype) == "Q8_0":
            _q8_0_table(gf, t, state, modules)
            continue
        w = dequantize(gf.raw(t), t.qtype, t.shape)  # numpy until the end: see the note on dequantization
        if t.name in _GLOBAL:
            if keep and t.name == "token_embd.weight" and embedding_scheme != "none":
                _quantized_embedding(torch.from_numpy(w), embedding_scheme, state, modules)
            else:
                state[_GLOBAL[t.name]] = torch.from_numpy(w).to(dtype)
            continue
        parts = t.name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            raise LmstackError(f"{gf.path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        prefix, suffix = f"layers.{parts[1]}.", parts[2]
        if arch == "gpt2" and suffix.startswith("attn_qkv."):  # fused [3C, C] / [3C] -> q, k, v
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(w, 3, axis=0)):
                state[f"{prefix}attn.{proj}.{suffix.split('.')[1]}"] = torch.from_numpy(chunk.copy()).to(dtype)
            continue
        if suffix not in layer_map:
            raise LmstackError(f"{gf.path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        if suffix == "attn_q.weight":
            w = unpermute_qk(w, config.n_head)
        elif suffix == "attn_k.weight":
            w = unpermute_qk(w, config.n_kv_head)
        state[prefix + layer_map[suffix]] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    if not (keep or blocks):
        return state, None
    from lmstack.quant.state import FORMAT
    return state, {"format": FORMAT, "fused": False, "modules": modules}


def _keep_int4(t: GGUFTensor, layer_map: dict[str, str]) -> bool:
    """A block linear (or an untied output head) in Q4_0 / Q4_1 whose shape the int4 kernel takes."""
    from lmstack.quant.int4 import int4_fits
    if type_name(t.qtype) not in KEEP_PACKED or len(t.shape) != 2:
        return False
    suffix = t.name.split(".", 2)[-1]
    linear = t.name == "output.weight" or (t.name.startswith("blk.") and suffix in layer_map
                                           and layer_map[suffix].endswith("_proj.weight"))
    return linear and int4_fits(t.shape[0], t.shape[1], 32) is None


def _keep_blocks(t: GGUFTensor, layer_map: dict[str, str]) -> bool:
    """A block linear, output head or token embedding in a block type GGUFLinear computes with."""
    from lmstack.quant.gguf_linear import BLOCK_BYTES
    if type_name(t.qtype) not in BLOCK_BYTES or len(t.shape) != 2:
        return False
    suffix = t.name.split(".", 2)[-1]
    return t.name in ("output.weight", "token_embd.weight") or (
        t.name.startswith("blk.") and suffix in layer_map and layer_map[suffix].endswith("_proj.weight"))


def _gguf_blocks(gf: GGUFFile, t: GGUFTensor, config: DecoderConfig, layer_map: dict[str, str],
                 state: dict[str, Tensor], modules: dict[str, dict[str, Any]]) -> None:
    from lmstack.quant.gguf_linear import BLOCK_BYTES
    qtype = type_name(t.qtype)
    N, K = t.shape
    blocks = gf.raw(t).reshape(N, -1, BLOCK_BYTES[qtype])  # [N, K/32, bytes], a view of the map
    suffix = t.name.split(".", 2)[-1]
    if suffix in ("attn_q.weight", "attn_k.weight"):  # whole rows move, blocks and all (a copy)
        blocks = unpermute_qk(blocks, config.n_head if suffix == "attn_q.weight" else config.n_kv_head)
    spec = {"format": f"gguf-{qtype.lower()}", "in_features": K, "out_features": N, "bias": False}
    if t.name == "token_embd.weight":
        name, spec = "tok_emb", {**spec, "embedding": True, "dtype": "torch.float32"}
    else:
        name = "lm_head" if t.name == "output.weight" else \
            f"layers.{t.name.split('.')[1]}.{layer_map[suffix].removesuffix('.weight')}"
    key = "tok_emb.table.blocks" if name == "tok_emb" else f"{name}.blocks"
    state[key] = torch.from_numpy(np.ascontiguousarray(blocks.reshape(N, -1)))  # [N, K/32 * bytes]
    modules[name] = spec


def _packed_int4(gf: GGUFFile, t: GGUFTensor, config: DecoderConfig, layer_map: dict[str, str],
                 state: dict[str, Tensor], modules: dict[str, dict[str, Any]]) -> None:
    from lmstack.quant.gguf_pack import BLOCK, q4_blocks, q4_blocks_to_int4
    N, K = t.shape
    blocks = q4_blocks(gf.raw(t), type_name(t.qtype), (N, K))  # [N, K/32, bytes]
    suffix = t.name.split(".", 2)[-1]
    if suffix in ("attn_q.weight", "attn_k.weight"):  # whole rows move: codes, scale and zero together
        blocks = unpermute_qk(blocks, config.n_head if suffix == "attn_q.weight" else config.n_kv_head)
    qweight, scales, zeros = q4_blocks_to_int4(blocks, type_name(t.qtype))  # [N, K/2], [N, K/32] x2
    name = "lm_head" if t.name == "output.weight" else \
        f"layers.{t.name.split('.')[1]}.{layer_map[suffix].removesuffix('.weight')}"
    state[f"{name}.qweight"] = qweight
    state[f"{name}.scales_and_zeros"] = torch.stack([scales, zeros], -1).transpose(0, 1).to(
        torch.bfloat16).contiguous()  # [K/32, N, 2]
    modules[name] = {"format": f"int4-g{BLOCK}", "in_features": K, "out_features": N, "bias": False}


def _q8_0_table(gf: GGUFFile, t: GGUFTensor, state: dict[str, Tensor], modules: dict[str, dict[str, Any]]) -> None:
    """A Q8_0 token embedding kept as it is (int8-g32): each 34-byte block is an fp16 scale and 32 int8 codes."""
    N, K = t.shape
    b = gf.raw(t).reshape(-1, 34)  # [N K/32, 34]
    state["tok_emb.table.qweight"] = torch.from_numpy(b[:, 2:].copy().view(np.int8).reshape(N, K))
    state["tok_emb.table.scales"] = torch.from_numpy(_f16(b[:, :2]).reshape(N, K // 32))
    modules["tok_emb"] = {"format": "int8-g32", "in_features": K, "out_features": N, "bias": False,
                          "embedding": True, "dtype": "torch.bfloat16"}


def _quantized_embedding(weight: Tensor, scheme: str, state: dict[str, Tensor],
                         modules: dict[str, dict[str, Any]]) -> None:
    """token_embd (Q8_0 in SmolLM2's file) requantized as `scheme`, as quant_ would; "int8-g32" keeps a Q8_0
    table's codes and scales exactly (quant.int8.quantize_int8_rows)."""
    from lmstack.quant.quantize import choose_format, quantized_linear
    fmt, _ = choose_format(scheme, *weight.shape)
    table = quantized_linear(weight, None, fmt)
    state.update({f"tok_emb.table.{k}": v.contiguous() for k, v in table.state_dict().items()})
    modules["tok_emb"] = {"format": fmt, "in_features": weight.shape[1], "out_features": weight.shape[0],
                          "bias": False, "embedding": True, "dtype": "torch.bfloat16"}


# ------------------------------------------------------------------------------------------ tokenizer

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex splits llama.cpp applies in order (llama-vocab.cpp); the GPT-2 split is also
# what HF's ByteLevel(use_regex=True) does. "\p{N}" first = every digit on its own (HF's Digits(individual)).
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    **{name: [_GPT2_SPLIT] for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: [r"\p{N}", _GPT2_SPLIT] for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                                   "exaone", "minerva")},
    **{name: [_LLAMA3_SPLIT] for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: [_QWEN2_SPLIT] for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}
# End-of-turn tokens that stop a generation besides EOS, when the vocabulary has them
EOT_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
              "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def _byte_alphabet() -> dict[int, str]:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def gguf_tokenizer(gf: GGUFFile) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from tokenizer.ggml.* metadata (llama.cpp's "gpt2" model)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    meta, path = gf.metadata, gf.path
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmstackError(f"{path}: tokenizer model {kind!r} is not supported yet (supported: gpt2 byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise LmstackError(f"{path}: unknown pre-tokenizer {pre!r} (known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    tokens: list[str] = _get(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else types.tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    # Tokens are stored in the byte alphabet already; respell any that are not (as transformers does).
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab = {(t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) match whole and are special; user-defined ones match whole, not special.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= letters])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    stops = [t for t in EOT_TOKENS if t in vocab and types[vocab[t]] == _CONTROL]
    stops += [t for t in (token("eot_token_id"), token("eom_token_id")) if t is not None and t not in stops]
    return Tokenizer(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                     pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)), extra_stop_tokens=stops)


# ------------------------------------------------------------------------------------------- entry


def load_gguf(path: Path, keep: bool = False, embedding_scheme: str = "int4-g32", dtype: torch.dtype = torch.float32,
              blocks: bool = False) -> tuple[DecoderConfig, dict[str, Tensor], Tokenizer, dict[str, Any]]:
    """Config, state dict (lmstack keys), tokenizer and file metadata of a llama / gpt2 GGUF file: fp32, or with
    `keep` the Q4 linears kept packed (or with `blocks` the file's blocks) and the metadata's "quantization" saying
    how (see gguf_state_dict)."""
    gf = read_gguf(path)
    config = gguf_config(gf)
    state, quantization = gguf_state_dict(gf, config, keep, embedding_scheme, dtype, blocks)
    tokenizer = gguf_tokenizer(gf)
    meta = gf.metadata
    file_type = meta.get("general.file_type")
    if file_type is not None:
        from gguf import LlamaFileType

        try:
            file_type = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = int(file_type)
    info = {"format": "gguf", "gguf_version": gf.version, "architecture": meta["general.architecture"],
            "file_type": file_type, "quant_types": dict(Counter(type_name(t.qtype) for t in gf.tensors)),
            "name": meta.get("general.name")}
    if quantization is not None:
        info["quantization"] = quantization
    return config, state, tokenizer, info
