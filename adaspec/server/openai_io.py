"""Between OpenAI bodies and the engine: prompts, sampling parameters, responses and SSE chunks.

Chat prompts use the tokenizer's chat template when it has one (`add_generation_prompt=True`,
tokenized without extra special tokens, as vLLM does). Without one the documented fallback is

    system: You are terse.
    user: Hi
    assistant:

one `role: content` line per message (the `developer` role is rendered as `system`; a list of text
parts is joined with newlines), then `assistant:`, tokenized like a completion prompt.
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import StreamingResponse

from adaspec.engine.sampling import SamplingParams
from adaspec.engine.sequence import SLO
from adaspec.server.async_engine import RequestStream, Update
from adaspec.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionResponse,
    Delta,
    ErrorDetail,
    ErrorResponse,
)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def message_text(m: ChatMessage) -> str:
    return m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)


def render_chat(tokenizer, messages: list[ChatMessage]) -> tuple[str, bool]:
    """(prompt text, whether tokenizing it should add special tokens)."""
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
            for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), False
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", True


def tokenize(tokenizer, body, chat: bool, vocab_size: int) -> tuple[list[int], str]:
    """Prompt token ids and the text to echo (runs on the tokenizer worker thread)."""
    param = "messages" if chat else "prompt"
    if chat:
        try:
            text, special = render_chat(tokenizer, body.messages)
        except Exception as exc:  # noqa: BLE001 - a template refusing the conversation is a 400
            raise BadRequest(f"messages: the chat template failed: {exc}", param) from None
    elif isinstance(body.prompt, list):
        bad = next((t for t in body.prompt if t >= vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt: token id {bad} is out of range [0, {vocab_size})", param)
        echo = tokenizer.decode(body.prompt) if body.echo else ""
        return list(body.prompt), echo
    else:
        text, special = body.prompt, True
    try:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
        raise BadRequest(f"{param}: cannot be tokenized ({type(exc).__name__})", param) from None
    if not ids:
        raise BadRequest(f"{param}: the prompt encodes to no tokens", param)
    return ids, (text if not chat and body.echo else "")


def sampling(body, num_prompt: int, max_model_len: int, default_slo: SLO,
             chat: bool) -> tuple[SamplingParams, SLO | None]:
    """Engine parameters for a request, with the context-length checks vLLM makes."""
    param = "messages" if chat else "prompt"
    if num_prompt >= max_model_len:
        raise BadRequest(f"{param}: the prompt has {num_prompt} tokens but max_model_len is "
                         f"{max_model_len} (prompt too long)", param, "context_length_exceeded")
    room = max_model_len - num_prompt
    name, asked = "max_tokens", body.max_tokens
    if chat and body.max_completion_tokens is not None:
        name, asked = "max_completion_tokens", body.max_completion_tokens
    if asked is None:
        max_tokens = room if chat else min(16, room)
    elif asked > room:
        raise BadRequest(f"{name}: {asked} output tokens requested, but the prompt ({num_prompt} tokens) "
                         f"leaves room for {room} within max_model_len={max_model_len}", name,
                         "context_length_exceeded")
    else:
        max_tokens = asked
    try:
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k, max_tokens=max_tokens, stop=body.stop,
            seed=body.seed, ignore_eos=bool(body.ignore_eos))
    except ValueError as exc:  # the protocol's ranges should have caught it; name the field anyway
        raise BadRequest(str(exc), str(exc).split()[0]) from None
    slo = None
    if body.slo is not None:
        tpot, ttft = body.slo.tpot_ms, body.slo.ttft_ms
        slo = SLO(default_slo.tpot if tpot is None else tpot / 1e3,
                  default_slo.ttft if ttft is None else ttft / 1e3)
    return params, slo


def holdback(params: SamplingParams) -> int:
    """Characters a stream keeps unsent: they may start a stop string, which the engine cuts off."""
    return max((len(s) for s in params.stop_strings), default=1) - 1


class Formatter:
    """Builds one request's response, or its server-sent events, from engine updates."""

    def __init__(self, request_id: str, model: str, chat: bool, echo: str, body, stop_holdback: int):
        self.id, self.model, self.chat, self.echo = request_id, model, chat, echo
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.holdback = stop_holdback
        self.created = int(time.time())

    @staticmethod
    def usage(stream: RequestStream, up: Update) -> dict:
        p, c = stream.num_prompt_tokens, up.num_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def response(self, stream: RequestStream, up: Update) -> dict:
        common = dict(id=self.id, created=self.created, model=self.model, usage=self.usage(stream, up),
                      spec_stats=up.spec_stats, slo=up.slo)
        if self.chat:
            choice = ChatChoice(message=AssistantMessage(content=up.text), finish_reason=up.finish_reason)
            return ChatCompletionResponse(choices=[choice], **common).model_dump(mode="json")
        choice = CompletionChoice(text=self.echo + up.text, finish_reason=up.finish_reason)
        return CompletionResponse(choices=[choice], **common).model_dump(mode="json")

    def chunk(self, text: str | None, finish: str | None = None, up: Update | None = None,
              role: bool = False, usage: dict | None = None) -> str:
        extra = dict(spec_stats=up.spec_stats, slo=up.slo) if up is not None else {}
        common = dict(id=self.id, created=self.created, model=self.model, usage=usage, **extra)
        if self.chat:
            choices = [] if usage else [ChatChunkChoice(
                delta=Delta(role="assistant" if role else None, content=text), finish_reason=finish)]
            msg = ChatCompletionChunk(choices=choices, **common)
        else:
            choices = [] if usage else [CompletionChoice(text=text or "", finish_reason=finish)]
            msg = CompletionResponse(choices=choices, **common)
        return f"data: {msg.model_dump_json()}\n\n"

    async def sse(self, stream: RequestStream):
        """Chunks as tokens are accepted; a failure mid-stream is an `error` event (the status line
        is already sent); always ends with `data: [DONE]`."""
        if self.chat:
            yield self.chunk("", role=True)
        elif self.echo:
            yield self.chunk(self.echo)
        sent = 0
        async for up in stream.updates():
            text = up.text if up.finished else up.text[:len(up.text) - self.holdback]
            if len(text) > sent:
                yield self.chunk(text[sent:])
                sent = len(text)
            if not up.finished:
                continue
            if up.finish_reason in ("error", "abort"):
                msg = (f"request failed: {up.error}" if up.finish_reason == "error"
                       else "request aborted: the server is shutting down")
                err = ErrorDetail(message=msg, type="server_error", code=up.finish_reason)
                yield f"data: {ErrorResponse(error=err).model_dump_json()}\n\n"
            else:
                yield self.chunk("" if not self.chat else None, up.finish_reason, up)
                if self.include_usage:
                    yield self.chunk(None, usage=self.usage(stream, up))
        yield "data: [DONE]\n\n"


class EngineStreamResponse(StreamingResponse):
    """An SSE response that aborts its request however the stream ends early. Under uvicorn
    (ASGI spec 2.3) Starlette listens for the disconnect and cancels the stream at once, so a
    vanished client, even one still waiting in the queue, frees its KV slot within a step."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def unless_disconnected(request, aw):
    """Await `aw`, or return None as soon as the client disconnects (non-streaming requests)."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    return work.result() if work.done() and not work.cancelled() else None


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
