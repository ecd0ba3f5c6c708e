"""Cached attention on CPU: SDPA with `enable_gqa` and a boolean mask, against grouped query heads
folded into the query length with an additive mask (what `llama.py` runs since session 14).

    python benchmarks/attention_layout.py --batches 1,4,16,32 --queries 1,2,4,6 --keys 128,512

One attention call of the embedded target's shape (4 query heads, 2 KV heads, head size 64; the
flags change it), as a decoder layer runs it per forward: queries arrive as [B * T, heads, d], the
output leaves as [B * T, heads * d], so the folded layout's two copies (queries in, output out) are
timed with it. Row b's T queries sit at the end of its `--keys` keys (causal within the step).
The two layouts alternate call by call, so the host's drift falls on each alike; reported: the
median ms of each and their ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def layouts(B: int, T: int, L: int, heads: int, kv: int, d: int, seed: int = 0):
    """The two calls on the same inputs: (name, fn) for the boolean-mask GQA call and the folded one."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B * T, heads, d, generator=g)
    k, v = torch.randn(B, kv, L, d, generator=g), torch.randn(B, kv, L, d, generator=g)
    group = heads // kv
    positions = torch.arange(L - T, L).expand(B, T)
    visible = (torch.arange(L) <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, L]
    folded_mask = torch.zeros(B, 1, group * T, L).masked_fill_(
        ~visible.expand(B, group, T, L).reshape(B, 1, group * T, L), float("-inf"))

    def gqa():
        o = F.scaled_dot_product_attention(q.view(B, T, heads, d).transpose(1, 2), k, v, attn_mask=visible,
                                           enable_gqa=group > 1)
        return o.transpose(1, 2).reshape(B * T, heads * d)

    def folded():
        qf = q.view(B, T, kv, group, d).permute(0, 2, 3, 1, 4).reshape(B, kv, group * T, d)
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=folded_mask)
        return o.view(B, kv, group, T, d).permute(0, 3, 1, 2, 4).reshape(B * T, heads * d)

    return (("gqa_bool_mask", gqa), ("folded_additive_mask", folded))


def measure(B: int, T: int, L: int, heads: int, kv: int, d: int, repeats: int) -> dict:
    calls = layouts(B, T, L, heads, kv, d)
    times = {name: [] for name, _ in calls}
    for _ in range(3):  # warm-up
        for _, fn in calls:
            fn()
    for _ in range(repeats):
        for name, fn in calls:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    diff = float((calls[0][1]() - calls[1][1]()).abs().max())
    return {"batch": B, "queries": T, "keys": L, **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
            "ratio": round(ms["folded_additive_mask"] / ms["gqa_bool_mask"], 3), "max_abs_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--queries", default="1,2,4,6", help="tokens a row: 1 decode, k+1 verification")
    ap.add_argument("--keys", default="128,512")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", help="also write OUT.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    print("| batch | queries a row | keys | gqa + bool mask (ms) | folded + additive (ms) | ratio "
          "| max diff |")
    print("|---|---|---|---|---|---|---|")
    for B in map(int, a.batches.split(",")):
        for T in map(int, a.queries.split(",")):
            for L in map(int, a.keys.split(",")):
                r = measure(B, T, L, a.heads, a.kv_heads, a.head_dim, a.repeats)
                rows.append(r)
                print(f"| {B} | {T} | {L} | {r['gqa_bool_mask_ms']:.3f} | {r['folded_additive_mask_ms']:.3f} "
                      f"| {r['ratio']:.2f} | {r['max_abs_diff']:.1e} |")
    if a.out:
        args = sys.argv[1:] if argv is None else argv
        with open(f"{a.out}.json", "w") as f:
            json.dump({"command": "python benchmarks/attention_layout.py " + " ".join(args),
                       "threads": a.threads, "torch": torch.__version__, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
