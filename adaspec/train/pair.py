"""Train the embedded target/draft pair: tokenizer, target (data loss), draft (distilled).

Every phase writes checkpoints into a work directory and resumes from them, so a stopped run loses
at most `ckpt_every` steps. Batches are a pure function of (seed, step), so a resumed run sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaspec.train import corpus

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool


@dataclass
class PairConfig:
    vocab_size: int = 4096
    seq_len: int = 256
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    target: ModelShape = field(default_factory=lambda: ModelShape(256, 704, 8, 4, 2, False))
    draft: ModelShape = field(default_factory=lambda: ModelShape(192, 512, 1, 3, 3, True))
    target_steps: int = 950
    draft_steps: int = 450
    target_batch: int = 8
    draft_batch: int = 16
    target_lr: float = 1.5e-3
    draft_lr: float = 3e-3
    warmup: int = 50
    kd_weight: float = 0.8  # draft loss = kd_weight * KL(target || draft) + (1 - kd_weight) * CE
    # + top1_weight * CE to the target's argmax: greedy acceptance counts only the top token
    top1_weight: float = 0.0
    ckpt_every: int = 25
    seed: int = 0
    # Start from an exported pair (its tokenizer and weights) when the work directory has no
    # checkpoint yet: checkpoints are not committed, the exported pair is.
    init_from: Path | None = None


def llama_config(cfg: PairConfig, shape: ModelShape, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_act="silu",
        attention_bias=False,
        **asdict(shape),
    )


def log(workdir: Path, **rec) -> None:
    rec["time"] = round(time.time(), 1)
    line = json.dumps(rec)
    print(line, flush=True)
    with open(workdir / "train.log", "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------------------- data


def prepare(workdir: Path, cfg: PairConfig) -> None:
    """Split the corpus, train the tokenizer, tokenize the splits, cut held-out prompts."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "train.npy").exists():
        return
    root = corpus.stdlib_root()
    split = corpus.build_split(root)
    if cfg.init_from is not None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(cfg.init_from / "target")
        tok.save_pretrained(workdir / "tokenizer")
    else:
        tok = corpus.train_tokenizer(split.train, cfg.vocab_size, workdir / "tokenizer")
    for name in ("train", "valid", "heldout"):
        np.save(workdir / f"{name}.npy", corpus.encode_files(tok, getattr(split, name)))
    corpus.write_prompts(corpus.heldout_prompts(split.heldout, root), workdir / "prompts.jsonl")
    (workdir / "split.json").write_text(json.dumps({
        "python": corpus.sysconfig.get_python_version(),
        **{k: [p.relative_to(root).as_posix() for p in getattr(split, k)]
           for k in ("train", "valid", "heldout")},
    }, indent=0))
    log(workdir, phase="prepare", files={k: len(getattr(split, k)) for k in ("train", "valid", "heldout")},
        tokens={k: int(np.load(workdir / f"{k}.npy").size) for k in ("train", "valid", "heldout")})


def batch(stream: np.ndarray, seq_len: int, bsz: int, seed: int, step: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - seq_len - 1, size=bsz)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------- training


def _load_tokenizer(workdir: Path):
    from transformers import PreTrainedTokenizerFast

    if not (workdir / "tokenizer" / "tokenizer.json").exists():  # else transformers asks a model hub
        raise ValueError(f"workdir {str(workdir)!r} has no tokenizer: run the 'prepare' phase first "
                         f"(python -m adaspec.train prepare --workdir {workdir})")
    return PreTrainedTokenizerFast.from_pretrained(workdir / "tokenizer")


def _train_loop(workdir: Path, name: str, model, total: int, bsz: int, peak_lr: float,
                cfg: PairConfig, loss_fn, device: str) -> None:
    ckpt = workdir / f"{name}.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(workdir, phase=name, resumed_at=step)
    elif cfg.init_from is not None and (cfg.init_from / name / "config.json").exists():
        from transformers import LlamaForCausalLM

        init = LlamaForCausalLM.from_pretrained(cfg.init_from / name, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        log(workdir, phase=name, initialized_from=str(cfg.init_from / name),
            prior=prior_training(cfg.init_from, name))
    train = np.load(workdir / "train.npy")
    model.train()
    t0, tokens = time.time(), 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak_lr, cfg.warmup)
        x = batch(train, cfg.seq_len, bsz, cfg.seed + (0 if name == "target" else 1), step).to(device)
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 10 == 0 or step == total:
            log(workdir, phase=name, step=step, loss=round(loss.item(), 4),
                lr=round(opt.param_groups[0]["lr"], 6), tok_per_s=round(tokens / (time.time() - t0)))
        if step % cfg.ckpt_every == 0 or step == total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            tmp.replace(ckpt)


def prior_training(exported: Path, which: str) -> dict:
    """Steps and tokens an exported pair's model had seen (from its card), so a card written after
    continuing from it counts its whole training, not only the continuation."""
    card = exported / "card.json"
    if not card.exists():
        return {"steps": 0, "tokens": 0}
    t = json.loads(card.read_text()).get("training", {})
    return {"steps": int(t.get(f"{which}_steps", 0)), "tokens": int(t.get(f"{which}_tokens", 0))}


def build_model(cfg: PairConfig, which: str, eos_id: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed + (0 if which == "target" else 1))
    shape = cfg.target if which == "target" else cfg.draft
    return LlamaForCausalLM(llama_config(cfg, shape, eos_id))


def load_trained(workdir: Path, cfg: PairConfig, which: str, device: str):
    tok = _load_tokenizer(workdir)
    model = build_model(cfg, which, tok.eos_token_id).to(device)
    model.load_state_dict(torch.load(workdir / f"{which}.pt", map_location=device)["model"])
    return model.eval()


def train_target(workdir: Path, cfg: PairConfig, device: str) -> None:
    prepare(workdir, cfg)  # nothing to do when the work directory is prepared
    tok = _load_tokenizer(workdir)
    model = build_model(cfg, "target", tok.eos_token_id).to(device)
    log(workdir, phase="target", params=sum(p.numel() for p in model.parameters()))

    def loss_fn(x):
        logits = model(x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    _train_loop(workdir, "target", model, cfg.target_steps, cfg.target_batch, cfg.target_lr, cfg,
                loss_fn, device)


def distill_draft(workdir: Path, cfg: PairConfig, device: str) -> None:
    """Agreement with the target is what speculation needs, so the draft learns the target's
    next-token distribution (forward KL), with a little data loss mixed in."""
    prepare(workdir, cfg)
    tok = _load_tokenizer(workdir)
    teacher = load_trained(workdir, cfg, "target", device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = build_model(cfg, "draft", tok.eos_token_id).to(device)
    log(workdir, phase="draft", params=sum(p.numel() for p in model.parameters()))

    def loss_fn(x):
        inp = x[:, :-1]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(inp).logits.float(), -1).reshape(-1, cfg.vocab_size)
        logits = model(inp).logits.reshape(-1, cfg.vocab_size)
        logq = F.log_softmax(logits, -1)
        kd = F.kl_div(logq, t_logp, log_target=True, reduction="batchmean")
        ce = F.cross_entropy(logits, x[:, 1:].reshape(-1))
        loss = cfg.kd_weight * kd + (1 - cfg.kd_weight) * ce
        if cfg.top1_weight:
            loss = loss + cfg.top1_weight * F.cross_entropy(logits, t_logp.argmax(-1))
        return loss

    _train_loop(workdir, "draft", model, cfg.draft_steps, cfg.draft_batch, cfg.draft_lr, cfg,
                loss_fn, device)


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(workdir: Path, cfg: PairConfig, split: str = "valid", windows: int = 64,
             device: str = "cpu") -> dict:
    """Loss of each model and teacher-forced top-1 agreement between draft and target."""
    stream = np.load(workdir / f"{split}.npy")
    target = load_trained(workdir, cfg, "target", device)
    draft = load_trained(workdir, cfg, "draft", device) if (workdir / "draft.pt").exists() else None
    n = min(windows, stream.size // (cfg.seq_len + 1))
    xs = torch.from_numpy(stream[: n * (cfg.seq_len + 1)].astype(np.int64)).view(n, -1)
    out = {"split": split, "tokens": int(n * cfg.seq_len)}
    agree, losses = 0, {"target": 0.0, "draft": 0.0}
    for x in xs.split(8):
        x = x.to(device)
        tl = target(x[:, :-1]).logits
        losses["target"] += F.cross_entropy(tl.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        if draft is not None:
            dl = draft(x[:, :-1]).logits
            losses["draft"] += F.cross_entropy(dl.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            agree += (dl.argmax(-1) == tl.argmax(-1)).sum().item()
    out["target_loss"] = round(losses["target"] / out["tokens"], 4)
    if draft is not None:
        out["draft_loss"] = round(losses["draft"] / out["tokens"], 4)
        out["top1_agreement"] = round(agree / out["tokens"], 4)
    return out


# -------------------------------------------------------------------------------------- export


def export(workdir: Path, cfg: PairConfig, out_dir: Path = DEFAULT_OUT, dtype=torch.float16) -> None:
    """Hugging Face layout (config.json, generation_config.json, safetensors, tokenizer)."""
    from transformers import GenerationConfig

    tok = _load_tokenizer(workdir)
    for which in ("target", "draft"):
        model = load_trained(workdir, cfg, which, "cpu").to(dtype)
        d = out_dir / which
        d.mkdir(parents=True, exist_ok=True)
        model.config.torch_dtype = dtype
        model.save_pretrained(d, safe_serialization=True)
        GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id).save_pretrained(d)
        tok.save_pretrained(d)
    prompts = workdir / "prompts.jsonl"
    if prompts.exists():
        (out_dir / "prompts.jsonl").write_text(prompts.read_text())
