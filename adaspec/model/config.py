"""Model configuration parsed from a Hugging Face ``config.json``.

We read the JSON ourselves (rather than going through ``transformers.AutoConfig``) so that the engine only
depends on the handful of fields our forward actually implements, and so that anything we do *not*
implement (an unknown architecture, an exotic RoPE variant, partial rotary embeddings) fails loudly at load
time instead of silently producing wrong logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# Defaults transformers' config classes use when a key is missing from config.json. They differ per family,
# and matching them matters for logit parity with transformers.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "MistralForCausalLM": dict(max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2),
    "Qwen2ForCausalLM": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    # Qwen3Config defaults head_dim to 128, not hidden_size // num_attention_heads.
    "Qwen3ForCausalLM": dict(
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, head_dim=128
    ),
}


@dataclass
class ModelConfig:
    """The subset of a Llama-family config that our forward needs, normalised across families.

    Bias flags are split because the families disagree: Llama/Qwen3 ``attention_bias`` covers q, k, v *and*
    o; Qwen2 always has q/k/v bias and never an o bias; Mistral has none.

    ``sliding_window`` is recorded but not implemented: with ``max_model_len <= sliding_window`` every key is
    inside the window anyway, so full causal attention is exact. :func:`check_max_model_len` enforces that.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Normalised RoPE parameters (factor, low/high_freq_factor, original_max_position_embeddings, ...).
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama ``mlp_bias``)
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    max_position_embeddings: int = 2048
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # checkpoint dtype string ("bfloat16", ...), informational
    sliding_window: int | None = None
    hidden_act: str = "silu"
    model_type: str | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json`` dict; ValueError for anything we cannot run exactly."""
        archs = d.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        if not archs:
            raise ValueError(f"config.json has no 'architectures'; supported architectures: {supported}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported architectures: {supported}")
        fam = _FAMILY_DEFAULTS[arch]

        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        kv_heads = d.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else int(kv_heads)
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = d.get("head_dim", fam.get("head_dim"))
        head_dim = int(head_dim) if head_dim else hidden // heads

        hidden_act = d.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only SwiGLU (silu) MLPs are supported")

        max_pos = int(d.get("max_position_embeddings") or fam["max_position_embeddings"])
        rope_theta, rope_type, rope_scaling = _parse_rope(d, max_pos)

        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        elif arch == "MistralForCausalLM":
            qkv_bias = o_bias = False
        else:  # Llama, Qwen3: attention_bias covers all four projections
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False

        eos = d.get("eos_token_id", fam["eos_token_id"])
        if eos is None:
            eos_list = []
        else:
            eos_list = [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]

        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            max_position_embeddings=max_pos,
            eos_token_id=eos_list,
            bos_token_id=d.get("bos_token_id", fam["bos_token_id"]),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
            sliding_window=_parse_sliding_window(arch, d),
            hidden_act=hidden_act,
            model_type=d.get("model_type"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``<path>/config.json`` (``path`` may also point at the JSON file itself)."""
        path = os.fspath(path)
        cfg_path = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"no config.json found at {cfg_path!r}")
        with open(cfg_path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))

    @property
    def torch_dtype(self) -> str | None:
        """Alias of ``dtype`` under its transformers-4 name."""
        return self.dtype

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def _parse_rope(d: dict[str, Any], max_pos: int) -> tuple[float, str, dict[str, Any]]:
    """Normalise RoPE settings the way transformers' ``convert_rope_params_to_dict`` does.

    transformers 4.x writes a top-level ``rope_theta`` plus an optional ``rope_scaling`` dict; transformers 5
    writes everything into ``rope_parameters``. ``rope_scaling`` wins when both exist, as in transformers.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    params = dict(params)
    # Per-layer-type nesting ({"full_attention": {...}, "sliding_attention": {...}}) only makes sense for
    # models with heterogeneous layers, which we do not run; accept it only when every entry agrees.
    nested = [k for k in ("full_attention", "sliding_attention") if isinstance(params.get(k), dict)]
    if nested:
        entries = [params[k] for k in nested]
        if any(e != entries[0] for e in entries):
            raise ValueError("per-layer-type RoPE parameters that differ between layers are not supported")
        params = dict(entries[0])

    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE type {rope_type!r}; supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta")
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    theta = float(theta)
    prf = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"partial_rotary_factor={prf} is not supported (only full rotary embeddings)")

    out: dict[str, Any] = {k: v for k, v in params.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = rope_type
    if rope_type in ("linear", "dynamic", "llama3") and out.get("factor") is None:
        raise ValueError(f"RoPE type {rope_type!r} requires a 'factor'")
    if rope_type in ("llama3", "yarn"):
        # transformers gives a top-level original_max_position_embeddings priority over the dict's.
        if d.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
        out.setdefault("original_max_position_embeddings", max_pos)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if out.get(key) is None:
                raise ValueError(f"RoPE type 'llama3' requires {key!r}")
    if rope_type == "yarn" and out.get("factor") is None:
        out["factor"] = max_pos / out["original_max_position_embeddings"]
    return theta, rope_type, out


def _parse_sliding_window(arch: str, d: dict[str, Any]) -> int | None:
    """Effective sliding window, following each transformers config class's rules (None = full attention)."""
    if arch == "MistralForCausalLM":
        sw = d.get("sliding_window", 4096)  # MistralConfig's default; null in config.json disables it
        return int(sw) if sw else None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not d.get("use_sliding_window", False):
            return None
        sw = d.get("sliding_window", 4096)
        if not sw:
            return None
        layer_types = d.get("layer_types")
        if layer_types is None:
            n, first = int(d["num_hidden_layers"]), int(d.get("max_window_layers", 28))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return int(sw) if "sliding_attention" in layer_types else None
    return None


def check_max_model_len(config: ModelConfig, max_model_len: int) -> None:
    """Reject a ``max_model_len`` we cannot serve exactly.

    Beyond ``max_position_embeddings`` the model was never trained (and dynamic-NTK RoPE would change its
    frequencies with length, which a KV cache cannot follow). Beyond ``sliding_window`` transformers would
    restrict attention to the window, which our full-attention forward does not implement.
    """
    if max_model_len < 1:
        raise ValueError(f"max_model_len={max_model_len} must be positive")
    if max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if config.sliding_window is not None and max_model_len > config.sliding_window:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's sliding_window={config.sliding_window}; "
            "sliding-window attention is not implemented, so max_model_len must be <= sliding_window"
        )
