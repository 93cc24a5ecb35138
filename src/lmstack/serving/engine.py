"""What the server serves: the base model + LoRA adapters behind one Scheduler, and the sentence encoder.

`Engine.load()` does the slow part (weights, adapters, the cache pool); `serve` runs it before listening, and
an app over an engine that is not loaded answers 503 ("loading" or "failed") on /health and the API. Model
names follow OpenAI's `model` field: the base model's name, `base:adapter` for an adapter, and the embedding
model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL
from lmstack.errors import LmstackError


def served_name(model: str) -> str:
    """The name a model is served under: a registry name as is, a path by its file or folder name."""
    from lmstack.checkpoints import REGISTRY
    return model if model in REGISTRY else (Path(model).stem or model)


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`name=path` items -> {name: path}; each path must exist."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or ":" in name:
            raise LmstackError(f"--adapter {spec!r}: use NAME=PATH (NAME without ':')")
        if name in adapters:
            raise LmstackError(f"--adapter {name!r} is given twice")
        if not Path(path).is_dir():
            raise LmstackError(f"--adapter {name}: adapter folder not found: {path}")
        adapters[name] = Path(path)
    return adapters


@dataclass
class Engine:
    model: str  # registry name or path
    adapters: dict[str, Path] = field(default_factory=dict)
    embedding_model: str | None = DEFAULT_EMBEDDING_MODEL
    max_batch: int = 8
    context: int = 2048  # cache slots per row: prompt + completion
    dtype: str = "float32"
    state: str = "loading"  # "loading" | "ok" | "failed"
    detail: str | None = None

    def __post_init__(self) -> None:
        self.name = served_name(self.model)
        self.embedding_name = served_name(self.embedding_model) if self.embedding_model else None
        self.created = 0
        self.scheduler = None  # lmstack.serving.scheduler.Scheduler once loaded
        self.tokenizer = None
        self.embedder = None  # lmstack.embedding.Embedder once loaded: the one sentence embedder
        from lmstack.serving.metrics import Metrics
        self.metrics = Metrics()  # shared by the scheduler and the app's middleware

    def load(self) -> None:
        """Load everything; on failure `state` is "failed" and `detail` says why in one line."""
        import time

        from lmstack.checkpoints import load_model
        from lmstack.serving.lora import attach_adapters
        from lmstack.serving.scheduler import Scheduler
        try:
            # LoRA adapters wrap plain float q/k/v: with adapters the model stays float, unfused and unpacked
            loaded = load_model(self.model, dtype=self.dtype, quant="dequantize" if self.adapters else "auto",
                                inference=not self.adapters)
            if loaded.tokenizer is None:
                raise LmstackError(f"{self.model} has no tokenizer; serve needs one")
            self.context = min(self.context, loaded.model.config.max_seq_len)
            router = attach_adapters(loaded.model, self.adapters, loaded.tokenizer) if self.adapters else None
            self.tokenizer = loaded.tokenizer
            self.scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch=self.max_batch,
                                       context=self.context, router=router, metrics=self.metrics)
            if self.embedding_model:
                from lmstack.embedding import Embedder
                try:
                    self.embedder = Embedder(self.embedding_model)
                except LmstackError as e:
                    raise LmstackError(f"--embedding-model {e}") from None
            self.scheduler.prepare_token_texts()  # the token texts JSON and copy modes check, built once here
            self.scheduler.start()
            self.created = int(time.time())
            self.state = "ok"
        except Exception as e:  # LmstackError or a broken file: /health reports it
            self.state, self.detail = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()

    # ------------------------------------------------------------------------------------ names

    def model_ids(self) -> list[tuple[str, str]]:
        """(id, kind) of everything served."""
        ids = [(self.name, "chat")] + [(f"{self.name}:{a}", "adapter") for a in self.adapters]
        return ids + ([(self.embedding_name, "embedding")] if self.embedding_name else [])

    def adapter_index(self, model: str) -> int | None:
        """0 for the base model, i for the i-th adapter, None when `model` is not a generation model."""
        if model == self.name:
            return 0
        base, _, adapter = model.partition(":")
        if base == self.name and adapter in self.adapters:
            return list(self.adapters).index(adapter) + 1
        return None
