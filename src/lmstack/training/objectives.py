"""Training objectives: each maps (model, batch) to a summed token loss and its token counts.

Labels use -100 for positions without loss (padding, prompts, unmasked MLM positions).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.training.trainer import LossOutput

IGNORE = -100


def token_loss_sum(logits: Tensor, labels: Tensor) -> LossOutput:
    """Summed cross-entropy over labelled positions; logits [N, V] or [B, T, V], labels matching."""
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels, ignore_index=IGNORE, reduction="sum")
    return LossOutput(loss, (labels != IGNORE).sum(), labels.numel())


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Next-token prediction. batch: input_ids [B, T], labels [B, T] (already shifted), optional attn_mask
    [B, 1, T, T] and position_ids [B, T] for packed sequences."""
    logits = model(batch["input_ids"], attn_mask=batch.get("attn_mask"), position_ids=batch.get("position_ids"))
    return token_loss_sum(logits, batch["labels"])


def causal_lm_targets(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """causal_lm with the vocabulary projection only at labelled positions: the same loss, but fine-tuning masks
    its prompts (often half the positions), so the [B, T, V] logits and their gradient shrink to [N, V]."""
    hidden = model(batch["input_ids"], attn_mask=batch.get("attn_mask"), position_ids=batch.get("position_ids"),
                   return_hidden=True)  # [B, T, C]
    labels = batch["labels"]
    picked = labels != IGNORE
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight  # [V, C]
    out = token_loss_sum(hidden[picked] @ head.t(), labels[picked])  # [N, V] vs [N]
    return LossOutput(out.loss_sum, out.n_targets, labels.numel())


def masked_lm(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """BERT MLM. batch: input_ids [B, T] (with [MASK]s), attention_mask [B, T], labels [B, T] (-100 = unmasked).
    The vocabulary projection runs only at the masked positions (~15%), which is most of the saving."""
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # [B, T, C]
    labels = batch["labels"]
    picked = labels != IGNORE
    out = token_loss_sum(model.mlm_logits(hidden[picked]), labels[picked])  # [N, V] vs [N]
    return LossOutput(out.loss_sum, out.n_targets, batch["input_ids"].numel())


def seq2seq(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Teacher-forced encoder-decoder loss (translation pairs and T5 span corruption alike).
    batch: src [B, S], src_mask [B, S] bool, tgt_in [B, T] (starts with the decoder start token), labels [B, T]."""
    logits = model(batch["src"], batch["tgt_in"], src_mask=batch.get("src_mask"))
    out = token_loss_sum(logits, batch["labels"])
    return LossOutput(out.loss_sum, out.n_targets, batch["src"].numel() + batch["tgt_in"].numel())


OBJECTIVES = {"causal": causal_lm, "mlm": masked_lm, "span": seq2seq, "seq2seq": seq2seq}


