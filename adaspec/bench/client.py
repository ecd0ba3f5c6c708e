"""The benchmark client: async streaming completions, open loop (each request leaves at its arrival
time whatever earlier ones are doing) or closed loop (fixed concurrency).

One connection per request (no keep-alive pool), as vLLM's benchmark does, so a slow stream never
delays another request's send. `/metrics` is scraped once a second during a run for the server's
own view over time (mean draft length per request-step, running and waiting requests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx

from adaspec.bench.metrics import RequestResult
from adaspec.bench.workload import BenchRequest

OK_FINISH = ("stop", "length")


async def server_info(client: httpx.AsyncClient, base_url: str) -> dict:
    """Served model name, max_model_len and policy (from /v1/models), and the server's version."""
    r = await client.get(base_url + "/v1/models")
    r.raise_for_status()
    card = r.json()["data"][0]
    info = {"model": card["id"], "max_model_len": card.get("max_model_len"), "policy": card.get("policy")}
    try:
        info["version"] = (await client.get(base_url + "/version")).json().get("version")
    except (httpx.HTTPError, ValueError):
        info["version"] = None
    return info


def prompt_for(req: BenchRequest, tokenizer=None, max_model_len: int | None = None,
               max_prompt_tokens: int | None = None) -> str | list[int]:
    """Token ids cut to fit (first tokens kept) when a tokenizer is at hand, else the text as is."""
    if tokenizer is None:
        return req.prompt
    ids = tokenizer(req.prompt)["input_ids"]
    room = [len(ids)]
    if max_prompt_tokens:
        room.append(max_prompt_tokens)
    if max_model_len:
        room.append(max(1, max_model_len - req.max_tokens))
    return ids[:min(room)]


def payload(req: BenchRequest, prompt: str | list[int], model: str | None, ttft_slo_ms: float | None,
            tpot_slo_ms: float | None, temperature: float = 0.0) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": req.max_tokens, "temperature": temperature,
            "ignore_eos": req.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    slo = {k: v for k, v in (("ttft_ms", ttft_slo_ms), ("tpot_ms", tpot_slo_ms)) if v is not None}
    if slo:
        body["slo"] = slo
    return body


async def send(client: httpx.AsyncClient, base_url: str, body: dict, res: RequestResult, t0: float,
               chunks: list[str]) -> RequestResult:
    """Stream one completion into `res`; any failure is recorded, never raised."""
    res.sent = time.perf_counter() - t0
    start = t0 + res.sent
    try:
        async with client.stream("POST", base_url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                now = time.perf_counter() - start
                res.request_id = res.request_id or msg.get("id")
                if "error" in msg:
                    res.error = f"stream error: {msg['error'].get('message')}"
                    break
                for ch in msg.get("choices") or []:
                    if ch.get("text"):
                        res.ttft = now if res.ttft is None else res.ttft
                        res.chunk_times.append(now)
                        chunks.append(ch["text"])
                    res.finish_reason = ch.get("finish_reason") or res.finish_reason
                if msg.get("spec_stats"):
                    res.spec_stats, res.server_slo = msg["spec_stats"], msg.get("slo")
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"]["prompt_tokens"]
                    res.output_tokens = msg["usage"]["completion_tokens"]
            res.e2e = time.perf_counter() - start
            if not done and res.error is None:
                res.error = "stream ended without [DONE]"
            elif res.error is None and res.finish_reason not in OK_FINISH:
                res.error = f"finish_reason {res.finish_reason!r}"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.success = res.error is None
    if res.success and res.ttft is None:  # no visible text at all (e.g. an immediate EOS)
        res.ttft = res.e2e
    return res


def chunk_token_counts(chunks: list[str], total: int, tokenizer=None) -> list[float]:
    """Tokens each chunk carried: by re-tokenizing the growing text when a tokenizer is at hand, by
    characters otherwise; scaled so they sum to the server's count (an estimate either way)."""
    if not chunks:
        return []
    if tokenizer is not None:
        text, prev, raw = "", 0, []
        for c in chunks:
            text += c
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            raw.append(max(0, n - prev))
            prev = n
    else:
        raw = [len(c) for c in chunks]
    s = sum(raw)
    return [total * x / s for x in raw] if s else [total / len(chunks)] * len(chunks)


async def scrape_metrics(client: httpx.AsyncClient, base_url: str, t0: float, out: list[dict],
                         interval: float = 1.0) -> None:
    """Append {t, draft_sum, draft_count, running, waiting} every `interval` s until cancelled."""
    from prometheus_client.parser import text_string_to_metric_families

    while True:
        try:
            r = await client.get(base_url + "/metrics")
            sample = {"t": time.perf_counter() - t0}
            for fam in text_string_to_metric_families(r.text):
                for s in fam.samples:
                    key = {"adaspec:spec_decode_draft_length_sum": "draft_sum",
                           "adaspec:spec_decode_draft_length_count": "draft_count",
                           "adaspec:num_requests_running": "running",
                           "adaspec:num_requests_waiting": "waiting"}.get(s.name)
                    if key:
                        sample[key] = s.value
            if "draft_count" in sample:
                out.append(sample)
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(interval)


async def run_requests(base_url: str, requests: list[BenchRequest], *, mode: str = "open",
                       concurrency: int = 1, ttft_slo_ms: float | None = None,
                       tpot_slo_ms: float | None = None, tokenizer=None, max_prompt_tokens: int | None = None,
                       temperature: float = 0.0, timeout: float = 600.0, scrape: bool = True,
                       progress: Callable[[str], None] | None = None,
                       transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Send `requests` (open loop at their `arrival` times, or closed loop at `concurrency`).

    Returns {"results": [RequestResult], "duration": s, "server": info, "scrape": samples}."""
    if mode not in ("open", "closed") or concurrency < 1:
        raise ValueError("mode must be 'open' or 'closed' with concurrency >= 1")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    tmo = httpx.Timeout(timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=tmo, transport=transport) as client:
        info = await server_info(client, base_url)
        reqs = sorted(requests, key=lambda r: (r.arrival, r.index))
        bodies = [payload(r, prompt_for(r, tokenizer, info["max_model_len"], max_prompt_tokens),
                          info["model"], ttft_slo_ms, tpot_slo_ms, temperature) for r in reqs]
        chunks: dict[int, list[str]] = {r.index: [] for r in reqs}
        results = [RequestResult(r.index, 0.0, category=r.category, max_tokens=r.max_tokens) for r in reqs]
        samples: list[dict] = []
        tick = progress or (lambda _: None)

        async def one(i: int) -> None:
            tick("sent")
            await send(client, base_url, bodies[i], results[i], t0, chunks[reqs[i].index])
            tick("done")

        t0 = time.perf_counter()
        scraper = asyncio.create_task(scrape_metrics(client, base_url, t0, samples)) if scrape else None
        try:
            if mode == "open":
                tasks = []
                for i, r in enumerate(reqs):
                    results[i].scheduled = r.arrival
                    delay = t0 + r.arrival - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)
            else:
                it = iter(range(len(reqs)))

                async def worker() -> None:
                    for i in it:
                        results[i].scheduled = time.perf_counter() - t0
                        await one(i)

                await asyncio.gather(*(worker() for _ in range(min(concurrency, len(reqs)))))
            duration = time.perf_counter() - t0
        finally:
            if scraper:
                scraper.cancel()
                await asyncio.gather(scraper, return_exceptions=True)
    for res, r in zip(results, reqs, strict=True):
        ch = chunks[r.index]
        res.text = "".join(ch)
        if res.success and not res.output_tokens:  # no usage chunk: estimate from the text
            res.output_tokens = (len(tokenizer(res.text, add_special_tokens=False)["input_ids"])
                                 if tokenizer is not None else len(ch))
        res.chunk_tokens = chunk_token_counts(ch, res.output_tokens, tokenizer)
    return {"results": sorted(results, key=lambda x: x.index), "duration": duration, "server": info,
            "scrape": samples}
