"""Parameter-efficient fine-tuning: LoRA / QLoRA (an NF4 base from lmstack.quant), prompt tuning, prefix tuning,
bottleneck adapters, and LoRA interop with Hugging Face peft. Each method changes a model in place by swapping
or wrapping modules (never by subclassing it) and freezes everything but its own weights, so the one Trainer
trains it unchanged. `peft_state_dict` / `load_peft_state_dict` move any method's weights alone; "adapter" means
such a method's output folder (`--adapter DIR`, see methods.py).
"""

from lmstack.peft.bottleneck import BottleneckAdapter, WithBottleneck, apply_bottleneck
from lmstack.peft.export import export_peft_adapter, import_peft_adapter, read_peft_adapter
from lmstack.peft.lora import (TARGETS, LoRALinear, apply_lora, disable_adapter, load_peft_state_dict, lora_config,
                               merge_lora, peft_modules, peft_state_dict, resolve_targets)
from lmstack.peft.prompt import PrefixTuning, PromptTuned, apply_prefix_tuning

__all__ = [
    "TARGETS", "BottleneckAdapter", "LoRALinear", "PrefixTuning", "PromptTuned", "WithBottleneck",
    "apply_bottleneck", "apply_lora", "apply_prefix_tuning", "disable_adapter", "export_peft_adapter",
    "import_peft_adapter", "load_peft_state_dict", "lora_config", "merge_lora", "peft_modules", "peft_state_dict",
    "read_peft_adapter", "resolve_targets",
]
