"""A lean Llama-family forward (Llama, Mistral, Qwen2, Qwen3) with a static per-slot KV cache.

Parameter names are exactly Hugging Face's, so a checkpoint's safetensors load with ``strict=True``. The
math follows transformers' modeling code operation for operation where it affects numerics (fp32 RMSNorm,
rotate-half RoPE, cos/sin computed in fp32 then cast), so logits match transformers to float rounding.

The forward is written for per-op overhead, which dominates tiny models on CPU at batch 1: submodules exist
only to own parameters (their ``__call__`` is bypassed in favour of direct ``F.*`` calls), the RoPE cos/sin
table is precomputed, and everything that is shared by all layers (rope rows, attention mask, cache write
indices) is computed once per forward.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

_ROPE_INITIAL_LEN = 4096
# Rows whose cache slots are increasing but not contiguous (a draft forward of the requests still
# drafting) attend over a view of the slots' span, their queries placed at their slots' rows, when the
# span is at most this many times the rows: attention over a few absent rows costs less than copying
# every row's cache in every layer (the gather any other order needs). Measured on the embedded pair
# (`python benchmarks/slot_order.py --batch 16 --context 500 --widths 1,4 --gap-every 4`, one token a
# row, 2 threads): at a span of 4/3 the rows the draft forward took 1.75 ms through the span against
# 2.15 gathered, the target's 14.2 against 16.1; with `--gap-every 2` (twice the rows) the span read
# lost, 2.28 against 2.12 and 17.7 against 16.5.
SPAN_READ_MAX = 1.5
# Changed whenever the forward's speed changes (2: folded grouped-query attention), so start-up
# profiles timed on an older forward are not reused: part of a profile's cache key.
FORWARD_VERSION = 2


class KVCache:
    """Static per-slot KV cache: k and v are lists (one per layer) of tensors
    [num_slots, n_kv_heads, max_len, head_dim].

    Allocated zeroed: SDPA multiplies masked-out values by 0 and adds -inf to masked scores, so
    uninitialised memory holding NaN/inf would poison outputs even though those keys are masked.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        if not k or len(k) != len(v):
            raise ValueError("KVCache needs one k and one v tensor per layer")
        self.k = k
        self.v = v
        self.num_slots: int = k[0].shape[0]
        self.max_len: int = k[0].shape[2]

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        shape = (num_slots, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        return cls(k, v)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of cache one token occupies in one slot (k and v, all layers)."""
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


# ----------------------------------------------------------------------------------------------------------
# RoPE: inverse frequencies exactly as transformers' ROPE_INIT_FUNCTIONS compute them.


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2] fp32 on CPU, attention_scaling applied to cos/sin).

    Re-derived from transformers' ``modeling_rope_utils`` (same operations, same order) rather than called,
    because those helpers need a transformers config object.

    ``dynamic`` (NTK) RoPE in transformers only departs from the base frequencies once a sequence grows past
    ``max_position_embeddings`` — and then it re-derives frequencies from the current length, which a KV cache
    cannot follow. Within ``max_position_embeddings`` it equals the formula below with seq_len clamped to
    ``max_position_embeddings``; positions beyond it are rejected by the forward.
    """
    p = config.rope_scaling
    rope_type = config.rope_type
    base = config.rope_theta
    dim = config.head_dim
    scaling = 1.0

    def default_inv(b: float) -> torch.Tensor:
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim
        return 1.0 / (b**exponent)

    if rope_type == "default":
        return default_inv(base), scaling
    if rope_type == "linear":
        inv = default_inv(base)
        inv /= p["factor"]
        return inv, scaling
    if rope_type == "dynamic":
        factor = p["factor"]
        mpe = config.max_position_embeddings
        seq_len = mpe
        b = base * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return default_inv(b), scaling
    if rope_type == "llama3":
        inv = default_inv(base)
        factor = p["factor"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_l), scaling
    if rope_type == "yarn":
        return _yarn_inv_freq(config)
    raise ValueError(f"unsupported RoPE type {rope_type!r}")


def _yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    p = config.rope_scaling
    base = config.rope_theta
    dim = config.head_dim
    factor = p["factor"]
    ompe = p["original_max_position_embeddings"]

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(ompe / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv, float(attention_factor)


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *sign-folded* sin tables [length, head_dim] in fp32 on CPU.

    transformers rotates with ``q*cos + rotate_half(q)*sin`` where ``rotate_half(q) = cat(-q2, q1)`` and
    ``sin = cat(s, s)``. We store ``sin' = cat(-s, s)`` so the rotation is ``q*cos + roll(q, d/2)*sin'`` —
    one roll instead of two slices, a negation and a cat, with bit-identical products.
    """
    inv, scaling = rope_inv_freq(config)
    pos = torch.arange(length, dtype=torch.int64, device="cpu").float()
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    half = config.head_dim // 2
    sin[:, :half].neg_()
    return cos, sin


# ----------------------------------------------------------------------------------------------------------
# Modules. They own parameters under Hugging Face's names; the math lives in the ``run`` methods.


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shape = (dim,)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class Attention(nn.Module):
    """Owns the attention parameters; the math is in :meth:`DecoderLayer.run` (no ``forward``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = d**-0.5
        self.group = self.n_heads // self.n_kv  # query heads per KV head
        self.gqa = self.group > 1


class MLP(nn.Module):
    """Owns the SwiGLU parameters; the math is in :meth:`DecoderLayer.run` (no ``forward``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)


class _Step:
    """Per-forward values shared by every layer.

    With a cache, attention runs with grouped query heads folded into the query length: the g query heads
    that share a KV head attend as g*T queries of it, and ``mask`` is additive (0 or -inf) in that shape,
    [B, 1, g*T, L]. SDPA's ``enable_gqa`` and a boolean mask cost more on CPU: measured on the embedded
    target's attention (4 query heads, 2 KV heads, 2 threads), batch 16, 512 keys, 4 queries a row:
    0.55 ms a layer against 0.36 folded; one query a row at batch 32: 0.72 against 0.46; a 256-token
    prefill the same (0.43 ms). Outputs agree to float rounding.

    Layers see tokens flat, [M, hidden]. ``grid`` is None when the M tokens are the whole [B, T] grid. When
    they are the packed valid tokens, ``grid`` maps each grid cell to a packed token (a padding cell to some
    real one; its query's output is dropped) and ``w_sel`` maps each packed token back to its cell:
    attention alone needs the grid. Both are gathers (``index_select``), which on CPU cost a third of a
    scatter into zeros.
    """

    __slots__ = ("B", "T", "grid", "cos", "sin", "causal", "mask", "w_slot", "w_pos", "w_sel", "read_start",
                 "read_slots", "L", "span", "span_rows", "span_mask")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def run(self, x: torch.Tensor, st: _Step, kc: torch.Tensor | None, vc: torch.Tensor | None):
        a = self.self_attn
        M = x.shape[0]
        d = a.head_dim
        h = self.input_layernorm.run(x)
        q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(M, a.n_heads, d)
        k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(M, a.n_kv, d)
        v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(M, a.n_kv, d)
        if a.q_norm is not None:
            q = a.q_norm.run(q)
            k = a.k_norm.run(k)
        half = d // 2
        q = torch.addcmul(q * st.cos, q.roll(half, -1), st.sin)
        k = torch.addcmul(k * st.cos, k.roll(half, -1), st.sin)

        B, T = st.B, st.T
        if kc is None:
            o = F.scaled_dot_product_attention(
                q.view(B, T, a.n_heads, d).transpose(1, 2),
                k.view(B, T, a.n_kv, d).transpose(1, 2),
                v.view(B, T, a.n_kv, d).transpose(1, 2),
                is_causal=st.causal,
                scale=a.scale,
                enable_gqa=a.gqa,
            ).transpose(1, 2)
        else:
            kw, vw = k, v
            if st.w_sel is not None and st.grid is None:  # x is the padded grid: write its valid cells only
                kw = kw.index_select(0, st.w_sel)
                vw = vw.index_select(0, st.w_sel)
            kc[st.w_slot, :, st.w_pos] = kw
            vc[st.w_slot, :, st.w_pos] = vw
            L = st.L
            if st.grid is not None:
                q = q.index_select(0, st.grid)
            # each KV head's g query heads attend as one run of g*T queries (see `_Step.mask`)
            g = a.group
            q, mask = q.view(B, T, a.n_kv, g, d).permute(0, 2, 3, 1, 4).reshape(B, a.n_kv, g * T, d), st.mask
            if st.read_start is not None:
                s0 = st.read_start
                kr, vr = kc[s0 : s0 + B, :, :L], vc[s0 : s0 + B, :, :L]
            elif st.span is not None:  # rows in slot order with few gaps: attend over a view of the span
                s0, n = st.span
                kr, vr = kc[s0 : s0 + n, :, :L], vc[s0 : s0 + n, :, :L]
                q, mask = q.new_zeros((n, *q.shape[1:])).index_copy_(0, st.span_rows, q), st.span_mask
            else:
                kr = kc[:, :, :L].index_select(0, st.read_slots)
                vr = vc[:, :, :L].index_select(0, st.read_slots)
            o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=a.scale)
            if st.span is not None:
                o = o.index_select(0, st.span_rows)
            o = o.view(B, a.n_kv, g, T, d).permute(0, 3, 1, 2, 4)  # [B, T, heads]: head = kv * g + i
        o = o.reshape(B * T, a.n_heads * d)
        if st.grid is not None:
            o = o.index_select(0, st.w_sel)
        o = F.linear(o, a.o_proj.weight, a.o_proj.bias)
        x = x + o

        m = self.mlp
        h = self.post_attention_layernorm.run(x)
        g = F.silu(F.linear(h, m.gate_proj.weight, m.gate_proj.bias))
        u = F.linear(h, m.up_proj.weight, m.up_proj.bias)
        return x + F.linear(g * u, m.down_proj.weight, m.down_proj.bias)


class _Backbone(nn.Module):
    """Holds the ``model.*`` parameters (embeddings, layers, final norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """Causal LM with Hugging Face parameter names (``model.*`` and, when untied, ``lm_head.weight``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Built explicitly on CPU so that constructing under ``torch.device("meta")`` (the loader does) still
        # gets real tables; ``.to(device, dtype)`` moves and casts them with the weights.
        length = min(config.max_position_embeddings, _ROPE_INITIAL_LEN)
        cos, sin = rope_tables(config, length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    def ensure_rope(self, length: int) -> None:
        """Grow the cos/sin table to cover positions ``< length`` (doubling, to amortise regrowth)."""
        if length <= self.rope_cos.shape[0]:
            return
        cfg = self.config
        if cfg.rope_type == "dynamic" and length > cfg.max_position_embeddings:
            raise ValueError(
                f"position {length - 1} is beyond max_position_embeddings={cfg.max_position_embeddings}; "
                "dynamic-NTK RoPE changes its frequencies past that length, which is not supported"
            )
        new_len = max(length, 2 * self.rope_cos.shape[0])
        if cfg.rope_type == "dynamic":
            new_len = min(new_len, cfg.max_position_embeddings)
        cos, sin = rope_tables(cfg, new_len)
        like = self.rope_cos
        self.rope_cos = cos.to(device=like.device, dtype=like.dtype)
        self.rope_sin = sin.to(device=like.device, dtype=like.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Return final-norm hidden states [B, T, hidden].

        Without a cache each row attends causally over its own T tokens (by index; ``valid`` is ignored).
        With a cache, valid tokens are first written to ``cache[slots[b], :, positions[b, t]]`` and each query
        then attends to cache entries ``j <= positions[b, t]`` of its row's slot.

        ``packed`` (cache only) returns [N, hidden] for the N >= 1 valid tokens in row-major order instead,
        and runs every per-token op (embedding, norms, projections, RoPE, MLP) on those N only, so ragged rows
        cost padding in attention alone, which still uses the [B, T] grid and its mask.
        """
        B, T = input_ids.shape
        st = _Step()
        st.B, st.T, st.grid, st.mask = B, T, None, None
        if cache is None:
            if packed:
                raise ValueError("packed=True needs a cache")
            self.ensure_rope(int(positions.max()) + 1)
            st.causal = T > 1
        else:
            self._plan_cache_step(st, positions, cache, slots, valid, B, T)
        ids, pos = input_ids.reshape(-1), positions.reshape(-1)
        if packed and st.w_sel is not None:
            ids, pos = ids.index_select(0, st.w_sel), pos.index_select(0, st.w_sel)
            st.grid = (valid.reshape(-1).cumsum(0) - 1).clamp_(min=0)
        st.cos = F.embedding(pos, self.rope_cos).unsqueeze(1)
        st.sin = F.embedding(pos, self.rope_sin).unsqueeze(1)

        x = F.embedding(ids, self.model.embed_tokens.weight)
        if cache is None:
            for layer in self.model.layers:
                x = layer.run(x, st, None, None)
        else:
            for layer, kc, vc in zip(self.model.layers, cache.k, cache.v, strict=True):
                x = layer.run(x, st, kc, vc)
        x = self.model.norm.run(x)
        return x if packed else x.view(B, T, -1)

    def _plan_cache_step(
        self,
        st: _Step,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor | None,
        valid: torch.Tensor | None,
        B: int,
        T: int,
    ) -> None:
        """Compute cache write indices, attended key length L and visibility mask once per forward."""
        if slots is None:
            raise ValueError("slots is required when a cache is given")
        if not torch.is_tensor(slots):
            slots = torch.as_tensor(slots, dtype=torch.long, device=positions.device)
        if cache.dtype != self.rope_cos.dtype:
            raise ValueError(f"KV cache dtype {cache.dtype} does not match model dtype {self.rope_cos.dtype}")
        if cache.max_len > self.rope_cos.shape[0]:
            self.ensure_rope(cache.max_len)

        flat_pos = positions.reshape(-1)
        flat_slot = slots if T == 1 else slots.repeat_interleave(T)
        if valid is None:
            st.w_sel = None
            maxpos = positions.max()
        else:
            sel = valid.reshape(-1).nonzero().squeeze(1)
            st.w_sel = sel
            flat_pos = flat_pos.index_select(0, sel)
            flat_slot = flat_slot.index_select(0, sel)
            maxpos = torch.where(valid, positions, 0).max()
        st.w_slot, st.w_pos = flat_slot, flat_pos

        L = int(maxpos) + 1
        if L > cache.max_len:
            raise ValueError(f"position {L - 1} does not fit in a KV cache with max_len={cache.max_len}")
        st.L = L
        slot_list = slots.tolist()
        s0, span = slot_list[0], slot_list[-1] - slot_list[0] + 1
        st.read_start, st.read_slots, st.span = None, None, None
        if span == B and slot_list == list(range(s0, s0 + B)):
            st.read_start = s0  # contiguous slots: read through a view, no gather
        elif span <= SPAN_READ_MAX * B and all(a < b for a, b in itertools.pairwise(slot_list)):
            st.span = (s0, span)  # see SPAN_READ_MAX
            st.span_rows = slots - s0
        else:
            st.read_slots = slots
        if B == 1 and T == 1:
            st.mask = None  # the single query is at L-1 (or a padded 0 with L=1): every key is visible
        else:
            keys = torch.arange(L, device=positions.device)
            visible = (keys <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, L]
            g = self.config.num_attention_heads // self.config.num_key_value_heads
            if g > 1:  # the same rows for each of a KV head's g query heads
                visible = visible.expand(B, g, T, L).reshape(B, 1, g * T, L)
            st.mask = torch.zeros(visible.shape, dtype=cache.dtype, device=positions.device)
            st.mask.masked_fill_(~visible, float("-inf"))
        if st.span is not None:  # B >= 2: st.mask is set. Absent slots' rows see every key (finite, dropped)
            st.span_mask = torch.zeros((span, *st.mask.shape[1:]), dtype=cache.dtype, device=positions.device)
            st.span_mask.index_copy_(0, st.span_rows, st.mask)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states to vocabulary logits (float32)."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
