"""`adaspec bench sweep`: the same workload against a fresh `adaspec serve` per policy.

A fresh server process per policy means no policy inherits another's learned state, caches or
warm allocator; within one policy the load levels run in order on the same server (as a serving
deployment would keep learning). Each server gets a few sequential warm-up requests first; their
median TPOT is the no-load reference for `--slo-tpot-ms auto[:F]` (F x that of the first policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from adaspec.bench.client import run_requests
from adaspec.bench.metrics import summarize, timeline
from adaspec.bench.workload import Workload, build_workload


@dataclass
class SweepConfig:
    policies: list[str]
    output_dir: str = "runs/bench"
    model: str | None = None  # None: the embedded pair
    draft_model: str | None = None
    num_speculative_tokens: int = 8
    max_num_seqs: int = 32
    max_model_len: int | None = None
    dtype: str = "auto"
    threads: int | None = None  # OMP_NUM_THREADS for the server (None: torch's default)
    server_args: list[str] = field(default_factory=list)
    startup_timeout: float = 900.0
    base_url: str | None = None  # benchmark this running server instead of starting servers
    prompts: str = "builtin"
    arrivals: str | None = None
    trace: str | None = None
    num_requests: int | None = None
    duration: float | None = None
    time_scale: float = 1.0
    shift_trace: bool = True
    output_len: str = "fixed:64"
    seed: int = 0
    mode: str = "open"
    rate_scales: list[float] = field(default_factory=lambda: [1.0])
    concurrencies: list[int] = field(default_factory=lambda: [1])
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | str | None = None  # a number, or "auto[:F]"
    warmup: int = 2
    max_prompt_tokens: int | None = None
    temperature: float = 0.0
    request_timeout: float = 600.0
    quiet: bool = False
    command: str = ""

    @property
    def levels(self) -> list[float]:
        return list(self.rate_scales) if self.mode == "open" else [float(c) for c in self.concurrencies]


def needs_profile(policy: str) -> bool:
    from adaspec.spec.policy import make_policy

    try:
        return bool(make_policy(policy, 64).needs_cost_model)
    except ValueError:
        return False


def file_stem(policy: str) -> str:
    """A policy's name as it appears in the per-policy files (telemetry-<stem>.jsonl, ...)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in policy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`adaspec serve` in a child process on a free loopback port; ready once /health says 200."""

    def __init__(self, cfg: SweepConfig, policy: str, log_path: Path):
        self.cfg, self.policy, self.log_path = cfg, policy, log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        c = self.cfg
        cmd = [sys.executable, "-m", "adaspec.cli", "serve", "--policy", self.policy, "--host", "127.0.0.1",
               "--port", str(port), "--num-speculative-tokens", str(c.num_speculative_tokens),
               "--max-num-seqs", str(c.max_num_seqs), "--dtype", c.dtype, "--seed", str(c.seed),
               "--log-level", "info"]
        if c.model:
            cmd += ["--model", c.model] + (["--draft-model", c.draft_model] if c.draft_model else [])
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        stem = file_stem(self.policy)
        cmd += ["--save-telemetry", str(self.log_path.with_name(f"telemetry-{stem}.jsonl")),
                "--save-decisions", str(self.log_path.with_name(f"decisions-{stem}.jsonl"))]
        return cmd + list(c.server_args)

    def __enter__(self) -> str:
        port = free_port()
        env = dict(os.environ)
        if self.cfg.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.cfg.threads)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.command(port), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.cfg.startup_timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server for policy {self.policy!r} exited with status "
                                       f"{self.proc.returncode}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server for policy {self.policy!r} not ready after "
                                       f"{self.cfg.startup_timeout:.0f} s:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self.url
                time.sleep(0.25)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def tail(self, n: int = 20) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server drains and exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def resolve_auto_slo(spec, warm: list) -> float | None:
    """`auto[:F]` -> F (default 1.5) x median TPOT (ms) of the warm-up requests."""
    if spec is None or isinstance(spec, (int, float)):
        return spec
    factor = float(spec.partition(":")[2] or 1.5)
    tpots = [r.tpot for r in warm if r.tpot is not None]
    if not tpots:
        raise RuntimeError("--slo-tpot-ms auto: the warm-up requests gave no TPOT (use --warmup >= 1 "
                           "and outputs of at least 2 tokens)")
    return factor * float(np.median(tpots)) * 1e3


def server_series(scrape: list[dict]) -> dict:
    """Mean draft tokens per request-step between /metrics scrapes, and the batch over time."""
    t, spec, running = [], [], []
    for a, b in zip(scrape, scrape[1:], strict=False):
        dc = b["draft_count"] - a["draft_count"]
        t.append((a["t"] + b["t"]) / 2)
        spec.append((b["draft_sum"] - a["draft_sum"]) / dc if dc > 0 else None)
        running.append(b.get("running"))
    return {"t": t, "mean_spec_length": spec, "running": running}


def prefill_times(telemetry: Path) -> dict[str, float]:
    """Request id -> the target forward time of its prefill, for prompts prefilled alone (a batch of
    one), from a server's `--save-telemetry` file; {} if there is none (a server that failed)."""
    if not telemetry.exists():
        return {}
    out = {}
    for line in telemetry.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "prefill" and rec.get("batch_size") == 1 and rec.get("request_ids"):
            out[rec["request_ids"][0]] = float(rec["verify_time"])
    return out


def load_tokenizer_for(cfg: SweepConfig):
    from adaspec.llm import DEFAULT_PAIR
    from adaspec.model import load_tokenizer

    path = cfg.model or (DEFAULT_PAIR / "target")
    try:
        return load_tokenizer(path)
    except Exception:  # noqa: BLE001 - a remote server's model may not be here: send text prompts
        return None


class Sweep:
    """Runs every (policy, level) and appends results under cfg.output_dir."""

    def __init__(self, cfg: SweepConfig, workload: Workload | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.workload = workload or build_workload(
            cfg.prompts, cfg.arrivals, cfg.trace, cfg.num_requests, cfg.duration, cfg.time_scale,
            cfg.output_len, cfg.seed, cfg.shift_trace)
        self.tokenizer = load_tokenizer_for(cfg)
        self.runs: list[dict] = []
        self.servers: dict[str, dict] = {}
        self.auto_slo = isinstance(cfg.slo_tpot_ms, str)  # resolved on the first policy's warm-up
        self.slo_tpot_ms = None if self.auto_slo else cfg.slo_tpot_ms
        self.slo_note = ""
        if self.auto_slo and cfg.warmup < 1:
            raise ValueError("--slo-tpot-ms auto needs --warmup >= 1")
        self.failed_policies: dict[str, str] = {}
        from rich.console import Console

        self.console = Console(quiet=cfg.quiet, stderr=True)

    def _run(self, url: str, requests, mode: str, concurrency: int, label: str, scrape: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        c = self.cfg
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("sent {task.fields[sent]}"), TimeElapsedColumn(),
                      console=self.console, transient=False) as prog:
            task = prog.add_task(label, total=len(requests), sent=0)

            def tick(kind: str) -> None:
                if kind == "sent":
                    prog.update(task, sent=prog.tasks[task].fields["sent"] + 1)
                else:
                    prog.advance(task)

            return asyncio.run(run_requests(
                url, requests, mode=mode, concurrency=concurrency, ttft_slo_ms=c.slo_ttft_ms,
                tpot_slo_ms=self.slo_tpot_ms, tokenizer=self.tokenizer, max_prompt_tokens=c.max_prompt_tokens,
                temperature=c.temperature, timeout=c.request_timeout, scrape=scrape, progress=tick))

    def run_policy(self, policy: str, url: str, done: list | None = None) -> None:
        """Warm up, then run every level; each level's (level, results) is appended to `done` (the
        caller writes them with `record` once the server has saved its telemetry)."""
        c = self.cfg
        if c.warmup:
            warm = self._run(url, self.workload.requests[:c.warmup], "closed", 1,
                             f"{policy}: warm-up", scrape=False)
            if self.auto_slo and self.slo_tpot_ms is None:
                self.slo_tpot_ms = resolve_auto_slo(c.slo_tpot_ms, warm["results"])
                self.slo_note = (f"(from {c.slo_tpot_ms}: the factor x the median TPOT of {c.warmup} "
                                 f"sequential warm-up requests under policy {policy})")
        done = [] if done is None else done
        for level in c.levels:
            if c.mode == "open":
                reqs, label = self.workload.at_rate_scale(level), f"{policy} rate x{level:g}"
            else:
                reqs, label = self.workload.requests, f"{policy} concurrency {int(level)}"
            res = self._run(url, reqs, c.mode, int(level) if c.mode == "closed" else 1, label)
            self.servers.setdefault(policy, res["server"])
            s = summarize(res["results"], res["duration"], c.slo_ttft_ms, self.slo_tpot_ms)
            s.update(policy=policy, level=level, mode=c.mode, server_policy=res["server"]["policy"],
                     timeline=timeline(res["results"], res["duration"]),
                     server_series=server_series(res["scrape"]))
            self.runs.append(s)
            done.append((level, res["results"]))

    def record(self, policy: str, done: list, telemetry: Path | None) -> None:
        """Append a policy's per-request results to requests.jsonl, each with its prefill time from
        the server's telemetry (`RequestResult.prefill_s`; `host_speed` in the report)."""
        prefill = prefill_times(telemetry) if telemetry else {}
        with (self.out / "requests.jsonl").open("a") as f:
            for level, results in done:
                for r in results:
                    r.prefill_s = prefill.get(r.request_id)
                    f.write(json.dumps({"policy": policy, "level": level, **r.as_dict()}) + "\n")

    def run(self) -> Path:
        (self.out / "requests.jsonl").write_text("")
        for policy in self.cfg.policies:
            done: list = []
            if self.cfg.base_url:
                self.run_policy(policy, self.cfg.base_url.rstrip("/"), done)
                self.record(policy, done, None)
                continue
            self.console.print(f"[bold]{policy}[/]: starting the server (model load"
                               f"{', start-up profile' if needs_profile(policy) else ''}) ...")
            t = time.monotonic()
            log = self.out / f"server-{policy.replace(':', '-')}.log"
            try:
                with ServerProcess(self.cfg, policy, log) as url:
                    self.console.print(f"  ready in {time.monotonic() - t:.0f} s at {url}")
                    self.run_policy(policy, url, done)
            except RuntimeError as exc:  # one policy's server failing must not lose the others' runs
                self.console.print(f"[red]{exc}")
                self.failed_policies[policy] = str(exc).splitlines()[0]
            finally:  # the server has exited (and saved its telemetry) or failed
                self.record(policy, done, log.with_name(f"telemetry-{file_stem(policy)}.jsonl"))
        if not self.runs:
            raise RuntimeError("no policy completed a run: " + "; ".join(self.failed_policies.values()))
        from adaspec.bench.report import write_report

        return write_report(self)
