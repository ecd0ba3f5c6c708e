"""`adaspec serve`: flags (vLLM's names where vLLM has the flag) and the uvicorn runner.

    adaspec serve --model PATH --draft-model PATH --policy adaspec --num-speculative-tokens 8 \
        --slo-tpot-ms 50 --host 127.0.0.1 --port 8000 [--api-key KEY]

SIGINT/SIGTERM: stop admitting (new requests get 503, the listening socket closes), let in-flight
requests finish for up to --shutdown-timeout seconds, abort the rest, exit 0. A second SIGINT
forces the exit. The model loads after the port opens; /health says 503 until it is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time

from adaspec.cli import add_engine_args, engine_kwargs


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("ADASPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ADASPEC_API_KEY)")
    s.add_argument("--served-model-name", nargs="+",
                   help="names clients use as `model` (default: the --model argument)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a batch slot; beyond it, 503 with Retry-After")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--save-telemetry", help="at shutdown, write the engine's per-step records (JSONL; "
                   "`adaspec simulate --acceptance empirical:FILE` reads it)")
    s.add_argument("--save-decisions", help="at shutdown, write the policy's decision log (JSONL), if it "
                   "keeps one")
    s.add_argument("--decision-log-size", type=int, default=5_000,
                   help="steps the decision log keeps (the last ones)")
    s.set_defaults(fn=cmd_serve)
    return s


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from adaspec.server.app import create_app

    for name in ("slo_tpot_ms", "slo_ttft_ms"):
        v = getattr(a, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= a.port <= 65535:
        raise ValueError("--port must be in [0, 65535]")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {**engine_kwargs(a), "decision_log_size": a.decision_log_size}
    app = create_app(kwargs, a.served_model_name, a.api_key, a.max_waiting,
                     on_fatal=lambda: setattr(server, "should_exit", True))
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                            timeout_graceful_shutdown=a.shutdown_timeout)
    server = draining_server(config)
    server.run()
    save_records(app.state.adaspec.engine, a.save_telemetry, a.save_decisions)
    return 1 if app.state.adaspec.load_error else 0


def save_records(async_engine, telemetry_path: str | None, decisions_path: str | None) -> None:
    """Write what the engine and its policy recorded, for analysis and simulation after a run."""
    if async_engine is None:
        return
    engine = async_engine.engine
    if telemetry_path:
        engine.export_telemetry(telemetry_path)
    log = getattr(engine.policy, "log", None)
    if decisions_path and log is not None:
        log.to_jsonl(decisions_path)


def draining_server(config):
    """A uvicorn.Server that marks the app draining on the first signal and exits 0 afterwards
    (uvicorn itself re-raises the captured signal once shut down: exit status 128 + n)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            config.app.state.adaspec.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer(config)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0,
                    wait_ready: bool = True):
    """Run `app` under uvicorn on a background thread (tests, benchmarks); yields the base URL once
    /health is ready (or, without `wait_ready`, once it answers at all), and stops the server (in-flight
    requests finish first) on exit."""
    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200 or not wait_ready:
                    break
            except httpx.TransportError:
                pass
            st = app.state.adaspec
            if (st.load_error and wait_ready) or not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready: {st.load_error or 'timeout'}")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
