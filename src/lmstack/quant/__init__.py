"""Quantization, a leaf package (it imports torch and nothing of lmstack above it): peft, compression and inference
import it from below.

    nf4.py   4-bit NormalFloat with double quantization (QLoRA's frozen base weight)
    int4.py, int8.py, nf4_linear.py   quantized linears;  quantize.py  quantize_, fuse_projections_
    packed.py   bf16 linears in oneDNN's prepacked layout (inference, unquantized);  qat.py  fake-quant training

A quantized checkpoint records its scheme in its metadata (lmstack.json `metadata`), never in its file name.
"""

from lmstack.quant.nf4 import NF4_LEVELS, NF4Weight

__all__ = ["NF4_LEVELS", "NF4Weight"]
