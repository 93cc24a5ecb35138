"""Training objectives: each maps (model, batch) to a summed token loss and its token counts.

Labels use -100 for positions without loss (padding, prompts, unmasked MLM positions). `token_logprobs` is the
one place a causal model's labelled positions become log-probabilities: the causal objective, evaluation's
scorer and the preference objectives all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


@dataclass
class TokenLogprobs:
    """log p(label) at every labelled position of a batch, in row-major order (N positions)."""

    logprobs: Tensor  # [N] float32
    rows: Tensor  # [N] the batch row of each position
    greedy: Tensor | None  # [N] bool: the label is the argmax (only when asked for)


def token_logprobs(model: nn.Module, batch: dict[str, Tensor], greedy: bool = False) -> TokenLogprobs:
    """Log-probabilities of the labels of a causal LM batch, with the head applied only at labelled positions.

    batch: input_ids [B, T], labels [B, T] (already shifted: labels[b, t] follows position t; -100 = not
    scored), and optionally attn_mask [B, 1, T, T] and position_ids [B, T] (packed rows) or key_padding_mask
    [B, T] (right-padded rows). Fine-tuning masks its prompts and scoring reads only continuations, so the
    [B, T, V] logits and their gradient shrink to [N, V].
    """
    hidden = model(batch["input_ids"], attn_mask=batch.get("attn_mask"), position_ids=batch.get("position_ids"),
                   key_padding_mask=batch.get("key_padding_mask"), return_hidden=True)  # [B, T, C]
    labels = batch["labels"]
    picked = labels != IGNORE  # [B, T]
    logits = model.head(hidden[picked]).float()  # [N, V]
    targets = labels[picked]  # [N]
    logprobs = -F.cross_entropy(logits, targets, reduction="none")  # [N]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[picked]
    hit = logits.argmax(dim=-1) == targets if greedy else None
    return TokenLogprobs(logprobs, rows, hit)


def causal_lm_targets(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """causal_lm with the vocabulary projection only at labelled positions (see token_logprobs)."""
    out = token_logprobs(model, batch)
    return LossOutput(-out.logprobs.sum(), out.logprobs.new_tensor(out.logprobs.numel(), dtype=torch.long),
                      batch["labels"].numel())


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


