"""Analytic (roofline) step-time model of a model pair on a GPU, as a `CostModel` the policies use.

A forward of `batch` rows, `tokens` tokens each, attending over `context` positions, on `tp` GPUs:

    t = launch + max(FLOPs / (peak * flops_eff), bytes / (bandwidth * bw_eff)) / tp + all-reduce
    FLOPs = 2 * params * N + 4 * layers * hidden * N * context           (N = batch * tokens)
    bytes = params * dtype_bytes + batch * context * kv_bytes_per_token   (weights + KV cache read)
    all-reduce (tp > 1) = 2 * layers * (latency + 2 (tp-1)/tp * N * hidden * dtype_bytes / link_bw)

Decode is memory-bound (weights read once per forward, whatever the batch) until N grows past
the ridge point, which is exactly why verification of k+1 tokens per request is almost free at
low load and costs ~k+1 steps at high load. The efficiency factors are assumptions, not
measurements; a measured profile (`adaspec profile`) replaces the whole model when one exists.

Validation anchor (see `validate_a100_7b`): NVIDIA's NeMo Framework performance page ("Llama-2
Results, Inference Performance", docs.nvidia.com/nemo-framework/user-guide/latest/performance/
llama.html) lists Llama-2-7B on one A100 80GB SXM4 (TP=1), 128 input / 20 output tokens: average
latency 234.0 ms at batch 1 and 329.5 ms at batch 8. Taking out the prefill (our model's own
estimate) leaves about 11.8 ms and 13.4 ms per decode step; the preset lands within 25% of both
(test_sim_costs). That is one engine (TensorRT-LLM), one context length, one source: treat the
absolute times as +-25%, the shape (flat then linear in N) as the robust part.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from adaspec.spec.cost_model import CostModel


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers from the model's Hugging Face config.json (source in `source`)."""

    name: str
    params: float  # total parameters (embeddings included: the LM head is read every forward)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2  # fp16 / bf16 weights and KV cache
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU type. Peaks are the vendor datasheet's dense FP16/BF16 tensor FLOP/s and HBM/GDDR
    bandwidth; the efficiency factors and overheads are our assumptions (documented per field)."""

    name: str
    peak_flops: float  # dense FP16 tensor-core FLOP/s (datasheet, no sparsity)
    mem_bw: float  # bytes/s (datasheet)
    link_bw: float  # GPU-to-GPU bytes/s per direction used by all-reduce (NVLink or PCIe)
    flops_eff: float = 0.6  # achieved / peak on serving GEMMs (assumption; 0.5-0.7 typical)
    bw_eff: float = 0.75  # achieved / peak bandwidth on decode GEMVs (assumption; 0.7-0.85 typical)
    launch: float = 1.0e-3  # s per forward: kernel launches, CUDA-graph replay, sync (assumption)
    allreduce_latency: float = 8e-6  # s per all-reduce (NCCL small-message latency, assumption)
    overhead_per_row: float = 0.2e-3  # engine CPU work per row and step: sampling, bookkeeping
    source: str = ""


MODELS = {m.name: m for m in [
    ModelSpec("vicuna-7b", 6.74e9, 32, 4096, 32, 32, 32000,
              source="lmsys/vicuna-7b-v1.5 config.json (Llama-2-7B architecture)"),
    ModelSpec("vicuna-68m", 68e6, 2, 768, 12, 12, 32000, source="double7/vicuna-68m config.json"),
    ModelSpec("vicuna-33b", 32.5e9, 60, 6656, 52, 52, 32000,
              source="lmsys/vicuna-33b-v1.3 config.json (LLaMA-33B architecture)"),
    ModelSpec("vicuna-160m", 160e6, 12, 768, 12, 12, 32000, source="double7/vicuna-160m config.json"),
    ModelSpec("llama-3.3-70b", 70.6e9, 80, 8192, 64, 8, 128256,
              source="meta-llama/Llama-3.3-70B-Instruct config.json"),
    ModelSpec("llama-3.2-1b", 1.24e9, 16, 2048, 32, 8, 128256,
              source="meta-llama/Llama-3.2-1B-Instruct config.json (tied embeddings)"),
]}

HARDWARE = {h.name: h for h in [
    HardwareSpec("A100-80GB", 312e12, 2.039e12, 300e9,
                 source="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s FP16 dense, 2039 GB/s HBM2e, "
                        "NVLink 600 GB/s total"),
    HardwareSpec("L40", 181e12, 864e9, 32e9,
                 source="NVIDIA L40 datasheet: 181 TFLOP/s FP16 dense, 864 GB/s GDDR6, PCIe Gen4 x16 "
                        "(no NVLink)"),
    HardwareSpec("H100", 989e12, 3.35e12, 450e9,
                 source="NVIDIA H100 SXM5 datasheet: 989 TFLOP/s BF16 dense, 3.35 TB/s HBM3, NVLink "
                        "900 GB/s total"),
    HardwareSpec("H200", 989e12, 4.8e12, 450e9,
                 source="NVIDIA H200 SXM datasheet: 989 TFLOP/s BF16 dense, 4.8 TB/s HBM3e, NVLink "
                        "900 GB/s total"),
]}

# The paper's pairs and the GPUs each target was served on (draft with TP 1, as vLLM 0.6 allows).
PAIRS = {"vicuna-7b/vicuna-68m": ("vicuna-7b", "vicuna-68m", 1),
         "vicuna-33b/vicuna-160m": ("vicuna-33b", "vicuna-160m", 4),
         "llama-3.3-70b/llama-3.2-1b": ("llama-3.3-70b", "llama-3.2-1b", 8)}


class RooflineForward:
    """`ForwardTimeModel`-compatible: predict(batch, tokens_per_seq, context) on scalars or arrays."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, tp: int = 1):
        if tp < 1:
            raise ValueError(f"tensor-parallel degree must be >= 1, got {tp}")
        self.model, self.hw, self.tp = model, hw, tp
        m = model  # per-unit constants: policies call predict thousands of times per second
        self._flop_n = 2 * m.params / (hw.peak_flops * hw.flops_eff * tp)
        self._flop_nl = 4 * m.layers * m.hidden / (hw.peak_flops * hw.flops_eff * tp)
        self._mem_0 = m.params * m.dtype_bytes / (hw.mem_bw * hw.bw_eff * tp)
        self._mem_bl = m.kv_bytes_per_token / (hw.mem_bw * hw.bw_eff * tp)
        self._ar_0 = 2 * m.layers * hw.allreduce_latency if tp > 1 else 0.0
        self._ar_n = 2 * m.layers * 2 * (tp - 1) / tp * m.hidden * m.dtype_bytes / hw.link_bw

    def predict(self, batch, tokens_per_seq, context, attn_width=None):
        """attn_width is accepted for the cost model's interface and not used: on a GPU the
        attention kernels (paged, flash) do each row's real tokens, not a padded grid."""
        del attn_width
        if not isinstance(batch, np.ndarray) and not isinstance(tokens_per_seq, np.ndarray) \
                and not isinstance(context, np.ndarray):  # scalar fast path
            if batch <= 0:
                return 0.0
            n = batch * tokens_per_seq
            t = self.hw.launch + max(n * (self._flop_n + self._flop_nl * context),
                                     self._mem_0 + self._mem_bl * batch * context)
            return float(t + self._ar_0 + self._ar_n * n)
        b = np.asarray(batch, dtype=float)
        n = b * np.asarray(tokens_per_seq, dtype=float)
        ctx = np.asarray(context, dtype=float)
        t = self.hw.launch + np.maximum(n * (self._flop_n + self._flop_nl * ctx),
                                        self._mem_0 + self._mem_bl * b * ctx) + self._ar_0 + self._ar_n * n
        t = np.where(b > 0, t, 0.0)
        return float(t) if t.ndim == 0 else t

    def to_dict(self) -> dict:
        return {"kind": "roofline", "model": asdict(self.model), "hardware": asdict(self.hw), "tp": self.tp}


def analytic_cost_model(hardware: str | HardwareSpec, target: str | ModelSpec, draft: str | ModelSpec,
                        tp: int = 1, draft_tp: int = 1, padded: bool = False) -> CostModel:
    """A frozen `CostModel` whose forwards are roofline estimates. `padded=False`: vLLM-style
    packed batches (costs by mean tokens and context), the paper's engine."""
    hw = _lookup(HARDWARE, hardware, "hardware")
    tm, dm = _lookup(MODELS, target, "model"), _lookup(MODELS, draft, "model")
    meta = {"analytic": True, "hardware": hw.name, "target": tm.name, "draft": dm.name, "tp": tp,
            "draft_tp": draft_tp}
    return CostModel(RooflineForward(dm, hw, draft_tp), RooflineForward(tm, hw, tp), hw.overhead_per_row,
                     padded, meta, window=0)


def pair_cost_model(hardware: str, pair: str, tp: int | None = None) -> CostModel:
    """Preset pair ('vicuna-7b/vicuna-68m', ...) on a preset GPU, at the paper's TP unless given."""
    if pair not in PAIRS:
        raise ValueError(f"unknown model pair {pair!r}; known: {', '.join(PAIRS)}")
    t, d, paper_tp = PAIRS[pair]
    return analytic_cost_model(hardware, t, d, tp or paper_tp)


def _lookup(table: dict, value, what: str):
    if not isinstance(value, str):
        return value
    key = {k.lower(): k for k in table}.get(value.lower())
    if key is None:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(table)} (or give a JSON spec)")
    return table[key]


def _spec(cls, d, what: str, path: str):
    if isinstance(d, str):
        return _lookup(HARDWARE if cls is HardwareSpec else MODELS, d, what)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: '{what}' must be a preset name or an object, got {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    missing = {f.name for f in fields(cls) if f.default is MISSING} - set(d)
    if unknown or missing:
        raise ValueError(f"{path}: '{what}' has unknown fields {sorted(unknown)} / misses {sorted(missing)}")
    try:
        spec = cls(**d)
    except TypeError as exc:
        raise ValueError(f"{path}: bad '{what}': {exc}") from None
    for f in fields(cls):
        v = getattr(spec, f.name)
        if f.name not in ("name", "source") and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{path}: '{what}.{f.name}' must be a positive number, got {v!r}")
    return spec


def load_cost_model(path: str | Path) -> CostModel:
    """A cost model from a JSON file: a measured profile (`adaspec profile`, keys draft/verify) or
    an analytic spec {"hardware": NAME|{...}, "target": NAME|{...}, "draft": NAME|{...}, "tp": N}.
    Errors name the file and what is wrong."""
    path = str(path)
    try:
        d = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read cost model {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "verify" in d and "draft" in d and isinstance(d["verify"], dict):
        try:
            cm = CostModel.from_dict(d)
            cm.draft.check()
            cm.verify.check()
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid measured profile ({type(exc).__name__}: {exc})") from None
        cm.window = 0
        cm.reset()
        return cm
    if "hardware" in d and "target" in d and "draft" in d:
        hw = _spec(HardwareSpec, d["hardware"], "hardware", path)
        tm = _spec(ModelSpec, d["target"], "target", path)
        dm = _spec(ModelSpec, d["draft"], "draft", path)
        tp, dtp = d.get("tp", 1), d.get("draft_tp", 1)
        if not all(isinstance(x, int) and x >= 1 for x in (tp, dtp)):
            raise ValueError(f"{path}: 'tp' and 'draft_tp' must be integers >= 1")
        return analytic_cost_model(hw, tm, dm, tp, dtp, bool(d.get("padded", False)))
    raise ValueError(f"{path}: neither a measured profile (keys 'draft', 'verify') nor an analytic spec "
                     "(keys 'hardware', 'target', 'draft')")


def resolve_cost_model(spec: str) -> tuple[CostModel, str]:
    """`analytic:GPU:PAIR[:TP]`, `telemetry:[POLICY=]PATH[,...]` (fitted from a real run's engine
    telemetry, `adaspec.sim.fitted`) or a JSON path -> (cost model, description for the report)."""
    if spec.startswith("telemetry:"):
        from adaspec.sim.fitted import fit_telemetry

        cm = fit_telemetry([p for p in spec.removeprefix("telemetry:").split(",") if p])
        m, r = cm.meta, cm.meta["range"]
        return cm, (f"fitted from engine telemetry {', '.join(m['telemetry'])} ({m['decode_steps']} decode, "
                    f"{m['prefill_steps']} prefill steps; decode shapes seen: batch <= {r['batch']}, "
                    f"<= {r['tokens_per_row']} tokens per row, context <= {r['context']}): forwards pooled "
                    "over the files, time outside the forwards (in steps and between them) per policy, "
                    "measured in its own run")
    if spec.startswith("analytic:"):
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"cost model must be analytic:GPU:PAIR[:TP] or a JSON path, got {spec!r}")
        try:
            tp = int(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(f"cost model {spec!r}: TP must be an integer") from None
        cm = pair_cost_model(parts[1], parts[2], tp)
        m = cm.meta
        hw = HARDWARE[m["hardware"]]
        return cm, (f"analytic roofline: {m['target']} (TP {m['tp']}) / {m['draft']} on {hw.name} "
                    f"({hw.source}); efficiencies flops {hw.flops_eff}, bandwidth {hw.bw_eff}, "
                    f"launch {hw.launch * 1e3:g} ms/forward (assumptions)")
    cm = load_cost_model(spec)
    kind = "analytic spec" if cm.meta.get("analytic") else "measured profile"
    return cm, f"{kind} {spec}"


def a100_7b_decode_step(batch: int, context: int = 138) -> float:
    """Our A100-80GB / vicuna-7b (Llama-2-7B) decode step time (s), to compare with NeMo's figures."""
    cm = analytic_cost_model("A100-80GB", "vicuna-7b", "vicuna-68m")
    return cm.predict_verify(batch, 1, context) + cm.predict_overhead(batch, 0)
