"""OpenAI-compatible request and response bodies (the OpenAPI schema is derived from these).

Requests are strict: no type coercion ("10" is not an int, true is not a number), no NaN or
infinity, and unknown fields are refused. A sampling control the server silently ignored (say
`logprobs` or `presence_penalty`) would hand the client results it did not ask for, so it is a 400
naming the field instead. `null` means "the default" wherever OpenAI allows it.

Extensions over OpenAI's API, all optional: `top_k`, `ignore_eos` and `slo` in requests;
`spec_stats` and `slo` in responses (and in the last streamed chunk).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP = 16
MS_MAX = 3.6e6  # one hour: anything larger is a client mistake, not an objective

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SLORequest(Strict):
    """Per-request SLO in milliseconds; a field left out (or null) keeps the server's default."""

    tpot_ms: float | None = Field(None, gt=0, le=MS_MAX, description="time per output token objective")
    ttft_ms: float | None = Field(None, gt=0, le=MS_MAX, description="time to first token objective")


class StreamOptions(Strict):
    include_usage: bool | None = None


class SamplingRequest(Strict):
    """Fields shared by completions and chat completions (names and ranges as in OpenAI / vLLM)."""

    model: str | None = Field(None, description="a served model name (GET /v1/models); null: the first")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: disabled")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = Field(None, description="only 1 is supported")
    user: str | None = None
    slo: SLORequest | None = None


class CompletionRequest(SamplingRequest):
    prompt: NonEmptyStr | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="one prompt: text or token ids (batched prompts are not supported)")
    echo: bool | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens")


# ----------------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecStats(BaseModel):
    """Speculation statistics of this request (acceptance_length = 1 + accepted / steps)."""

    drafted: int
    accepted: int
    steps: int
    spec_steps: int
    acceptance_rate: float
    acceptance_length: float
    accepted_per_position: list[int]
    drafted_per_position: list[int]


class SLOReport(BaseModel):
    """Objectives applied (ms), what the server measured (ms, arrival to first token / finish),
    and whether each objective was met (null when unset or undefined, e.g. TPOT of 1 token)."""

    tpot_ms: float | None = None
    ttft_ms: float | None = None
    measured_ttft_ms: float | None = None
    measured_tpot_ms: float | None = None
    measured_e2e_ms: float | None = None
    ttft_met: bool | None = None
    tpot_met: bool | None = None
    met: bool | None = Field(None, description="every set objective met; null when none is set")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    spec_stats: SpecStats | None = None
    slo: SLOReport | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    spec_stats: SpecStats | None = None
    slo: SLOReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    spec_stats: SpecStats | None = None
    slo: SLOReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaspec"
    max_model_len: int
    policy: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Every field name a request may carry: the validation-error handler walks error locations through
# these to name the offending field ("messages[0].content", "slo.tpot_ms") without pydantic's
# union-member tags ("str", "list[int]").
REQUEST_FIELDS = frozenset().union(*(m.model_fields for m in (
    CompletionRequest, ChatCompletionRequest, SLORequest, StreamOptions, ChatMessage, TextPart)))
