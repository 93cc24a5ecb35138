"""Constrained decoding: a small `Constraint` protocol, and JSON mode behind it.

A constraint restricts which tokens one sequence may take; `Sequence` (generation.sampling) asks it to choose
from the processed logits and ends the sequence when it reports `complete`. Any decode loop - `Generator`
(`GenerationConfig.json_mode`), the serving scheduler, an agent loop - gets it through `Sequence`. A JSON-schema
or regex constraint plugs in by implementing the same two members.

JSON mode: `JsonPrefix` is a character-level pushdown automaton. `feed(text)` says whether the text so far is
still the start of some valid JSON document whose top-level value is an object (what OpenAI's
`response_format={"type": "json_object"}` promises); `completion()` gives the shortest text that closes the
document, which is forced out when the token budget is about to run out; `complete` says the object has
closed. The state is a handful of small fields and a tuple stack, so trying a candidate token is one `copy()`
plus feeding its characters.

`JsonConstraint` applies it to one generated sequence: candidate tokens are checked best-first (greedy) or
drawn, checked, and masked out on failure (sampling); rejection with renormalization samples exactly from the
distribution restricted to the valid tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmstack.generation.sampling import GenerationConfig


class Constraint(Protocol):
    """What a decoding constraint offers `Sequence`: a choice among processed logits, and whether it is done."""

    @property
    def complete(self) -> bool:
        """The constrained text is finished: the sequence stops here."""
        ...

    def choose(self, logits: Tensor, greedy: bool, generator: torch.Generator | None, budget: int) -> int:
        """The next token from processed logits [V] (float32), with `budget` tokens left (this one included)."""
        ...

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
ESCAPES = '"\\/bfnrtu'

# Modes of the automaton.
VALUE, FIRST_ITEM, FIRST_KEY, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(12)
# Number sub-states: what the number text ends with.
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(8)
NUMBER_COMPLETE = (ZERO, INT, FRAC, EXP_DIGITS)


class JsonPrefix:
    """Is the text fed so far a prefix of a valid JSON object? Feed characters; a False answer leaves the state
    undefined (callers feed a copy)."""

    __slots__ = ("mode", "stack", "is_key", "sub", "literal", "started")

    def __init__(self) -> None:
        self.mode = VALUE
        self.stack: tuple[str, ...] = ()  # open containers, "{" or "["
        self.is_key = False  # the current string is an object key
        self.sub = 0  # number sub-state, or hex digits read in a \\u escape
        self.literal = ""  # the rest of true/false/null still to come
        self.started = False  # the top-level object has opened

    def copy(self) -> JsonPrefix:
        other = JsonPrefix.__new__(JsonPrefix)
        other.mode, other.stack, other.is_key = self.mode, self.stack, self.is_key
        other.sub, other.literal, other.started = self.sub, self.literal, self.started
        return other

    @property
    def complete(self) -> bool:
        return self.mode == DONE

    def feed(self, text: str) -> bool:
        return all(self._char(c) for c in text)

    def _end_value(self) -> None:
        self.mode = AFTER if self.stack else DONE

    def _close(self, c: str) -> bool:
        if not self.stack or self.stack[-1] != ("{" if c == "}" else "["):
            return False
        self.stack = self.stack[:-1]
        self._end_value()
        return True

    def _value_start(self, c: str) -> bool:
        if not self.started:  # the top level must be an object
            if c != "{":
                return False
            self.started = True
        if c == "{":
            self.stack += ("{",)
            self.mode = FIRST_KEY
        elif c == "[":
            self.stack += ("[",)
            self.mode = FIRST_ITEM
        elif c == '"':
            self.mode, self.is_key = STRING, False
        elif c == "-":
            self.mode, self.sub = NUMBER, MINUS
        elif c in DIGITS:
            self.mode, self.sub = NUMBER, ZERO if c == "0" else INT
        elif c in "tfn":
            self.mode, self.literal = LITERAL, {"t": "rue", "f": "alse", "n": "ull"}[c]
        else:
            return False
        return True

    def _char(self, c: str) -> bool:
        mode = self.mode
        if mode == STRING:
            if c == '"':
                if self.is_key:
                    self.mode = COLON
                else:
                    self._end_value()
            elif c == "\\":
                self.mode = ESCAPE
            elif ord(c) < 0x20:  # control characters must be escaped
                return False
            return True
        if mode == ESCAPE:
            if c not in ESCAPES:
                return False
            self.mode, self.sub = (UNICODE, 0) if c == "u" else (STRING, 0)
            return True
        if mode == UNICODE:
            if c not in HEX:
                return False
            self.sub += 1
            if self.sub == 4:
                self.mode = STRING
            return True
        if mode == NUMBER:
            nxt = self._number_char(c)
            if nxt is not None:
                self.sub = nxt
                return True
            if self.sub not in NUMBER_COMPLETE:
                return False
            self._end_value()  # the number ended; this character belongs to what follows
            return self._char(c)
        if mode == LITERAL:
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end_value()
            return True
        if c in WHITESPACE:  # allowed between tokens, before and after the object
            return True
        if mode == DONE:
            return False
        if mode == VALUE:
            return self._value_start(c)
        if mode == FIRST_ITEM:
            return self._close(c) if c == "]" else self._value_start(c)
        if mode in (FIRST_KEY, KEY):
            if c == '"':
                self.mode, self.is_key = STRING, True
                return True
            return mode == FIRST_KEY and c == "}" and self._close(c)
        if mode == COLON:
            if c != ":":
                return False
            self.mode = VALUE
            return True
        if mode == AFTER:
            if c == ",":
                self.mode = KEY if self.stack[-1] == "{" else VALUE
                return True
            return c in "}]" and self._close(c)
        return False

    def _number_char(self, c: str) -> int | None:
        """The number sub-state after `c`, or None when `c` cannot continue the number."""
        s = self.sub
        if c in DIGITS:
            if s == MINUS:
                return ZERO if c == "0" else INT
            if s == INT:
                return INT
            if s in (DOT, FRAC):
                return FRAC
            if s in (EXP, EXP_SIGN, EXP_DIGITS):
                return EXP_DIGITS
            return None  # a leading zero takes no more digits
        if c == "." and s in (ZERO, INT):
            return DOT
        if c in "eE" and s in (ZERO, INT, FRAC):
            return EXP
        if c in "+-" and s == EXP:
            return EXP_SIGN
        return None

    def completion(self) -> str:
        """The shortest text that turns the prefix into a complete JSON object."""
        mode, head = self.mode, ""
        if mode == DONE:
            return ""
        if not self.started:
            return "{}"
        if mode == STRING:
            head = '"' + (":0" if self.is_key else "")
        elif mode == ESCAPE:
            head = 'n"' + (":0" if self.is_key else "")
        elif mode == UNICODE:
            head = "0" * (4 - self.sub) + '"' + (":0" if self.is_key else "")
        elif mode == NUMBER:
            head = "" if self.sub in NUMBER_COMPLETE else "0"
        elif mode == LITERAL:
            head = self.literal
        elif mode == VALUE:
            head = "0"
        elif mode == KEY:
            head = '"":0'
        elif mode == COLON:
            head = ":0"
        # FIRST_ITEM, FIRST_KEY and AFTER close right away.
        return head + "".join("}" if c == "{" else "]" for c in reversed(self.stack))


class JsonConstraint:
    """Constrains one sequence's tokens to a JSON object that closes within its token budget.

    `token_texts[i]` is token i decoded alone ("" for special tokens and None-like entries); tokens whose
    text is empty or holds U+FFFD (part of a UTF-8 character) are never chosen, so JSON mode writes whole
    characters per token.
    """

    max_greedy_candidates = 4096  # best-first candidates tried before falling back to the forced completion

    def __init__(self, tokenizer: Tokenizer, token_texts: list[str]) -> None:
        self.tokenizer, self.texts = tokenizer, token_texts
        self.state = JsonPrefix()
        self.forced: list[int] = []  # the completion's tokens, once the budget demands it

    @property
    def complete(self) -> bool:
        return self.state.complete

    def _accepts(self, token: int, budget_after: int) -> JsonPrefix | None:
        """The state after `token`, if the text stays valid JSON that can still close in `budget_after` tokens
        (the completion's length in characters bounds its length in tokens)."""
        text = self.texts[token] if token < len(self.texts) else ""
        if not text or "\ufffd" in text:
            return None
        state = self.state.copy()
        if not state.feed(text) or len(state.completion()) > budget_after:
            return None
        return state

    def choose(self, logits: Tensor, greedy: bool, generator: torch.Generator | None, budget: int) -> int:
        """Pick the next token from processed logits [V] (float32) with `budget` tokens left, this one included."""
        if not self.forced and len(self.state.completion()) >= budget:
            self.forced = self.tokenizer.encode(self.state.completion(), add_special_tokens=False)
        if self.forced:
            token = self.forced.pop(0)
            self.state.feed(self.texts[token])
            return token
        token, state = (self._greedy(logits, budget - 1) if greedy
                        else self._sample(logits, generator, budget - 1))
        if state is None:  # nothing valid among the candidates: start the completion
            self.forced = self.tokenizer.encode(self.state.completion(), add_special_tokens=False)
            return self.choose(logits, greedy, generator, budget)
        self.state = state
        return token

    def _greedy(self, logits: Tensor, budget_after: int) -> tuple[int, JsonPrefix | None]:
        order = torch.argsort(logits, descending=True)[: self.max_greedy_candidates].tolist()
        finite = torch.isfinite(logits)
        for token in order:
            if not finite[token]:
                break
            state = self._accepts(token, budget_after)
            if state is not None:
                return token, state
        return -1, None

    def _sample(self, logits: Tensor, generator: torch.Generator | None,
                budget_after: int) -> tuple[int, JsonPrefix | None]:
        probs = logits.softmax(dim=-1)  # [V]
        for _ in range(self.max_greedy_candidates):
            if not float(probs.sum()) > 0:
                break
            token = int(torch.multinomial(probs, 1, generator=generator))
            state = self._accepts(token, budget_after)
            if state is not None:
                return token, state
            probs[token] = 0.0  # masked; the next draw is from the renormalized rest
        return -1, None


class CopyConstraint:
    """Constrains one sequence to a span copied from one of `sources` (extractive answering).

    The text, less leading whitespace, must start at a word start of some source and continue it exactly (the
    first letter may change case; runs of spaces match one space, and no line break is copied); a stop token
    is allowed once the text ends at a word end.
    The model still chooses where the span starts and ends: candidate tokens are checked best-first (greedy),
    or drawn and masked out on failure (sampling), as in JSON mode. `sources[self.source]` is the one the text
    was copied from (the first, in the given order, that holds it).
    """

    def __init__(self, sources: list[str], token_texts: list[str], stop_ids: set[int]) -> None:
        self.sources = [_SPACES.sub(" ", s).strip() for s in sources]
        self.texts, self.stop_ids = token_texts, stop_ids
        self.stop = min(stop_ids) if stop_ids else None
        self.text = ""  # the span so far, whitespace collapsed
        self.matches: list[tuple[int, int]] = []  # (source, start) of each place the span is copied from

    @property
    def complete(self) -> bool:
        """Every place the span is copied from is at the end of its source."""
        return bool(self.matches) and all(start + len(self.text) >= len(self.sources[i])
                                          for i, start in self.matches)

    @property
    def source(self) -> int | None:
        return self.matches[0][0] if self.matches else None

    def _grow(self, piece: str) -> tuple[str, list[tuple[int, int]]] | None:
        """(text, matches) after appending `piece`, or None when it leaves every source."""
        if not piece or "\ufffd" in piece or "\n" in piece:
            return None
        text = _SPACES.sub(" ", self.text + piece).lstrip()
        if not text:
            return None
        if self.matches:
            found = [(i, st) for i, st in self.matches if self.sources[i].startswith(text[1:], st + 1)]
        else:
            found = [(i, st) for i, src in enumerate(self.sources) for first in {text[0].lower(), text[0].upper()}
                     for st in _occurrences(src, first + text[1:]) if st == 0 or not src[st - 1].isalnum()]
        return (text, found) if found else None

    def _can_stop(self) -> bool:
        """The span is not empty and ends at a word end in some source."""
        n = len(self.text.rstrip())
        return n > 0 and any(st + n >= len(self.sources[i]) or not self.sources[i][st + n].isalnum()
                             for i, st in self.matches)

    def choose(self, logits: Tensor, greedy: bool, generator: torch.Generator | None, budget: int) -> int:
        """The next token from processed logits [V] (float32): the best (or a drawn) one that keeps the copy."""
        if greedy:
            finite = torch.isfinite(logits)
            for token in torch.argsort(logits, descending=True).tolist():  # usually found in the first few
                if not finite[token]:
                    break
                if self._take(token):
                    return token
        else:
            probs = logits.softmax(dim=-1)  # [V]
            while float(probs.sum()) > 0:
                token = int(torch.multinomial(probs, 1, generator=generator))
                if self._take(token):
                    return token
                probs[token] = 0.0
        if self.stop is None:
            raise LmstackError("copy mode needs a stop token to end the span")
        return self.stop  # no token continues the copy (a masked vocabulary): end the span here

    def _take(self, token: int) -> bool:
        if token in self.stop_ids:
            return self._can_stop()
        grown = self._grow(self.texts[token] if token < len(self.texts) else "")
        if grown is None:
            return False
        self.text, self.matches = grown
        return True


_SPACES = re.compile(r"\s+")


def _occurrences(text: str, part: str) -> Iterator[int]:
    at = text.find(part)
    while at >= 0:
        yield at
        at = text.find(part, at + 1)


def constraint_for(config: GenerationConfig, tokenizer: Tokenizer | None, texts: list[str] | None,
                   stop_ids: set[int]) -> Constraint | None:
    """The constraint a GenerationConfig asks for (json_mode, copy_from), given every token's text; or None."""
    if not (config.json_mode or config.copy_from):
        return None
    if tokenizer is None or texts is None:
        raise LmstackError("JSON and copy modes need a tokenizer")
    if config.json_mode:
        return JsonConstraint(tokenizer, texts)
    return CopyConstraint(config.copy_from, texts, stop_ids)


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """Every token's text decoded alone; special tokens decode to "" (skipped) and are never chosen."""
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
