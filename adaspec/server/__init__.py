"""OpenAI-compatible HTTP server: `adaspec serve` (see serve.py for flags, app.py for routes).

Layout: protocol.py (request/response models, hence the OpenAPI schema at /openapi.json),
openai_io.py (prompts, sampling, responses, server-sent events), async_engine.py (the engine on its
own thread), metrics.py (Prometheus), app.py (routes, errors, auth), serve.py (uvicorn, signals).
"""

from adaspec.server.app import create_app

__all__ = ["create_app"]
