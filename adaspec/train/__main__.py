"""`python -m adaspec.train [all|prepare|target|draft|eval|export|card]`: resumable pair training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adaspec.train import pair


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adaspec.train", description=__doc__)
    ap.add_argument("phase", nargs="?", default="all",
                    choices=["all", "prepare", "target", "draft", "eval", "export", "card"])
    ap.add_argument("--workdir", type=Path, default=Path("runs/pair"))
    ap.add_argument("--out", type=Path, default=pair.DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target-steps", type=int)
    ap.add_argument("--draft-steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--top1-weight", type=float, help="weight of a cross-entropy term to the target's "
                    "argmax in the draft's distillation loss (default 0)")
    ap.add_argument("--init-from", type=Path, help="continue from an exported pair (e.g. adaspec/models/"
                    "default) when the work directory has no checkpoints")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = pair.PairConfig()
    for k in ("target_steps", "draft_steps", "seed", "init_from", "top1_weight"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    w = args.workdir
    if args.phase in ("all", "prepare"):
        pair.prepare(w, cfg)
    if args.phase in ("all", "target"):
        pair.train_target(w, cfg, args.device)
    if args.phase in ("all", "draft"):
        pair.distill_draft(w, cfg, args.device)
    if args.phase in ("all", "eval"):
        res = pair.evaluate(w, cfg, device=args.device)
        pair.log(w, phase="eval", **res)
        print(json.dumps(res))
    if args.phase in ("all", "export"):
        pair.export(w, cfg, args.out)
    if args.phase in ("all", "card"):
        write_card(w, cfg, args.out, args.device)


def write_card(workdir: Path, cfg: pair.PairConfig, out: Path, device: str) -> None:
    """Measure the exported pair and write card.json + README.md (the model card) beside it."""
    from adaspec.train import card

    res = card.measure(out)
    train = card.training_summary(workdir, cfg) if (workdir / "train.log").exists() else {}
    valid = pair.evaluate(workdir, cfg, device=device) if (workdir / "target.pt").exists() else {}
    (out / "card.json").write_text(json.dumps({"measured": res, "training": train, "validation": valid},
                                              indent=1))
    (out / "README.md").write_text(card.render(res, train, valid, cfg))


if __name__ == "__main__":
    main()
