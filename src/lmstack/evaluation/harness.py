"""lmstack as an lm-evaluation-harness model: `LmstackLM`, registered under the name `lmstack`.

    python -m lmstack.evaluation.harness run --model lmstack \\
        --model_args pretrained=smollm2-135m-instruct,batch_size=8 --tasks my_task --include_path tasks/

lm-eval finds models only in its own registry and has no plugin entry point for them, so the registration
happens when this module is imported; running the module is lm-eval's own CLI with `lmstack` registered
(the `lmstack-lm-eval` script does the same). In Python, `import lmstack.evaluation.harness` and then
`lm_eval.simple_evaluate(model="lmstack", ...)`.

Log-likelihoods come from the same batched `Scorer` that `lmstack eval` uses, and the tokenization follows
lm-eval's TemplateLM (which this class extends), so the requests are the ones the HF backend builds;
generations come from `lmstack.generation.Generator`.
"""

from __future__ import annotations

from typing import Any

from lmstack.checkpoints.registry import DEFAULT_MODEL
from lmstack.errors import LmstackError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - the message is the point
    raise LmstackError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lmstack[eval]'") from None


@register_model("lmstack")
class LmstackLM(TemplateLM):
    """An lmstack model (registry name, GGUF, HF or native folder), optionally with a PEFT adapter."""

    def __init__(self, pretrained: Any = DEFAULT_MODEL, adapter: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, **_: Any) -> None:
        """pretrained: a registry name or checkpoint path (`--model_args pretrained=...`), or in Python an
        already loaded `lmstack.evaluation.runner.EvalModel`."""
        super().__init__()
        from lmstack.evaluation.runner import EvalModel, load_eval_model
        from lmstack.evaluation.scoring import Scorer
        from lmstack.generation import Generator
        self.em = pretrained if isinstance(pretrained, EvalModel) else load_eval_model(str(pretrained), adapter, dtype)
        if self.em.tokenizer is None:
            raise LmstackError(f"{pretrained} has no tokenizer; lm-eval sends text")
        self.tokenizer = self.em.tokenizer
        self._max_length = int(max_length) if max_length else self.em.context
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(self.em.model, self.tokenizer, batch_size=self.batch_size, max_length=self._max_length)
        self.generator = Generator(self.em.model, self.tokenizer)

    # ------------------------------------------------------------------------- TemplateLM contract

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        # HFLM adds no special tokens for causal models unless asked (add_bos_token=False by default).
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_ids, continuation_ids)] -> [(logprob, is_greedy)]."""
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], desc="lmstack loglikelihood")
        answers = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods, in disjoint windows of the model's context (as HFLM computes them)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.score(windows, desc="lmstack rolling")
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or seeded sampling) continuations that stop at the request's `until` strings."""
        from lmstack.generation import GenerationConfig
        outputs: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # requests with the same settings generate in one batch
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            cfg = GenerationConfig(max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                                   temperature=temperature, top_p=kwargs.pop("top_p", None),
                                   top_k=kwargs.pop("top_k", None), stop=[u for u in until if u])
            for s in range(0, len(indices), self.batch_size):
                batch = indices[s:s + self.batch_size]
                results = self.generator.generate_batch([requests[i].args[0] for i in batch], cfg)
                for i, res in zip(batch, results):
                    outputs[i] = res.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, res.text)
        return outputs


def main() -> None:
    """lm-eval's command line, with the `lmstack` model registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
