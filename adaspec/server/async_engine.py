"""The engine on its own thread, fed from the event loop.

`LLMEngine` is single-threaded, so exactly one thread (this module's) ever touches it. Handlers
post commands (add, abort) into an inbox and never wait on a model step; the engine thread drains
the inbox between steps and hands a step's results back in one `loop.call_soon_threadsafe`
(`_deliver`). Each request keeps only its latest snapshot (text so far, token count, final
statistics), so a slow client costs memory for one string, never a stalled batch or an
ever-growing queue.

Given a `build` function, the engine thread also builds the engine (load, start-up profile): every
torch call of the server then runs on one thread. OpenMP keeps a thread team per calling thread, and
a second team on this 2-core host made each forward 3-4x slower (batch-1 decode 7.4-8.1 ms a step
against 2.0; `docs/server_threads.md`), and the start-up profile, timed on the first team, described
a different machine from the one the engine ran on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from adaspec.engine.engine import LLMEngine
from adaspec.engine.sampling import SamplingParams
from adaspec.engine.sequence import SLO, Sequence, Status

log = logging.getLogger("adaspec.server")


class Overloaded(Exception):
    """The bounded waiting queue is full."""


class EngineStopped(Exception):
    """The engine thread is stopping or gone."""


@dataclass(frozen=True)
class Update:
    """A request's state after an engine step; stats and slo are set once it finishes."""

    text: str
    num_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    spec_stats: dict | None = None
    slo: dict | None = None


class RequestStream:
    """The event-loop side of one request: the latest Update and an event that signals a new one."""

    def __init__(self, request_id: str, num_prompt_tokens: int):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.latest = Update("", 0)
        self._event = asyncio.Event()

    def put(self, update: Update) -> None:
        if not self.latest.finished:
            self.latest = update
            self._event.set()

    async def updates(self):
        """Yield snapshots as they arrive (several steps may coalesce into one); ends when finished."""
        while True:
            await self._event.wait()
            self._event.clear()
            up = self.latest
            yield up
            if up.finished:
                return

    async def final(self) -> Update:
        async for up in self.updates():
            if up.finished:
                return up
        raise AssertionError("unreachable")


def slo_report(seq: Sequence) -> dict:
    """Objectives and measured latencies (ms) of a finished request; a failed one misses its SLO."""
    ms = 1e3
    ttft = None if seq.first_token_time is None else (seq.first_token_time - seq.arrival_time) * ms
    tpot = None
    if seq.first_token_time is not None and seq.finish_time is not None and seq.num_output_tokens > 1:
        tpot = (seq.finish_time - seq.first_token_time) / (seq.num_output_tokens - 1) * ms
    e2e = None if seq.finish_time is None else (seq.finish_time - seq.arrival_time) * ms
    ok = seq.finish_reason in ("stop", "length")
    rep = {"tpot_ms": None if seq.slo.tpot is None else seq.slo.tpot * ms,
           "ttft_ms": None if seq.slo.ttft is None else seq.slo.ttft * ms,
           "measured_ttft_ms": ttft, "measured_tpot_ms": tpot, "measured_e2e_ms": e2e}
    if rep["ttft_ms"] is not None:
        rep["ttft_met"] = ok and ttft is not None and ttft <= rep["ttft_ms"]
    if rep["tpot_ms"] is not None:
        rep["tpot_met"] = (tpot <= rep["tpot_ms"]) if (ok and tpot is not None) else (None if ok else False)
    checks = [rep[k] for k in ("ttft_met", "tpot_met") if rep.get(k) is not None]
    has_slo = rep["ttft_ms"] is not None or rep["tpot_ms"] is not None
    rep["met"] = (ok and all(checks)) if has_slo else None
    return rep


@dataclass
class _Live:
    seq: Sequence
    stream: RequestStream
    waiting: bool = True  # counted in AsyncEngine.num_queued


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    slo: SLO | None
    arrival: float
    stream: RequestStream
    ack: asyncio.Future = field(repr=False)


class AsyncEngine:
    """Owns the engine thread. `observer` (metrics) gets `finished(seq, report)`, `step(record)` and
    `tick(engine, num_queued)` calls, all on the engine thread."""

    def __init__(self, engine: LLMEngine | None, max_waiting: int = 256, observer=None):
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._queued = 0
        self._live: dict[str, _Live] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_record = None
        self._outbox: list[tuple[RequestStream, Update]] = []  # updates not yet handed over (_deliver)

    # ------------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop, build=None, on_ready=None, on_error=None) -> None:
        """Start the engine thread. build: makes the engine on that thread (the engine given to the
        constructor is then None); on_ready(engine) runs there once it exists, before any request is
        served; on_error(exc) if build raised (the thread then ends)."""
        if (build is None) == (self.engine is None):
            raise ValueError("give AsyncEngine either an engine or a build function")
        self._loop = loop
        self._thread = threading.Thread(target=self._main, args=(build, on_ready, on_error),
                                        name="adaspec-engine", daemon=True)
        self._thread.start()

    @property
    def num_queued(self) -> int:
        """Requests admitted but not yet running (inbox plus the engine's waiting queue)."""
        return self._queued

    @property
    def alive(self) -> bool:
        return (self.engine is not None and self._thread is not None and self._thread.is_alive()
                and not self._stopping)

    async def add(self, request_id: str, prompt: list[int], params: SamplingParams, slo: SLO | None,
                  arrival: float) -> RequestStream:
        """Queue a request. Raises Overloaded when the waiting queue is full, ValueError when the
        engine refuses it, EngineStopped when shutting down. Cancelling the caller aborts it."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        with self._lock:
            if self._queued >= self.max_waiting:
                raise Overloaded(f"waiting queue is full ({self.max_waiting} requests)")
            self._queued += 1
        stream = RequestStream(request_id, len(prompt))
        ack = self._loop.create_future()
        self._post(_Add(request_id, prompt, params, slo, arrival, stream, ack))
        try:
            await ack
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op once finished); its cache slot is freed before the next step."""
        self._post(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, fail pending adds and join the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while self._inbox:  # adds posted after the thread's last look
            item = self._inbox.popleft()
            if isinstance(item, _Add):
                self._call(_settle, item.ack, EngineStopped("the server is shutting down"))

    def _post(self, item) -> None:
        self._inbox.append(item)
        self._wake.set()

    # ------------------------------------------------------------------ engine-thread side

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def _unqueue(self, n: int = 1) -> None:
        with self._lock:
            self._queued -= n

    def _main(self, build, on_ready, on_error) -> None:
        if build is not None:
            try:
                engine = build()
            except Exception as exc:  # noqa: BLE001 - reported by on_error (health, serve command)
                if on_error is not None:
                    on_error(exc)
                return
            self.engine = engine
        if on_ready is not None:
            on_ready(self.engine)
        self._run()

    def _run(self) -> None:
        while True:
            try:
                self._wake.clear()
                self._drain()
                if self._stopping:
                    self._shutdown()
                    return
                if not self.engine.has_unfinished():
                    self._wake.wait(1.0)
                    continue
                try:
                    seqs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep the server up
                    log.exception("engine step failed")
                    seqs = self._fail_running(f"{type(exc).__name__}: {exc}")
                self._publish(seqs)
                self._sweep()
            except Exception:  # noqa: BLE001 - a bug here must not silently kill serving
                log.exception("engine thread error")
                time.sleep(0.01)

    def _drain(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, _Add):
                self._admit(item)
            else:
                live = self._live.get(item[1])
                if live is not None and self.engine.abort_request(item[1]):
                    self._publish([live.seq])
        self._sweep()

    def _admit(self, a: _Add) -> None:
        if a.ack.cancelled() or self._stopping:
            self._unqueue()
            self._call(_settle, a.ack, EngineStopped("the server is shutting down"))
            return
        try:
            seq = self.engine.add_request(a.prompt, a.params, a.request_id, a.slo, a.arrival)
        except Exception as exc:  # noqa: BLE001 - ValueError: bad request; anything else: reported
            self._unqueue()
            self._call(_settle, a.ack, exc)
            return
        self._live[a.request_id] = _Live(seq, a.stream)
        self._call(_settle, a.ack, None)

    def _publish(self, seqs) -> None:
        for seq in seqs:
            live = self._live.get(seq.request_id)
            if live is None:
                continue
            if seq.finished:
                self._finish(live)
            else:
                self._outbox.append((live.stream, Update(seq.text, seq.num_output_tokens)))

    def _finish(self, live: _Live) -> None:
        seq = live.seq
        self._live.pop(seq.request_id, None)
        if live.waiting:
            live.waiting = False
            self._unqueue()
        report = slo_report(seq)
        if self.observer is not None:  # metrics first: a client that saw its answer sees it counted
            self._observe("finished", seq, report)
            self._observe("tick", self.engine, self._queued)
        self._outbox.append((live.stream, Update(seq.text, seq.num_output_tokens, True, seq.finish_reason,
                                                 seq.error, seq.stats.as_dict(), report)))

    def _deliver(self) -> None:
        """Hand the updates gathered since the last call to the event loop in one wake-up. One
        `call_soon_threadsafe` per request and step (a self-pipe write each, and the woken loop
        taking the GIL from the engine thread each time) was 7% of the engine thread at batch 8."""
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._call(_put_all, items)

    def _sweep(self) -> None:
        """Update the waiting count, finish anything finished outside a step, feed the observer."""
        left = 0
        for live in list(self._live.values()):
            if live.waiting and live.seq.status is not Status.WAITING:
                live.waiting = False
                left += 1
            if live.seq.finished:
                self._finish(live)
        if left:
            self._unqueue(left)
        self._deliver()
        if self.observer is not None:
            tel = self.engine.telemetry
            if tel and tel[-1] is not self._last_record:
                self._last_record = tel[-1]
                self._observe("step", tel[-1])
            self._observe("tick", self.engine, self._queued)

    def _observe(self, name: str, *args) -> None:
        try:
            getattr(self.observer, name)(*args)
        except Exception:  # noqa: BLE001 - metrics must never take serving down
            log.exception("metrics observer failed in %s", name)

    def _fail_running(self, message: str) -> list[Sequence]:
        """After an unexpected engine error, fail the requests that were running."""
        failed = []
        for live in list(self._live.values()):
            if live.seq.status is Status.RUNNING:
                live.seq.error = message
                self.engine.abort_request(live.seq.request_id)
                live.seq.finish_reason = "error"
                failed.append(live.seq)
        return failed

    def _shutdown(self) -> None:
        for live in list(self._live.values()):
            self.engine.abort_request(live.seq.request_id)
            self._finish(live)
        self._deliver()


def _put_all(items: list[tuple[RequestStream, Update]]) -> None:
    for stream, update in items:
        stream.put(update)


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
