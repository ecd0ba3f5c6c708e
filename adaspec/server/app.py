"""The FastAPI app: OpenAI-compatible routes over `AsyncEngine`, plus health, version and metrics.

    app = create_app(engine)                         # an LLMEngine, ready at once
    app = create_app({"model": ..., "policy": ...})  # build_engine kwargs, loaded after start-up

With kwargs the model loads on the engine thread after the server starts, so `/health` answers 503
("loading") until it is ready. Every error is an OpenAI error object; only a fault of the server
or the engine is a 5xx (a body over 16 MiB gets FastAPI's plain-text 413).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import adaspec
from adaspec.engine.engine import LLMEngine
from adaspec.server import openai_io as io
from adaspec.server.async_engine import AsyncEngine, EngineStopped, Overloaded
from adaspec.server.metrics import ServerMetrics
from adaspec.server.protocol import (
    REQUEST_FIELDS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger("adaspec.server")
MAX_BODY = 16 << 20  # bytes, far above any prompt that fits; FastAPI answers 413 (plain text) past it


class APIError(Exception):
    """Answer the request with an OpenAI error object (and count it under `outcome`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, outcome: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.outcome = headers, outcome


def error_json(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    err = {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
           "param": param, "code": code}
    return JSONResponse({"error": err}, status_code=status, headers=headers)


class ServerState:
    """What the routes share: the engine (once loaded), names, key, metrics, tokenizer worker."""

    def __init__(self, source, names: list[str], api_key: str | None, max_waiting: int, on_fatal=None):
        self.source, self.names, self.api_key, self.max_waiting = source, names, api_key, max_waiting
        self.on_fatal = on_fatal
        k = source.K if isinstance(source, LLMEngine) else (source or {}).get("num_speculative_tokens", 8)
        self.metrics = ServerMetrics(k)
        self.engine: AsyncEngine | None = None  # set once the engine is ready
        self._engine_thread: AsyncEngine | None = None  # the engine thread, from start-up on
        self.tokenizer = None
        self.load_error: str | None = None
        self.draining = False
        self.closed = False
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        # Tokenization and chat templates run here: off the event loop, on a private tokenizer copy
        # (HF fast tokenizers are not safe to share with the engine thread's detokenizer).
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="adaspec-tok")

    def start(self) -> None:
        """Start the engine thread; with build_engine kwargs the model loads on that thread (one
        thread for every torch call, see `async_engine`), and /health answers 503 until it is ready."""
        if isinstance(self.source, LLMEngine):
            engine, build = self.source, None
        else:
            from adaspec.llm import build_engine

            engine, build = None, functools.partial(build_engine, **self.source)
        self._engine_thread = AsyncEngine(engine, self.max_waiting, observer=self.metrics)
        self._engine_thread.start(self.loop, build, self._attach, self._failed)

    def _attach(self, engine: LLMEngine) -> None:
        """On the engine thread, once the engine exists: the routes may use it from now on."""
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is still usable here
            self.tokenizer = engine.tokenizer
        self.engine = self._engine_thread
        log.info("ready: %s, policy %s", self.names[0], engine.policy.name)

    def _failed(self, exc: Exception) -> None:
        self.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model load failed: %s", self.load_error)
        if self.on_fatal is not None:
            self.on_fatal()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def check_ready(self) -> None:
        if self.draining or self.closed:
            raise APIError(503, "the server is shutting down", outcome="unavailable")
        if self.engine is None or not self.engine.alive:
            msg = (f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
                   if self.engine is None else "the engine has stopped")
            raise APIError(503, msg, outcome="unavailable", headers={"Retry-After": "5"})

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            return self.names[0]
        if name not in self.names:  # matched against served names only, never used as a path
            raise APIError(404, f"The model `{name}` does not exist; served: {', '.join(self.names)}",
                           "model", "model_not_found", outcome="not_found")
        return name

    async def close(self) -> None:
        self.draining = self.closed = True
        if self._engine_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._engine_thread.stop)
        self.tok_pool.shutdown(wait=False, cancel_futures=True)


class APIKeyMiddleware:
    """The bearer key on /v1, checked before the body is parsed (a bad body from a stranger is a 401)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            key = self.state.api_key
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if key and (scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode())):
                self.state.metrics.rejected("auth")
                resp = error_json(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                                  None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def param_of(error: dict) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content' (union tags dropped);
    for an unknown field, its own name."""
    loc = list(error.get("loc", ()))
    loc = loc[1:] if loc and loc[0] == "body" else loc
    out = ""
    for i, part in enumerate(loc):
        last_unknown = error.get("type") == "extra_forbidden" and i == len(loc) - 1
        if isinstance(part, int) and out:
            out += f"[{part}]"
        elif isinstance(part, str) and (part in REQUEST_FIELDS or last_unknown):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def create_app(engine: LLMEngine | dict | None = None, served_model_names: list[str] | str | None = None,
               api_key: str | None = None, max_waiting: int = 256, on_fatal=None) -> FastAPI:
    """`engine`: an LLMEngine, or build_engine kwargs (None: the embedded default pair)."""
    if engine is None:
        engine = {}
    if isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    if not served_model_names:
        model = None if isinstance(engine, LLMEngine) else engine.get("model")
        served_model_names = [str(model) if model else "adaspec-default"]
    if max_waiting < 1:
        raise ValueError("max_waiting must be >= 1")
    st = ServerState(engine, list(served_model_names), api_key, max_waiting, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.loop = asyncio.get_running_loop()
        st.start()
        try:
            yield
        finally:
            await st.close()

    app = FastAPI(title="adaspec", version=adaspec.__version__, lifespan=lifespan, max_body_size=MAX_BODY,
                  description="OpenAI-compatible LLM serving with adaptive, SLO-aware speculative decoding")
    app.state.adaspec = st
    app.add_middleware(APIKeyMiddleware, state=st)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.outcome:
            st.metrics.rejected(exc.outcome)
        return error_json(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        st.metrics.rejected("invalid")
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            err = (first.get("ctx") or {}).get("error", "")
            return error_json(400, f"Malformed JSON body: {err} (at position {first['loc'][-1]})",
                              None, "invalid_json")
        param = param_of(first)
        msgs = [e["msg"] for e in errs if param_of(e) == param][:3]
        where = f"{param}: " if param else "request body: "
        return error_json(400, where + "; or ".join(msgs), param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_json(500, f"internal server error: {type(exc).__name__}: {exc}")

    errors = {400: {"model": ErrorResponse, "description": "invalid request (the field is in `param`)"},
              401: {"model": ErrorResponse, "description": "wrong or missing API key"},
              404: {"model": ErrorResponse, "description": "unknown model"},
              500: {"model": ErrorResponse, "description": "the request failed in the engine"},
              503: {"model": ErrorResponse, "description": "overloaded (see Retry-After), loading or "
                                                           "shutting down"}}
    sse = {"text/event-stream": {"schema": {"type": "string", "description": "with stream=true: "
                                            "`data: {chunk}` events, then `data: [DONE]`"}}}

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": sse}, **errors})
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": sse}, **errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(request, body, chat=True)

    async def generate(request: Request, body, chat: bool):
        arrival = time.perf_counter()
        st.check_ready()
        model = st.resolve_model(body.model)
        eng = st.engine.engine
        try:
            ids, echo = await st.loop.run_in_executor(st.tok_pool, io.tokenize, st.tokenizer, body, chat,
                                                      eng.vocab_size)
            params, slo = io.sampling(body, len(ids), eng.max_model_len, eng.default_slo, chat)
        except io.BadRequest as exc:
            raise APIError(400, str(exc), exc.param, exc.code, outcome="invalid") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            stream = await st.engine.add(rid, ids, params, slo, arrival)
        except Overloaded as exc:
            raise APIError(503, f"server overloaded: {exc}; retry later", code="overloaded",
                           headers={"Retry-After": "1"}, outcome="overload") from None
        except EngineStopped as exc:
            raise APIError(503, str(exc), outcome="unavailable") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "messages" if chat else "prompt", outcome="invalid") from None
        fmt = io.Formatter(rid, model, chat, echo, body, stop_holdback=io.holdback(params))
        if body.stream:
            return io.EngineStreamResponse(fmt.sse(stream), on_close=lambda: st.engine.abort(rid))
        final = None
        try:
            final = await io.unless_disconnected(request, stream.final())
        finally:
            if final is None:
                st.engine.abort(rid)
        if final is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        if final.finish_reason == "error":
            raise APIError(500, f"request failed: {final.error}", code="engine_error")
        if final.finish_reason == "abort":
            raise APIError(503, "request aborted: the server is shutting down", code="aborted")
        return JSONResponse(fmt.response(stream, final))

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        st.check_ready()
        eng = st.engine.engine
        return ModelList(data=[ModelCard(id=n, created=st.created, max_model_len=eng.max_model_len,
                                         policy=eng.policy.name) for n in st.names])

    @app.get("/health", responses={503: {"description": "loading, failed or shutting down"}})
    async def health():
        if st.ready:
            return {"status": "ok"}
        status = ("shutting_down" if st.draining else "failed" if st.load_error else "loading")
        return JSONResponse({"status": status, "error": st.load_error}, status_code=503)

    @app.get("/version")
    async def version():
        return {"version": adaspec.__version__}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi():
        """FastAPI's schema, minus its 422 (validation errors are 400 here), plus the bearer key."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema["paths"].values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            if api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    if path.startswith("/v1"):
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
