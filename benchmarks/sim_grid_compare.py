"""Policies of one or more simulated paper grids against the best baseline of a reference grid.

    python benchmarks/sim_paper_grid.py ... --policies adaspec,adaspec-strict --capacity-pair '' --out runs/g
    python benchmarks/sim_grid_compare.py docs/sim_paper_grid_s20.json runs/g.json [more.json ...]

Re-running only the policies under test on the same draws (same pairs, traces, loads, seed) is
cheap; the baselines' cells come from the reference grid (`sim_paper_grid.py`'s JSON), whose cells
a re-run reproduces exactly while the baselines' code and the simulator are unchanged (check it:
a policy in both files must give the same numbers). Per pair and policy: in how many cells its mean
TPOT beats the best baseline's (the lowest), the range and mean of that gain, and its SLO
attainment against the best baseline's (the highest).
"""

from __future__ import annotations

import argparse
import json

BASELINES = ("none", "static:1", "static:3", "static:5", "threshold", "smartspec")


def compare(reference: dict, cells: dict, baselines=BASELINES) -> list[dict]:
    """One row per (pair, policy) of `cells` that is not a baseline: TPOT gain over the best
    baseline per cell (best / policy - 1, > 0: ahead) and attainment minus the best baseline's."""
    rows: dict[tuple[str, str], dict] = {}
    for key, c in cells.items():
        pair, trace, load, policy = key.split("|")
        if policy in baselines:
            continue
        keys = (f"{pair}|{trace}|{load}|{b}" for b in baselines)
        base = [reference[k] for k in keys if k in reference]
        if not base:
            raise ValueError(f"reference grid has no baseline cell for {pair}|{trace}|{load}")
        row = rows.setdefault((pair, policy), {"pair": pair, "policy": policy, "gain": [], "attainment": []})
        row["gain"].append(min(b["tpot_mean"] for b in base) / c["tpot_mean"] - 1)
        row["attainment"].append(c["attainment"] - max(b["attainment"] for b in base))
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", help="a sim_paper_grid.py JSON holding the baselines' cells")
    ap.add_argument("grids", nargs="+", help="sim_paper_grid.py JSONs with the policies to compare")
    a = ap.parse_args()
    with open(a.reference) as f:
        reference = json.load(f)["cells"]
    cells = {}
    for path in a.grids:
        with open(path) as f:
            cells.update(json.load(f)["cells"])
    print("| pair | policy | cells ahead on mean TPOT | gain over best baseline (range; mean) "
          "| attainment - best baseline's (range; cells >= 0) |")
    print("|---|---|---|---|---|")
    for r in compare(reference, cells):
        g, at = r["gain"], r["attainment"]
        print(f"| {r['pair']} | {r['policy']} | {sum(x > 0 for x in g)} of {len(g)} | "
              f"{100 * min(g):+.1f}..{100 * max(g):+.1f}%; {100 * sum(g) / len(g):+.2f}% | "
              f"{min(at):+.3f}..{max(at):+.3f}; {sum(x >= 0 for x in at)} |")


if __name__ == "__main__":
    main()
