"""`adaspec simulate` (policies on a modelled GPU, paper scale, in seconds), `adaspec capacity`
(the same behind a least-loaded router, 1..N replicas) and `adaspec profile`
(measure this machine's model pair once, write the cost-model JSON that `simulate` loads).

    adaspec profile --output runs/profile.json
    adaspec simulate --trace ../shared/data/traces/conv.csv \\
        --prompts ../shared/data/spec-bench/origin-spec-bench.jsonl --output-len sampled:256 \\
        --cost-model analytic:A100-80GB:vicuna-7b/vicuna-68m --acceptance synthetic:0.7 \\
        --policies none,static:3,smartspec,adaspec --slo-tpot-ms 40 --output-dir runs/sim-conv
    adaspec capacity --trace ../shared/data/traces/conv.csv --rates 2,4,8,16,32 --replicas 1,2,4,8 \\
        --policies adaspec --slo-tpot-ms 40 --output-dir runs/capacity

`capacity` runs 1..N simulator replicas behind a least-loaded router (`adaspec.sim.cluster`) and
writes capacity.md / .json / .png: SLO attainment per offered rate and replica count.

The report (report.md, summary.json/csv, requests.jsonl, plots) is the `bench` report, written by
the same code from the same per-request records; the oracle runs next to the policies.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

DEFAULT_POLICIES = "none,static:1,static:3,static:5,threshold,smartspec,adaspec,adaspec-drafter,adaspec-noslo"


def add_parser(sub) -> None:
    from adaspec.bench.cli import add_workload_args, floats, ints

    s = sub.add_parser("simulate", help="simulate policies on a modelled GPU and model pair (bench report)")
    s.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list; the oracle is always added")
    s.add_argument("--no-oracle", action="store_true", help="do not add the oracle upper bound")
    add_model_args(s)
    add_workload_args(s)
    s.set_defaults(fn=cmd_simulate, output_dir="runs/sim", warmup=3)

    c = sub.add_parser("capacity", help="SLO attainment vs request rate for 1..N simulated replicas "
                                        "behind a least-loaded router")
    c.add_argument("--policies", default="adaspec", help="comma list (default adaspec)")
    c.add_argument("--replicas", type=ints, default=list(range(1, 9)), help="comma list (default 1..8)")
    c.add_argument("--rates", type=floats, required=True,
                   help="offered request rates (req/s, comma list): each point replays --window s of the "
                        "trace (or generated arrivals), time-scaled to that mean rate")
    c.add_argument("--window", type=float, default=60.0, help="simulated seconds of arrivals per point")
    c.add_argument("--stop-below", type=float, default=0.0,
                   help="skip higher rates once attainment falls below this (0: run every rate)")
    c.add_argument("--target", type=float, default=0.9, help="attainment that defines capacity (0.9)")
    add_model_args(c)
    add_workload_args(c)
    c.set_defaults(fn=cmd_capacity, output_dir="runs/capacity", warmup=3)

    p = sub.add_parser("profile", help="measure draft/verify step times of a model pair, write the JSON")
    p.add_argument("--model", help="target directory (default: the embedded pair)")
    p.add_argument("--draft-model", help="draft directory")
    p.add_argument("--output", required=True, help="where to write the profile (cost-model JSON)")
    p.add_argument("--num-speculative-tokens", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--budget-s", type=float, default=40.0, help="measurement time budget (s)")
    p.set_defaults(fn=cmd_profile)


def add_variant_arg(s: argparse.ArgumentParser) -> None:
    """--variant NAME=JSON (`AdaSpecPolicy.register_variant`), for every command that names policies."""
    s.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="an adaspec variant to name in --policies: AdaSpecPolicy keyword arguments as JSON, "
                        "e.g. 'adaspec-rl20={\"rescue_loss\": 0.2}' (repeatable)")


def add_model_args(s: argparse.ArgumentParser) -> None:
    """What is simulated: cost model, acceptance model and the engine's limits."""
    add_variant_arg(s)
    s.add_argument("--cost-model", default="analytic:A100-80GB:vicuna-7b/vicuna-68m",
                   help="analytic:GPU:PAIR[:TP] (GPU: A100-80GB, L40, H100, H200; PAIR: "
                        "vicuna-7b/vicuna-68m, vicuna-33b/vicuna-160m, llama-3.3-70b/llama-3.2-1b), "
                        "telemetry:[POLICY=]FILE[,...] (fitted from a real run's engine telemetry, e.g. "
                        "bench sweep's telemetry-*.jsonl; each file's time outside the forwards applies "
                        "to its policy) or a JSON file: a measured profile (`adaspec profile`) or an "
                        "analytic spec")
    s.add_argument("--policy-cost-model", help="what the policies believe, if not the truth (same forms)")
    s.add_argument("--acceptance", default="synthetic:0.7",
                   help="synthetic[:MEAN[:CONC]] or empirical:TELEMETRY.jsonl (LLMEngine.export_telemetry)")
    s.add_argument("--accept-correlation", type=float, help="lag-1 correlation of token outcomes (0.3)")
    s.add_argument("--conf-sharpness", type=float, help="0 uninformative .. 1 perfect confidences (0.5)")
    s.add_argument("--conf-bias", type=float, help="logit shift of confidences, > 0 over-confident (0)")
    s.add_argument("--num-speculative-tokens", type=int, default=8)
    s.add_argument("--max-num-seqs", type=int, default=32)
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--max-num-batched-tokens", type=int)
    s.add_argument("--chars-per-token", type=float, default=4.0, help="prompt tokens = characters / this")
    s.add_argument("--time-noise", type=float, default=0.0, help="CV of lognormal noise on step times")


def cmd_profile(a: argparse.Namespace) -> int:
    from adaspec.llm import DEFAULT_PAIR, build_engine
    from adaspec.spec.profiler import profile_engine

    engine = build_engine(a.model, a.draft_model, "static:1", a.num_speculative_tokens, a.max_num_seqs,
                          a.max_model_len, device=a.device, dtype=a.dtype)
    names = (str(a.model or DEFAULT_PAIR / "target"), str(a.draft_model or DEFAULT_PAIR / "draft"))
    cm = profile_engine(engine, names, reprofile=True, budget_s=a.budget_s)
    cm.save(a.output)
    print(f"profile: {a.output} ({len(cm.meta.get('verify_samples', []))} verify and "
          f"{len(cm.meta.get('draft_samples', []))} draft points)")
    return 0


def setup(a: argparse.Namespace, slo_policy: str):
    """Cost models, acceptance, workload, config and a simulator from the shared arguments; an
    `auto[:F]` TPOT SLO becomes F x the median TPOT of lone warm-up requests under `slo_policy`."""
    from adaspec.bench.workload import build_workload
    from adaspec.sim.acceptance_sim import AcceptanceSpec
    from adaspec.sim.fitted import FittedCostModel
    from adaspec.sim.hardware import resolve_cost_model
    from adaspec.sim.simulator import SimConfig, Simulator
    from adaspec.spec.adaspec_policy import AdaSpecPolicy

    variants = AdaSpecPolicy.register_variants(a.variant)
    if a.mode != "open":
        raise ValueError(f"{a.command} replays arrivals (open loop) only")
    if a.temperature:
        raise ValueError(f"{a.command} models greedy verification (temperature 0) only")
    truth, cost_desc = resolve_cost_model(a.cost_model)
    believed, believed_desc = resolve_cost_model(a.policy_cost_model) if a.policy_cost_model else (None, None)
    acc = AcceptanceSpec.parse(a.acceptance, correlation=a.accept_correlation, sharpness=a.conf_sharpness,
                               bias=a.conf_bias)
    wl = build_workload(a.prompts, a.arrivals, a.trace, a.num_requests, a.duration, a.time_scale,
                        a.output_len, a.seed, a.shift_trace)
    cfg = SimConfig(a.num_speculative_tokens, a.max_num_seqs, a.max_model_len, a.max_num_batched_tokens,
                    a.max_prompt_tokens or 1024, a.chars_per_token, a.slo_ttft_ms, None, a.seed, a.time_noise,
                    record_steps=False)
    sim = Simulator(truth, acc, cfg, believed)
    slo_note = ""
    if isinstance(a.slo_tpot_ms, str):  # auto[:F]: F x median TPOT of warm-up requests, each alone
        from adaspec.bench.sweep import resolve_auto_slo

        warm = [sim.run(slo_policy, [r]).results[0] for r in wl.requests[:max(a.warmup, 1)]]
        cfg.slo_tpot_ms = resolve_auto_slo(a.slo_tpot_ms, warm)
        slo_note = f"(from {a.slo_tpot_ms}: median TPOT of {len(warm)} lone requests under {slo_policy})"
    else:
        cfg.slo_tpot_ms = a.slo_tpot_ms
    sim_meta = {"cost_model": cost_desc, "policy_cost_model": believed_desc or "the truth (perfect profile)",
                "acceptance": acc.describe(), "config": {k: v for k, v in vars(cfg).items()},
                "prompt_tokens": f"characters / {a.chars_per_token}, cut to {cfg.max_prompt_tokens} and to "
                                 "max_model_len - max_tokens"}
    if variants:
        sim_meta["variants"] = variants
    if isinstance(truth, FittedCostModel):  # keep the fitted coefficients with the report
        sim_meta["cost_model_fit"] = truth.to_dict()
    return truth, believed, acc, wl, cfg, sim, slo_note, sim_meta


def cmd_simulate(a: argparse.Namespace) -> int:
    from adaspec.bench.metrics import summarize, timeline

    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    if not a.no_oracle and "oracle" not in policies:
        policies.append("oracle")
    truth, _, _, wl, cfg, sim, slo_note, sim_meta = setup(a, policies[0])
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, rows, walls = [], [], {}
    for policy in policies:
        for level in a.rate_scale:
            res = sim.run(policy, wl.at_rate_scale(level))
            s = summarize(res.results, res.duration, a.slo_ttft_ms, cfg.slo_tpot_ms)
            s.update(policy=policy, level=level, mode="open", server_policy=res.policy,
                     timeline=timeline(res.results, res.duration), server_series=res.series,
                     sim_wall_s=round(res.wall_s, 3))
            runs.append(s)
            rows += [{"policy": policy, "level": level, **r.as_dict()} for r in res.results]
            walls[f"{policy}@{level:g}"] = round(res.wall_s, 2)
            if not a.quiet:
                print(f"{policy} x{level:g}: {s['output_throughput']:.1f} tok/s, TPOT p99 "
                      f"{s['tpot_ms']['p99'] or 0:.1f} ms, SLO {s['slo']['attainment']} "
                      f"({res.wall_s:.1f} s wall)", file=sys.stderr)
    sim_meta["wall_s"] = walls
    path = write_report(out, a, policies, wl, runs, rows, cfg.slo_tpot_ms, slo_note, sim_meta, truth)
    print(f"report: {path}")
    return 0


def cmd_capacity(a: argparse.Namespace) -> int:
    from adaspec.sim.cluster import capacity_curve, capacity_markdown, plot_capacity

    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    truth, believed, acc, wl, cfg, _, slo_note, sim_meta = setup(a, "none")
    if believed is not None:
        raise ValueError("capacity: --policy-cost-model is not supported (replicas use the truth)")
    if cfg.slo_tpot_ms is None and cfg.slo_ttft_ms is None:
        raise ValueError("capacity needs an SLO (--slo-tpot-ms and/or --slo-ttft-ms)")

    def progress(p):
        if not a.quiet:
            print(f"{p.policy} x{p.replicas} @ {p.rate:g} req/s: SLO {p.summary['slo']['attainment']:.3f}, "
                  f"{p.summary['num_requests']} requests ({p.wall_s:.1f} s wall)", file=sys.stderr)

    points = capacity_curve(truth, acc, cfg, wl.requests, policies, a.replicas, a.rates, a.window,
                            a.stop_below, progress)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["adaspec", *sys.argv[1:]])
    meta = {"command": command, "workload": wl.description, "slo_tpot_ms": cfg.slo_tpot_ms,
            "slo_ttft_ms": cfg.slo_ttft_ms, "slo_note": slo_note, "window_s": a.window, "target": a.target,
            "router": "least outstanding requests at arrival (ties: lowest replica index)", **sim_meta}
    rows = [{"policy": p.policy, "replicas": p.replicas, "rate": p.rate, "per_replica": p.per_replica,
             "wall_s": p.wall_s, **p.summary} for p in points]
    (out / "capacity.json").write_text(json.dumps({"meta": meta, "points": rows}, indent=1))
    plot_capacity(points, out / "capacity.png", sim_meta["cost_model"].split(";")[0], a.target)
    slo = " ".join(([f"TPOT {cfg.slo_tpot_ms:.1f} ms {slo_note}"] if cfg.slo_tpot_ms else [])
                   + ([f"TTFT {cfg.slo_ttft_ms:g} ms"] if cfg.slo_ttft_ms else []))
    text = "\n".join([
        "# adaspec capacity curve", "", f"Command: `{command}`  ", f"Cost model: {sim_meta['cost_model']}  ",
        f"Acceptance: {sim_meta['acceptance']}  ", f"Workload: {wl.description['arrivals']}; "
        f"{wl.description['output_len']}; each point replays the first rate x {a.window:g} arrivals, "
        f"time-scaled to fill {a.window:g} s  ", f"SLO: {slo}  ", f"Router: {meta['router']}", "",
        capacity_markdown(points, a.target), "![capacity](capacity.png)", ""])
    (out / "capacity.md").write_text(text)
    print(f"report: {out / 'capacity.md'}")
    return 0


def write_report(out: Path, a, policies, wl, runs, rows, tpot_ms, slo_note, sim_meta, truth) -> Path:
    """The bench report (same meta, tables and plots), plus what was simulated and how."""
    from types import SimpleNamespace

    from adaspec.bench.report import collect_meta, markdown, write_plots, write_summary
    from adaspec.bench.sweep import SweepConfig

    m = truth.meta
    cfg = SweepConfig(policies=[p for p in policies if p not in ("oracle", "oracle-noslo")],
                      output_dir=str(out), model=f"{m.get('target', 'profiled target')} (simulated)",
                      draft_model=f"{m.get('draft', 'profiled draft')} (simulated)",
                      num_speculative_tokens=a.num_speculative_tokens, max_num_seqs=a.max_num_seqs,
                      max_model_len=a.max_model_len, dtype="modelled", prompts=a.prompts, arrivals=a.arrivals,
                      trace=a.trace, rate_scales=a.rate_scale, slo_ttft_ms=a.slo_ttft_ms,
                      slo_tpot_ms=a.slo_tpot_ms, warmup=0,
                      max_prompt_tokens=sim_meta["config"]["max_prompt_tokens"],
                      command=shlex.join(["adaspec", *sys.argv[1:]]))
    shim = SimpleNamespace(cfg=cfg, workload=wl, servers={}, failed_policies={}, slo_tpot_ms=tpot_ms,
                           slo_note=slo_note, tokenizer=None)
    meta = collect_meta(shim)
    oracle = {"note": "upper bound: knows future acceptance"}
    meta["policies"] = {p: meta["policies"].get(p, oracle) for p in policies}
    meta["machine"]["cpu"] = f"simulated ({sim_meta['cost_model']}); simulator host {meta['machine']['cpu']}"
    meta["server_threads"] = "n/a (simulated)"
    meta["prompt_tokenizer"] = sim_meta["prompt_tokens"]
    meta["simulation"] = sim_meta
    write_summary(out, meta, runs)
    with (out / "requests.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tpots: dict = {}
    for row in rows:
        if row["tpot"] is not None:
            tpots.setdefault((row["policy"], row["level"]), []).append(row["tpot"] * 1e3)
    plots = write_plots([{**r, "_tpots": tpots.get((r["policy"], r["level"]), [])} for r in runs], meta, out)
    text = markdown(meta, runs, plots).replace("# adaspec benchmark", "# adaspec simulation", 1)
    text += "\n## Simulation\n\n" + "\n".join(
        [f"- Cost model (truth): {sim_meta['cost_model']}",
         f"- Cost model the policies use: {sim_meta['policy_cost_model']}",
         f"- Acceptance: {sim_meta['acceptance']}",
         f"- Prompt tokens: {sim_meta['prompt_tokens']}; outputs end at max_tokens (ignore_eos)",
         "- Oracle: knows each request's future acceptance outcomes; per step it picks the per-request "
         "draft lengths with the most emitted tokens per unit of true step time within the SLOs (the "
         "bound a per-step controller reaches with perfect acceptance knowledge).",
         "- Streaming: one chunk per engine step at the step's end; timings are modelled, not measured.",
         f"- Simulator wall time per run (s): {sim_meta['wall_s']}",
         f"- Mean simulator wall time per run: {np.mean(list(sim_meta['wall_s'].values())):.2f} s"]) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path
