"""Text generation: one engine, one per-sequence state, one synchronous API.

- `sampling`: GenerationConfig, the pure logit operations, and `Sequence` (tokens, streamed text, stop
  strings, finish reason, log-probs, its own sampler, an optional constraint);
- `constraints`: the `Constraint` protocol, JSON mode and copy mode;
- `engine`: `DecodeEngine`, the one prefill / decode step over a pool of KV-cache rows with per-row positions,
  which `Generator` and the serving scheduler both drive;
- `generator`: `Generator` (generate, stream, generate_batch, beam search);
- `chat`: the `generate` and `chat` verbs.

The names below are imported on first use, so importing `lmstack.generation.chat` (the CLI does) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Constraint": "constraints", "JsonConstraint": "constraints", "JsonPrefix": "constraints",
    "CopyConstraint": "constraints",
    "token_texts": "constraints",
    "DecodeEngine": "engine",
    "GenerationResult": "generator", "Generator": "generator",
    **{name: "sampling" for name in (
        "GenerationConfig", "Sequence", "TokenLogprob", "apply_no_repeat_ngram", "apply_repetition_penalty",
        "apply_top_k", "apply_top_p", "banned_ngram_tokens", "choose_tokens", "find_stop", "held_back",
        "process_logits", "seen_mask", "select_next", "stop_token_ids")},
}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from lmstack.generation.constraints import (  # noqa: F401
        Constraint, CopyConstraint, JsonConstraint, JsonPrefix, token_texts)
    from lmstack.generation.engine import DecodeEngine  # noqa: F401
    from lmstack.generation.generator import GenerationResult, Generator  # noqa: F401
    from lmstack.generation.sampling import (GenerationConfig, Sequence, TokenLogprob,  # noqa: F401
                                             apply_no_repeat_ngram, apply_repetition_penalty, apply_top_k,
                                             apply_top_p, banned_ngram_tokens, choose_tokens, find_stop,
                                             held_back, process_logits, seen_mask, select_next, stop_token_ids)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lmstack.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmstack.generation.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
