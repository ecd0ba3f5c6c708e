"""A sweep's results folder: summary.json / summary.csv, plots (PNG) and report.md.

The report records what makes numbers comparable across machines and commits: machine, threads,
models, server and policy parameters, workload (trace, scales, output-length rule, seed), SLOs,
adaspec version and git commit, and the command that produced it.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import adaspec
from adaspec.bench.metrics import host_speed


def git_commit() -> str | None:
    """HEAD of the checkout adaspec runs from, '+dirty' when it has local changes (read-only git)."""
    root = Path(adaspec.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def model_info(path) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    info: dict = {"path": str(p)}
    try:
        cfg = json.loads((p / "config.json").read_text())
        info.update({k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "vocab_size")})
        files = sorted(p.glob("*.safetensors"))
        info["weights_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 2)
        digest = hashlib.sha256()  # which weights: the same path may hold another pair later
        for f in files:
            digest.update(f.read_bytes())
        info["weights_sha256"] = digest.hexdigest()[:16]
    except (OSError, ValueError):
        pass
    return info


def policy_params(name: str, k: int) -> dict:
    """The policy's public settings, as `make_policy` builds them (cost model excluded)."""
    from adaspec.spec.policy import make_policy

    try:
        pol = make_policy(name, k)
    except ValueError as exc:
        return {"error": str(exc)}
    return {a: v for a, v in vars(pol).items() if not a.startswith("_") and a != "cost_model"
            and isinstance(v, (int, float, str, bool))}


def collect_meta(sweep) -> dict:
    from adaspec.llm import DEFAULT_PAIR
    from adaspec.spec.profiler import device_name

    c = sweep.cfg
    target = c.model or (None if c.base_url else DEFAULT_PAIR / "target")
    draft = c.draft_model or (None if c.base_url or c.model else DEFAULT_PAIR / "draft")
    import torch

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": c.command or shlex.join(sys.argv),
        "adaspec_version": adaspec.__version__, "git_commit": git_commit(),
        "machine": {"host": platform.node(), "platform": platform.platform(),
                    "cpu": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "server_threads": c.threads or f"torch default (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
        "models": {"target": model_info(target), "draft": model_info(draft)},
        "server": {"base_url": c.base_url, "num_speculative_tokens": c.num_speculative_tokens,
                   "max_num_seqs": c.max_num_seqs, "max_model_len": c.max_model_len, "dtype": c.dtype,
                   "extra_args": c.server_args, "served": sweep.servers},
        "policies": {p: policy_params(p, c.num_speculative_tokens) for p in c.policies},
        "workload": sweep.workload.description,
        "mode": c.mode, "levels": c.levels,
        "level_name": "rate scale" if c.mode == "open" else "concurrency",
        "slo": {"ttft_ms": c.slo_ttft_ms, "tpot_ms": sweep.slo_tpot_ms, "tpot_spec": c.slo_tpot_ms,
                "note": sweep.slo_note},
        "failed_policies": sweep.failed_policies,
        "temperature": c.temperature, "max_prompt_tokens": c.max_prompt_tokens, "warmup": c.warmup,
        "prompt_tokenizer": "client-side (token ids sent)" if sweep.tokenizer is not None else "none (text)",
    }


CSV_COLS = [("policy", "policy"), ("level", "level"), ("completed", "completed"), ("failed", "failed"),
            ("duration_s", "duration_s"), ("request_throughput", "req_per_s"),
            ("output_throughput", "out_tok_per_s"), ("ttft_ms.mean", "ttft_mean_ms"),
            ("ttft_ms.median", "ttft_median_ms"), ("ttft_ms.p99", "ttft_p99_ms"),
            ("tpot_ms.mean", "tpot_mean_ms"), ("tpot_ms.median", "tpot_median_ms"),
            ("tpot_ms.p90", "tpot_p90_ms"), ("tpot_ms.p99", "tpot_p99_ms"),
            ("itl_ms.mean", "itl_mean_ms"), ("itl_per_token_ms.mean", "itl_per_token_mean_ms"),
            ("itl_per_token_ms.p99", "itl_per_token_p99_ms"), ("e2e_ms.mean", "e2e_mean_ms"),
            ("e2e_ms.median", "e2e_median_ms"), ("e2e_ms.p90", "e2e_p90_ms"), ("e2e_ms.p99", "e2e_p99_ms"),
            ("slo.attainment", "slo_attainment"), ("slo.goodput", "request_goodput"),
            ("spec.acceptance_rate", "acceptance_rate"),
            ("spec.acceptance_rate_per_request", "acceptance_rate_per_request"),
            ("spec.acceptance_length", "acceptance_length"),
            ("spec.acceptance_length_per_request", "acceptance_length_per_request"),
            ("spec.mean_spec_length", "mean_spec_length"), ("send_lag_ms.max", "send_lag_max_ms")]


def get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def pick_level(levels: list[float], mode: str) -> float:
    """The level the timeline shows: rate scale closest to 1 (open loop), else the highest."""
    return min(levels, key=lambda x: abs(x - 1.0)) if mode == "open" else max(levels)


def write_plots(runs: list[dict], meta: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in runs))
    levels = list(dict.fromkeys(r["level"] for r in runs))
    lname = meta["level_name"]
    tpot_slo = meta["slo"]["tpot_ms"]
    cdf_tpots = {(r["policy"], r["level"]): r["_tpots"] for r in runs}
    plots = []

    n = len(levels)
    shown = levels if n <= 4 else [levels[i] for i in (0, n // 3, 2 * n // 3, -1)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), squeeze=False)
    for ax, lv in zip(axes[0], shown, strict=True):
        for p in policies:
            xs = sorted(cdf_tpots.get((p, lv), []))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=p)
        if tpot_slo:
            ax.axvline(tpot_slo, color="k", ls="--", lw=1, label="TPOT SLO")
        ax.set(title=f"{lname} {lv:g}", xlabel="TPOT per request (ms)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tpot_cdf.png", dpi=110)
    plt.close(fig)
    plots.append(("TPOT CDF per policy", "tpot_cdf.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        axes[0].plot([r["level"] for r in rs], [get(r, "slo.attainment") for r in rs], "o-", label=p)
        axes[1].plot([r["level"] for r in rs], [get(r, "tpot_ms.p99") for r in rs], "o-", label=p)
    axes[0].set(xlabel=lname, ylabel="SLO attainment", ylim=(-0.05, 1.05),
                title="SLO attainment" if meta["slo"]["tpot_ms"] or meta["slo"]["ttft_ms"] else "no SLO set")
    axes[1].set(xlabel=lname, ylabel="P99 TPOT (ms)", title="P99 TPOT")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "slo_vs_level.png", dpi=110)
    plt.close(fig)
    plots.append((f"SLO attainment and P99 TPOT vs {lname}", "slo_vs_level.png"))

    lv = pick_level(levels, meta["mode"])
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    first = next(r for r in runs if r["level"] == lv)
    axes[0].step(first["timeline"]["t"], first["timeline"]["arrival_rate"], where="mid", color="k")
    axes[0].set(ylabel="arrivals (req/s)", title=f"over time at {lname} {lv:g}")
    for p in policies:
        r = next((r for r in runs if r["policy"] == p and r["level"] == lv), None)
        if r is None:
            continue
        axes[1].step(r["timeline"]["t"], r["timeline"]["output_throughput"], where="mid", label=p)
        ss = r["server_series"]
        axes[2].plot(ss["t"], [float("nan") if v is None else v for v in ss["mean_spec_length"]], label=p)
    axes[1].set(ylabel="output tokens/s")
    axes[2].set(ylabel="mean draft length\n(tokens per request-step)", xlabel="time since start (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
    plots.append(("Arrivals, output throughput and mean speculation length over time", "timeline.png"))
    return plots


def markdown(meta: dict, runs: list[dict], plots: list[tuple[str, str]]) -> str:
    w, s, m, sv = meta["workload"], meta["slo"], meta["models"], meta["server"]
    lines = [f"# adaspec benchmark: {', '.join(meta['policies'])}", "",
             f"`{meta['command']}`", "", "## Setup", "",
             f"- Date (UTC): {meta['date_utc']}; adaspec {meta['adaspec_version']}, "
             f"commit {meta['git_commit']}",
             f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPUs "
             f"({meta['machine']['platform']}, torch {meta['machine']['torch']}); "
             f"server threads: {meta['server_threads']}",
             f"- Models: target {m['target']}; draft {m['draft']}",
             (f"- Server: already running at {sv['base_url']} (its flags are not known here): {sv['served']}"
              if sv["base_url"] else
              f"- Server: K={sv['num_speculative_tokens']}, max_num_seqs={sv['max_num_seqs']}, "
              f"max_model_len={sv['max_model_len']}, dtype={sv['dtype']}, extra args {sv['extra_args']}"),
             "- Policies: " + "; ".join(f"`{p}` {v}" for p, v in meta["policies"].items()),
             f"- Prompts: {w['prompts']}; {w['num_requests']} requests, seed {w['seed']}"
             + (f"; sha256 {w['prompts_sha256']}" if w.get("prompts_sha256") else ""),
             (f"- Arrivals: {w['arrivals']}"
              + (f" (sha256 {w['trace_sha256']})" if w.get("trace_sha256") else "")
              + f"; duration cut {w['duration_cut_s']}; open loop, "
              if meta["mode"] == "open" else "- Closed loop (arrival times unused), ")
             + f"{meta['level_name']} {', '.join(f'{x:g}' for x in meta['levels'])}",
             f"- Output length: {w['output_len']} (mean max_tokens {w['mean_output_tokens']:.1f}); "
             f"temperature {meta['temperature']}; prompts: {meta['prompt_tokenizer']}, "
             f"max prompt tokens {meta['max_prompt_tokens']}",
             f"- SLO: TTFT {s['ttft_ms']} ms, TPOT {fmt(s['tpot_ms'], 2)} ms {s['note']}",
             f"- Warm-up: {meta['warmup']} sequential requests per server before measuring", "",
             "## Results", "",
             f"| policy | {meta['level_name']} | ok/failed | req/s | out tok/s | TTFT mean / p99 (ms) | "
             "TPOT mean / median / p90 / p99 (ms) | ITL/token mean (ms) | E2E mean / p99 (ms) | "
             "SLO attain. | goodput (req/s) | accept rate (tok / req) | accept length (tok / req) | "
             "mean draft len |",
             "|" + "---|" * 14]
    for r in runs:
        g = lambda k, d=1, r=r: fmt(get(r, k), d)  # noqa: E731
        lines.append(
            f"| {r['policy']} | {r['level']:g} | {r['completed']}/{r['failed']} | "
            f"{g('request_throughput', 2)} | "
            f"{g('output_throughput')} | {g('ttft_ms.mean')} / {g('ttft_ms.p99')} | "
            f"{g('tpot_ms.mean')} / {g('tpot_ms.median')} / {g('tpot_ms.p90')} / {g('tpot_ms.p99')} | "
            f"{g('itl_per_token_ms.mean')} | {g('e2e_ms.mean')} / {g('e2e_ms.p99')} | "
            f"{g('slo.attainment', 3)} | {g('slo.goodput', 2)} | "
            f"{g('spec.acceptance_rate', 3)} / {g('spec.acceptance_rate_per_request', 3)} | "
            f"{g('spec.acceptance_length', 2)} / {g('spec.acceptance_length_per_request', 2)} | "
            f"{g('spec.mean_spec_length', 2)} |")
    speeds = [(r, r.get("host_speed")) for r in runs]
    if any(h for _, h in speeds):
        lines += ["", "Machine speed during each run (`host_speed`): the median over prompts of the "
                  "server's prefill time for that prompt (prefilled alone, the same work under every "
                  "policy) relative to its median over all runs of the level. Above ~1.1 the machine "
                  "was slower during that run, which inflates its latencies whatever its policy.", "",
                  "| policy | level | prefill time vs all runs | prompts compared |", "|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['level']:g} | "
                  + (f"{h['relative']:.3f} | {h['prompts']} |" if h else "- | - |") for r, h in speeds]
    if meta["failed_policies"]:
        lines += ["", "Policies whose server did not start: "
                  + "; ".join(f"`{p}`: {e}" for p, e in meta["failed_policies"].items())]
    errs = sorted({e for r in runs for e in r["errors"]})
    if errs:
        lines += ["", "Errors seen (first few): " + "; ".join(f"`{e}`" for e in errs[:5])]
    lines += ["", "## Plots", ""] + [f"### {t}\n\n![{t}]({f})\n" for t, f in plots]
    lines += ["## Definitions", "",
              "Same formulas as vLLM's benchmark_serving: TTFT = send to first content chunk; E2E = send "
              "to end of stream; TPOT = (E2E - TTFT) / (output tokens - 1), requests with one token "
              "excluded; ITL = gaps between content chunks, per token = each gap divided by the tokens "
              "of its chunk (estimated by re-tokenizing); throughputs over the run's duration. SLO "
              "attainment = requests meeting every set SLO / all requests (failed ones miss); goodput = "
              "such requests per second. Acceptance rate = accepted / drafted, acceptance length = 1 + "
              "accepted / verification steps, mean draft length = drafted / steps; 'tok' pools all "
              "tokens, 'req' averages per request. The timeline's draft length is the server's "
              "(`/metrics`, tokens verified per request per decode step, zeros included).",
              "", "Files: `requests.jsonl` (one line per request and run), `summary.json`, `summary.csv`, "
              "`server-*.log`."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, meta: dict, runs: list) -> None:
    """summary.json (meta and every run) and summary.csv (one row per run), shared with simulate."""
    (out / "summary.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str))
    with (out / "summary.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow([c for _, c in CSV_COLS])
        for r in runs:
            wr.writerow([get(r, k) for k, _ in CSV_COLS])


def write_report(sweep) -> Path:
    out = sweep.out
    meta = collect_meta(sweep)
    runs = sweep.runs
    tpots, prefills = {}, {}
    for line in (out / "requests.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = (row["policy"], row["level"])
        if row["tpot"] is not None:
            tpots.setdefault(key, []).append(row["tpot"] * 1e3)
        if row.get("prefill_s"):
            prefills.setdefault(row["level"], {}).setdefault(key, {})[row["index"]] = row["prefill_s"]
    speed = {k: v for per_level in prefills.values() for k, v in host_speed(per_level).items()}
    for r in runs:
        r["host_speed"] = speed.get((r["policy"], r["level"]))
    write_summary(out, meta, runs)
    plot_runs = [{**r, "_tpots": tpots.get((r["policy"], r["level"]), [])} for r in runs]
    plots = write_plots(plot_runs, meta, out) if runs else []
    path = out / "report.md"
    path.write_text(markdown(meta, runs, plots))
    return path
