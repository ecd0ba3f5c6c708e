"""`adaspec bench`: trace-replay and generated-load benchmarks of the server, per policy.

    workload.py  prompts, output lengths, arrival times (traces or generated), seeded
    client.py    async streaming client, open and closed loop, /metrics scraping
    metrics.py   TTFT / TPOT / ITL / E2E, throughput, SLO attainment, goodput, acceptance (vLLM's formulas)
    sweep.py     one fresh `adaspec serve` process per policy, the same workload at each load level
    report.py    results folder: requests.jsonl, summary.json/csv, PNG plots, report.md
    cli.py       the `adaspec bench run` and `adaspec bench sweep` commands
"""
