"""checkpoints/load.py: `dtype="auto"` from the CPU flags, skip_init confined to its thread, the registry names."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from lmstack.checkpoints import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, REGISTRY, load_model, save_native
from lmstack.checkpoints.load import auto_dtype, cpu_has_native_bf16, parse_dtype, skip_init
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model

ROOT = Path(__file__).resolve().parents[1]

# Two cores of /proc/cpuinfo, trimmed; only the flags lines matter.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 clzero
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 clzero
"""
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"


# ----------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("cpuinfo,native", [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE, False),
                                            ("", False), ("processor\t: 0\n", False)])
def test_cpu_flags_decide_native_bf16(cpuinfo: str, native: bool) -> None:
    assert cpu_has_native_bf16(cpuinfo) is native
    assert auto_dtype("cpu", cpuinfo) == (torch.bfloat16 if native else torch.float32)


def test_cpuinfo_from_a_path_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(ZEN4)
    assert cpu_has_native_bf16(tmp_path / "cpuinfo")
    assert not cpu_has_native_bf16(tmp_path / "absent")  # no flags file (not Linux): float32
    assert auto_dtype("cpu", tmp_path / "absent") == torch.float32


def test_cuda_is_always_bf16() -> None:
    assert auto_dtype("cuda", SKYLAKE) == torch.bfloat16  # a descriptor only: no GPU is needed to ask
    assert auto_dtype(torch.device("cuda", 0), "") == torch.bfloat16


def test_parse_dtype_names() -> None:
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("float32") == torch.float32
    assert parse_dtype("auto") == auto_dtype("cpu")
    with pytest.raises(LmstackError, match="unknown dtype 'int3'; use auto, float32 or bfloat16"):
        parse_dtype("int3")


def test_loaded_model_records_the_dtype_chosen(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = save_native(build_model(from_name("tiny-llama", vocab_size=64)), None, tmp_path / "tiny")
    auto = load_model(str(folder))  # dtype="auto" is the default
    want = auto_dtype("cpu")
    assert auto.dtype == str(want).removeprefix("torch.") and auto.model.dtype == want
    fp32 = load_model(str(folder), dtype="float32")
    assert fp32.dtype == "float32" and fp32.model.dtype == torch.float32


def test_no_model_and_no_adapter_is_one_line() -> None:
    with pytest.raises(LmstackError, match="no model given"):
        load_model(None)


# ------------------------------------------------------------------------------------------ skip_init


def test_skip_init_skips_fills_and_restores() -> None:
    w = torch.zeros(4, 3)
    with skip_init():
        nn.init.normal_(w)
        nn.init.kaiming_uniform_(w)
        w.uniform_()
        w.normal_()
        layer = nn.Linear(3, 4)  # its own reset_parameters is skipped too: the module still builds
        assert layer.weight.shape == (4, 3)
    assert torch.count_nonzero(w) == 0
    nn.init.normal_(w)
    assert torch.count_nonzero(w) == w.numel()  # outside the block, init works again


def test_skip_init_leaves_other_threads_alone() -> None:
    """A server loads a model in one thread while others run: their initialisation must be untouched."""
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def loader() -> None:
        with skip_init():
            inside.set()
            done.wait(timeout=60)
            w = torch.zeros(8)
            w.normal_()
            seen["loader"] = w

    def other() -> None:
        inside.wait(timeout=60)
        w = torch.zeros(8)
        nn.init.normal_(w)
        seen["other"] = w
        done.set()

    threads = [threading.Thread(target=loader), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert torch.count_nonzero(seen["other"]) == 8  # initialised while the loader was inside skip_init
    assert torch.count_nonzero(seen["loader"]) == 0


def test_instantiate_does_not_import_dynamo(tmp_path: Path) -> None:
    """normal_ on the meta device goes through torch._refs, which imports torch._dynamo (seconds): skip_init
    keeps every initialisation off that path."""
    folder = save_native(build_model(from_name("tiny-llama", vocab_size=64)), None, tmp_path / "tiny")
    code = ("import sys; from lmstack.checkpoints import load_model; "
            f"load_model({str(folder)!r}, dtype='float32'); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- registry


def test_default_models_are_registry_names() -> None:
    assert DEFAULT_MODEL in REGISTRY and DEFAULT_EMBEDDING_MODEL in REGISTRY
