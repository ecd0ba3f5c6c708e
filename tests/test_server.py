"""The OpenAI-compatible server, live on loopback: the official client, streaming, metrics, schema,
and 64 concurrent streams that must match the same requests run alone."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest
import torch

from adaspec.llm import build_engine
from adaspec.server import create_app
from adaspec.server.openai_io import render_chat
from adaspec.server.protocol import ChatMessage, CompletionRequest
from adaspec.server.serve import serve_in_thread

PROMPTS = ["def add(a, b):", "class Point:", "for i in range(10):", "import os\nimport sys",
           "    self.x = x", "print(", "if __name__ == '__main__':", "return a + b", "x", "import"]


def tiny_engine(pair, **kw):
    target, draft, _ = pair
    kw = {"policy": "static:3", "num_speculative_tokens": 4, "max_num_seqs": 8, "max_model_len": 128,
          "dtype": torch.float64, "slo_tpot_ms": 500.0, **kw}  # float64: greedy argmax cannot flip
    return build_engine(str(target), str(draft), **kw)


@pytest.fixture(scope="module")
def live(tiny_pair):
    # room for all 64 concurrent streams (the bound itself is tested in test_server_hardening)
    eng = tiny_engine(tiny_pair, max_num_seqs=16)
    app = create_app(eng, ["tiny", "tiny-alias"], max_waiting=256)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(**kw):
    return {"temperature": 0, "max_tokens": 12, **kw}


def test_openai_completion_with_slo_and_spec_stats(client):
    r = client.completions.create(model="tiny", prompt="def add(a, b):", **greedy(),
                                  extra_body={"slo": {"tpot_ms": 40, "ttft_ms": 2000}, "ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    stats, slo = r.model_extra["spec_stats"], r.model_extra["slo"]
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["acceptance_length"] == pytest.approx(1 + stats["accepted"] / stats["steps"], abs=1e-3)
    assert slo["tpot_ms"] == 40 and slo["ttft_ms"] == 2000  # the request's SLO, not the default 500
    assert slo["measured_tpot_ms"] > 0 and slo["met"] == (slo["ttft_met"] and slo["tpot_met"])


def test_server_default_slo_applies(client):
    r = client.completions.create(model="tiny", prompt="x", **greedy(max_tokens=3),
                                  extra_body={"slo": {"ttft_ms": 1000}})
    assert r.model_extra["slo"]["tpot_ms"] == 500  # a field left out keeps the server's default
    assert r.model_extra["slo"]["ttft_ms"] == 1000


def test_openai_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="class Point:", **greedy(max_tokens=16))
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["spec_stats"]["steps"] > 0 and "met" in last.model_extra["slo"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_chat_uses_documented_fallback_template(client):
    msgs = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "print("}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, **greedy())
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    same = client.completions.create(model="tiny", prompt="system: be terse\nuser: print(\nassistant:",
                                     **greedy())
    assert chat.choices[0].message.content == same.choices[0].text
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens
    stream = client.chat.completions.create(model="tiny-alias", messages=msgs, stream=True,
                                            extra_body={"slo": {"tpot_ms": 100}}, **greedy())
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chunks[-1].model_extra["slo"]["tpot_ms"] == 100 and chunks[-1].model == "tiny-alias"


def test_chat_template_from_tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [ChatMessage(role="developer", content="a"),
            ChatMessage(role="user", content=[{"type": "text", "text": "b"}, {"type": "text", "text": "c"}])]
    assert render_chat(tok, msgs) == ("<system>a<user>b\nc<assistant>", False)
    tok.chat_template = None
    assert render_chat(tok, msgs) == ("system: a\nuser: b\nc\nassistant:", True)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="import", max_tokens=10, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 20})
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_stop_string_never_streamed(client):
    base = client.completions.create(model="tiny", prompt="for", **greedy(max_tokens=20)).choices[0].text
    assert len(base) >= 4
    stop = base[2:4]
    kw = dict(model="tiny", prompt="for", stop=[stop], **greedy(max_tokens=20))
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "stop" and stop not in full.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == full.choices[0].text


def test_models_health_version(live, client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-alias"]
    assert httpx.get(live[0] + "/health").json() == {"status": "ok"}
    import adaspec

    assert httpx.get(live[0] + "/version").json() == {"version": adaspec.__version__}


def metric(text: str, name: str) -> float:
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert vals, f"metric {name} missing"
    return vals[0]


def test_metrics_count_requests_and_speculation(live, client):
    before = httpx.get(live[0] + "/metrics").text
    client.completions.create(model="tiny", prompt="print(", **greedy(),
                              extra_body={"ignore_eos": True, "slo": {"tpot_ms": 1e5}})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    after = httpx.get(live[0] + "/metrics").text
    for name, delta in [('adaspec:requests_total{outcome="length"}', 1),
                        ('adaspec:requests_total{outcome="rejected_invalid"}', 1),
                        ("adaspec:time_to_first_token_seconds_count", 1),
                        ("adaspec:e2e_request_latency_seconds_count", 1),
                        ('adaspec:slo_requests_total{result="met"}', 1)]:
        assert metric(after, name) - metric(before, name) == delta, name
    drafted = metric(after, "adaspec:spec_decode_num_draft_tokens_total")
    accepted = metric(after, "adaspec:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 <= accepted <= drafted
    assert metric(after, 'adaspec:spec_decode_num_accepted_tokens_per_pos_total{position="0"}') <= drafted
    assert metric(after, "adaspec:spec_decode_draft_length_count") > 0
    assert 0 < metric(after, "adaspec:slo_attainment") <= 1
    assert metric(after, "adaspec:kv_cache_usage_perc") == 0
    assert metric(after, "adaspec:num_requests_running") == 0
    # The static policy has no cost model: the gauge is absent rather than a made-up number.
    assert "adaspec:cost_model_prediction_error" not in after


def test_cost_model_error_gauge_reads_policy():
    from adaspec.server.metrics import cost_model_stats

    class CM:
        def error_report(self):
            return {"mape": 0.12, "n": 40, "label": "x"}

    class Pol:
        cost_model = CM()

    assert cost_model_stats(Pol()) == {"mape": 0.12, "n": 40.0}
    assert cost_model_stats(object()) is None


def test_adaspec_policy_serves_and_reports_cost_model_error(tiny_pair):
    """The real adaptive policy behind the server (a synthetic cost model skips start-up profiling):
    requests succeed and the cost model's prediction error shows up in /metrics."""
    from adaspec.spec.cost_model import CostModel
    from adaspec.spec.policy import make_policy

    policy = make_policy("adaspec", 4, cost_model=CostModel.linear(0.001, 0.002, correction_rate=0.1))
    app = create_app(tiny_engine(tiny_pair, policy=policy, slo_tpot_ms=50.0), "tiny")
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for p in PROMPTS[:3]:
            r = c.completions.create(model="tiny", prompt=p, **greedy(), extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 12 and r.model_extra["slo"]["tpot_ms"] == 50

        def mape():
            text = httpx.get(url + "/metrics").text
            name = 'adaspec:cost_model_prediction_error{stat="mape"}'
            return metric(text, name) if name + " " in text else None

        deadline = time.monotonic() + 10
        while mape() is None:  # the engine thread refreshes it at most every 0.5 s
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert mape() >= 0


def test_save_records_writes_telemetry_and_decisions(tiny_pair, tmp_path):
    """`adaspec serve --save-telemetry/--save-decisions`: what the engine and the policy recorded
    is written at shutdown, in the formats the simulator and replay read."""
    from adaspec.server.serve import save_records
    from adaspec.sim.acceptance_sim import AcceptanceSpec
    from adaspec.spec.cost_model import CostModel
    from adaspec.spec.decisions import DecisionLog
    from adaspec.spec.policy import make_policy

    policy = make_policy("adaspec", 4, cost_model=CostModel.linear(0.001, 0.002))
    app = create_app(tiny_engine(tiny_pair, policy=policy), "tiny")
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        c.completions.create(model="tiny", prompt=PROMPTS[0], **greedy(), extra_body={"ignore_eos": True})
    save_records(app.state.adaspec.engine, str(tmp_path / "t.jsonl"), str(tmp_path / "d.jsonl"))
    steps = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in steps} == {"prefill", "decode"}
    AcceptanceSpec.fit_telemetry(str(tmp_path / "t.jsonl"), min_tested=1)  # the simulator reads it
    decisions = DecisionLog.read_jsonl(tmp_path / "d.jsonl")
    assert decisions and all("outcome" in r for r in decisions)


def test_openapi_schema_is_the_real_contract(live):
    schema = httpx.get(live[0] + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = schema["paths"][path]["post"]
        assert "422" not in op["responses"] and {"400", "404", "503"} <= set(op["responses"])
        assert "text/event-stream" in op["responses"]["200"]["content"]
    req = schema["components"]["schemas"]["CompletionRequest"]
    assert req["additionalProperties"] is False and set(req["required"]) == {"prompt"}
    assert set(req["properties"]) == set(CompletionRequest.model_fields)
    slo = schema["components"]["schemas"]["SLORequest"]
    assert slo["additionalProperties"] is False and set(slo["properties"]) == {"tpot_ms", "ttft_ms"}
    # Every documented field is accepted with a valid value.
    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2, "temperature": 0.5, "top_p": 0.9,
            "top_k": 5, "seed": 1, "stop": ["\n\n"], "ignore_eos": True, "stream": False,
            "stream_options": {"include_usage": True}, "n": 1, "user": "u", "echo": True,
            "slo": {"tpot_ms": 50, "ttft_ms": 500}}
    assert set(body) == set(req["properties"])
    assert httpx.post(live[0] + "/v1/completions", json=body).status_code == 200


def test_tokens_stream_before_the_request_finishes(live):
    """Chunks arrive while the request is still decoding, not all at the end."""
    body = {"model": "tiny", "prompt": "def", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}
    stamps = []
    with httpx.stream("POST", live[0] + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append((time.perf_counter(), json.loads(line[6:])))
    content = [t for t, c in stamps if c["choices"] and c["choices"][0]["text"]]
    assert len(content) >= 3  # at most K + 1 = 5 tokens per step: many chunks, not one
    assert stamps[-1][1]["choices"][0]["finish_reason"] == "length"


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[str, str | None]:
    text, finish = "", None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
                finish = chunk["choices"][0]["finish_reason"] or finish
    return text, finish


@pytest.mark.slow
def test_64_concurrent_streams_match_requests_run_alone(live):
    rng = random.Random(0)
    bodies = [{"model": "tiny", "prompt": rng.choice(PROMPTS) * rng.randint(1, 4), "temperature": 0,
               "max_tokens": rng.randint(1, 16), "ignore_eos": rng.random() < 0.5} for _ in range(64)]

    async def run(concurrent: bool):
        limits = httpx.Limits(max_connections=70)
        async with httpx.AsyncClient(base_url=live[0], timeout=60, limits=limits) as c:
            if concurrent:
                return await asyncio.gather(*(_stream(c, b) for b in bodies))
            return [await _stream(c, b) for b in bodies]

    together = asyncio.run(run(True))
    alone = asyncio.run(run(False))
    assert len(together) == 64 and all(f in ("stop", "length") for _, f in together)
    assert together == alone
