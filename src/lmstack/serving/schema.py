"""OpenAI-compatible request and response models (pydantic), which also make the server's OpenAPI schema.

Requests forbid unknown fields and non-finite numbers, as OpenAI's API does; `top_k` and `repetition_penalty`
are lmstack extensions. Parameters OpenAI has but this server does not implement (presence/frequency
penalties, logit_bias, echo, suffix, json_schema) are accepted at their neutral values only and refused
otherwise with a 400 that names them (`unsupported` below), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 4
MAX_TEXT = 1_000_000  # characters in one string field; the body size limit is the real bound


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ requests


class TextPart(Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[TextPart], Field(max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


StopField = (Annotated[str, Field(min_length=1, max_length=256)]
             | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP)]
             | None)


class SamplingRequest(Strict):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # default 1, as OpenAI
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: StopField = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=300)] | None = None
    user: Annotated[str, Field(max_length=512)] | None = None
    response_format: ResponseFormat | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None  # extension
    repetition_penalty: Annotated[float, Field(gt=0, le=100)] | None = None  # extension

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first parameter set to a value this server does not implement, or None."""
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.response_format is not None and self.response_format.type == "json_schema":
            return "response_format"
        return None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Sent by the official client and common frameworks. `store`, `metadata` and `service_tier` are accepted
    # and ignored (nothing is stored; there is one tier). Tool calling is not implemented yet: no tools, or
    # tool_choice "none"/"auto" without tools, is a plain chat; real tools get a 400 (`unsupported`).
    store: bool | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    parallel_tool_calls: bool | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        return super().unsupported()


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: (Annotated[str, Field(max_length=MAX_TEXT)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(min_length=1, max_length=128)]
             | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=128)])
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()


class EmbeddingRequest(Strict):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    # Empty input ("" or []) passes here and is refused by the route with a 400, as OpenAI does.
    input: (Annotated[str, Field(max_length=MAX_TEXT)]
            | Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(max_length=2048)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=512)] | None = None


class FeedbackRequest(Strict):
    """A preference record for reward-model training: A-vs-B (chosen + rejected) or a thumbs rating of one
    reply (rating 1 with `chosen`, rating -1 with `rejected`)."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    model: Annotated[str, Field(min_length=1, max_length=512)]
    chosen: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    rejected: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    rating: Literal[-1, 1] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        if self.rating is None and (self.chosen is None or self.rejected is None):
            raise ValueError("a preference needs chosen and rejected, or a rating")
        if self.rating == 1 and (self.chosen is None or self.rejected is not None):
            raise ValueError("rating 1 (thumbs up) goes with chosen only")
        if self.rating == -1 and (self.rejected is None or self.chosen is not None):
            raise ValueError("rating -1 (thumbs down) goes with rejected only")
        return self


# ----------------------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["chat", "adapter", "embedding", "rag"]  # extension: what the model serves


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackSaved(BaseModel):
    id: str
    saved: bool


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    detail: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
