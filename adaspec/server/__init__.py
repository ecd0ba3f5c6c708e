"""OpenAI-compatible HTTP server: `adaspec serve` (flags in serve.py).

Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events ending in
`data: [DONE]`, or not), GET /v1/models, /health (503 until the model and its step-time profile are
loaded, and while shutting down), /version, /metrics (Prometheus; names in metrics.py) and
/openapi.json, derived from protocol.py, so it is exactly what the server accepts.

Beyond OpenAI's fields a request may carry `top_k`, `ignore_eos` and `slo` ({"tpot_ms", "ttft_ms"},
overriding the server's --slo-* defaults field by field); a response (or a stream's last chunk)
carries `spec_stats` (drafted, accepted, steps, acceptance rate and length, per position) and `slo`
(objectives, measured TTFT/TPOT/E2E in ms, met or not). Not supported, and refused with a 400
naming the field: n > 1, batched prompts, logprobs, penalties, logit_bias, tools, response_format.
The chat fallback template (tokenizers without one) is described in openai_io.py.

Errors are OpenAI error objects ({"error": {"message", "type", "param", "code"}}): 400 for any
client mistake, 401 bad key (--api-key; /health, /version and /metrics stay open), 404 unknown
model, 503 with Retry-After when the waiting queue (--max-waiting) is full, 500 when the engine
failed that one request; a body over 16 MiB gets FastAPI's plain-text 413.

Layout: protocol.py (bodies), openai_io.py (prompts, sampling, responses, SSE), async_engine.py
(the engine on its own thread), metrics.py, app.py (routes, errors, auth), serve.py (uvicorn,
signals, `serve_in_thread` for tests and benchmarks).
"""

from adaspec.server.app import create_app

__all__ = ["create_app"]
