"""Parameter-efficient fine-tuning: LoRA / QLoRA (NF4), prompt tuning, prefix tuning, bottleneck adapters, and
LoRA interop with Hugging Face peft. Each method changes a model in place by swapping or wrapping modules
(never by subclassing it) and freezes everything but its own weights, so the one Trainer trains it unchanged.
"""

from lmstack.peft.adapter import BottleneckAdapter, WithAdapter, adapter_state_dict, apply_adapters
from lmstack.peft.export import export_peft_adapter, import_peft_adapter, read_peft_adapter
from lmstack.peft.lora import (TARGETS, LoRALinear, apply_lora, disable_adapter, load_lora_state_dict,
                               load_trainable_state_dict, lora_config, lora_state_dict, merge_lora, peft_modules,
                               resolve_targets, trainable_state_dict)
from lmstack.peft.nf4 import NF4_LEVELS, NF4Weight
from lmstack.peft.prompt import PrefixTuning, PromptTuned, apply_prefix_tuning

__all__ = [
    "TARGETS", "BottleneckAdapter", "LoRALinear", "NF4Weight", "NF4_LEVELS", "PrefixTuning", "PromptTuned",
    "WithAdapter", "adapter_state_dict", "apply_adapters", "apply_lora", "apply_prefix_tuning", "disable_adapter",
    "export_peft_adapter", "import_peft_adapter", "load_lora_state_dict", "load_trainable_state_dict",
    "lora_config", "lora_state_dict", "merge_lora", "peft_modules", "read_peft_adapter", "resolve_targets",
    "trainable_state_dict",
]
