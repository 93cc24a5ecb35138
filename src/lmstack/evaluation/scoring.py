"""One batched log-likelihood scorer for every scoring task: multiple choice, log-likelihood, chosen-vs-rejected
pairs (hh-rlhf) and strided perplexity, and lmstack's lm-eval `LM` on top of it.

A request is (context token ids, continuation token ids); its score is the summed log-probability of the
continuation given the context, and whether greedy decoding would have produced it - lm-evaluation-harness'
`(logprob, is_greedy)`. Requests are sorted by length (longest first, as lm-eval does) so that a batch holds
sequences of similar length and little padding; results come back in the caller's order.

Shapes: B rows in a batch, T tokens (right-padded), C model width, V vocabulary, N scored positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer


@dataclass
class Score:
    logprob: float  # sum of log p(continuation token | everything before it)
    greedy: bool  # every continuation token is the argmax
    n_tokens: int  # continuation tokens scored


def _decoder(model: nn.Module) -> nn.Module:
    """The Decoder inside `model` (PEFT wrappers such as prompt tuning hold it as an attribute)."""
    from lmstack.models.decoder import Decoder
    for module in model.modules():
        if isinstance(module, Decoder):
            return module
    raise LmstackError(f"log-likelihood scoring needs a decoder model, not {type(model).__name__} "
                       "(seq2seq models run generate tasks)")


class Scorer:
    """Batched log-likelihoods of continuations for one decoder model (any PEFT wrapper included).

    max_length: the longest input the model sees; longer requests lose tokens on the left, as lm-eval's.
    token_budget: at most about this many tokens per forward pass (long rows make smaller batches).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, *, batch_size: int = 8,
                 max_length: int | None = None, token_budget: int = 4096, progress: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decoder = _decoder(model)
        self.max_length = max_length or self.decoder.config.max_seq_len
        self.batch_size, self.token_budget, self.progress = batch_size, token_budget, progress
        self.device = self.decoder.device
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0  # pads are masked out; any id will do

    # ------------------------------------------------------------------------------ tokenization

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS (lm-eval's HFLM.prefix_token_id)."""
        tok = self._tokenizer()
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise LmstackError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
        return prefix

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LmstackError("this model has no tokenizer; text requests need one")
        return self.tokenizer

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's TemplateLM._encode_pair for causal models: trailing spaces of the context move to the
        continuation, the pair is encoded whole, and the continuation is what follows the context's tokens.
        Special tokens are not added (HFLM's default for causal models); an empty context is the prefix token."""
        tok = self._tokenizer()
        if not context:
            cont, prefix = tok.encode(continuation, add_special_tokens=False), self.prefix_token_id
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tok.encode(context + continuation, add_special_tokens=False)
        context_ids = tok.encode(context, add_special_tokens=False)
        return context_ids, whole[len(context_ids):]

    # ---------------------------------------------------------------------------------- scoring

    def score_text(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[Score]:
        return self.score([self.encode_pair(c, x) for c, x in pairs], desc)

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[list[int], list[int]]], desc: str = "scoring") -> list[Score]:
        """Scores in the order of `requests`, computed in length-sorted batches."""
        for ctx, cont in requests:
            if not cont:
                raise LmstackError("a continuation is empty; there is nothing to score")
            if len(cont) > self.max_length:
                raise LmstackError(f"a continuation is {len(cont)} tokens; the model sees at most {self.max_length}")
        # Input = (context + continuation)[:-1], cut on the left to max_length (lm-eval's truncation).
        inputs = [(list(ctx) + list(cont))[-(self.max_length + 1):][:-1] for ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[Score | None] = [None] * len(requests)
        bar = tqdm(total=len(order), desc=desc, disable=not self.progress, leave=False)
        start = 0
        while start < len(order):
            longest = len(inputs[order[start]])
            size = max(1, min(self.batch_size, self.token_budget // max(longest, 1)))
            batch = order[start:start + size]
            scores = self._score_batch([inputs[i] for i in batch], [list(requests[i][1]) for i in batch])
            for i, s in zip(batch, scores):
                results[i] = s
            start += size
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, inputs: list[list[int]], continuations: list[list[int]]) -> list[Score]:
        from lmstack.training.objectives import IGNORE, token_logprobs
        T = max(map(len, inputs))
        dev = self.device
        tokens = torch.tensor([x + [self.pad_id] * (T - len(x)) for x in inputs], device=dev)  # [B, T]
        padded = any(len(x) < T for x in inputs)
        mask = (torch.tensor([[True] * len(x) + [False] * (T - len(x)) for x in inputs], device=dev)
                if padded else None)  # [B, T]; right padding keeps positions 0.. for the real tokens
        # Position t predicts the next token: the continuation's tokens are the labels of its last len(c) inputs.
        labels = torch.full((len(inputs), T), IGNORE, dtype=torch.long)
        for b, (x, c) in enumerate(zip(inputs, continuations)):
            labels[b, len(x) - len(c):len(x)] = torch.tensor(c)
        batch = {"input_ids": tokens, "labels": labels.to(dev), "key_padding_mask": mask}
        out = token_logprobs(self.model, batch, greedy=True)  # [N], row-major = continuation order
        token_lp, hit = out.logprobs, out.greedy
        scores, at = [], 0
        for c in continuations:
            n = len(c)
            scores.append(Score(logprob=float(token_lp[at:at + n].sum()), greedy=bool(hit[at:at + n].all()),
                                n_tokens=n))
            at += n
        return scores


# ------------------------------------------------------------------------------------ perplexity


@dataclass
class Window:
    context: list[int]
    continuation: list[int]
    weight: int  # tokens this window adds to the average (the transformers doc's num_loss_tokens)


def perplexity_windows(ids: Sequence[int], max_length: int, stride: int) -> list[Window]:
    """The strided sliding window of transformers' "Perplexity of fixed-length models" guide, as requests.

    Windows of max_length tokens start every `stride` tokens; each one scores only the tokens that the previous
    window did not reach (trg_len), with the rest as context. The guide averages `loss * num_loss_tokens`
    with num_loss_tokens = trg_len - 1 (it subtracts one for the label shift in every window, although only the
    first window loses a token to it); we keep that weighting so our number is the guide's number.
    """
    if stride < 1 or stride > max_length:
        raise LmstackError(f"stride must be between 1 and the window length {max_length}, not {stride}")
    ids = list(ids)
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end]
        n_scored = min(trg_len, len(window) - 1)  # the window's first token has no prediction
        if n_scored > 0 and trg_len - 1 > 0:
            windows.append(Window(window[:len(window) - n_scored], window[len(window) - n_scored:], trg_len - 1))
        prev_end = end
        if end == len(ids):
            break
    return windows


def window_perplexity(windows: Sequence[Window], scores: Sequence[Score]) -> tuple[float, float, int]:
    """(perplexity, weighted nll sum, weighted token count) from the windows' scores, as the guide averages."""
    import math
    nll_sum = sum((-s.logprob / s.n_tokens) * w.weight for w, s in zip(windows, scores, strict=True))
    n = sum(w.weight for w in windows)
    return (math.exp(nll_sum / n) if n else float("nan")), nll_sum, n

