"""Load Hugging Face Llama-family checkpoints (config.json + safetensors) into :class:`LlamaModel`.

Only local directories are accepted and no remote code is ever executed: the model code is ours, the weights
come from safetensors (no pickle), and the tokenizer goes through ``AutoTokenizer`` with
``local_files_only=True`` and transformers' default ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import ModelConfig, check_max_model_len
from .llama import LlamaModel

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig | None = None) -> torch.dtype:
    """Accept a torch dtype or a name; ``"auto"`` means the checkpoint's own dtype (float32 if unrecorded)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        name = str(config.dtype if config is not None and config.dtype else "float32").removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"checkpoint at {path!r} is missing shards listed in its index: {missing}")
        return files
    if os.path.isfile(single):
        return [single]
    raise ValueError(
        f"no safetensors weights at {path!r} (expected model.safetensors or model.safetensors.index.json)"
    )


def load_state_dict(path: str, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Read every tensor of a (possibly sharded) safetensors checkpoint, cast to ``dtype`` on ``device``.

    Casting tensor by tensor keeps peak memory near one copy of the model in the target dtype.
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                t = f.get_tensor(name)
                if t.is_floating_point():
                    t = t.to(dtype=dtype)
                state[name] = t.to(device=device)
    return state


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    *,
    max_model_len: int | None = None,
) -> LlamaModel:
    """Build a :class:`LlamaModel` from a local HF checkpoint directory, in eval mode without gradients.

    The module is constructed on the meta device and the checkpoint tensors are assigned in place, so no
    time or memory is spent on a random initialisation that would be overwritten. If ``max_model_len`` is
    given it is validated (before reading any weights) with :func:`check_max_model_len`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} does not exist or is not a directory")
    config = ModelConfig.from_pretrained(path)
    if max_model_len is not None:
        check_max_model_len(config, max_model_len)
    dtype = resolve_dtype(dtype, config)
    state = load_state_dict(path, dtype, device)

    # Old checkpoints carry the RoPE buffer; we compute our own.
    for name in [n for n in state if n.endswith("rotary_emb.inv_freq")]:
        del state[name]
    if config.tie_word_embeddings:
        # Some tied checkpoints still store lm_head.weight (a copy of the embeddings); we have none.
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:
        raise ValueError(
            f"checkpoint at {path!r} has no lm_head.weight but its config sets tie_word_embeddings=false"
        )

    with torch.device("meta"):
        model = LlamaModel(config)
    _load_strict(model, state, path)
    model.to(device=device, dtype=dtype)  # moves the RoPE tables (built on CPU in fp32)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_strict(model: LlamaModel, state: dict[str, Any], path: str) -> None:
    expected = set(model.state_dict().keys())
    got = set(state)
    if expected != got:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise ValueError(
            f"checkpoint at {path!r} does not match the {model.config.architecture} layout: "
            f"missing={missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"unexpected={unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer stored next to a checkpoint (local files only, no remote code)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} does not exist or is not a directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_same_vocab(tok_a, tok_b) -> None:
    """Raise ValueError unless two tokenizers map exactly the same strings to the same ids.

    Speculative decoding compares draft and target token ids directly, so any disagreement silently corrupts
    acceptance; this is checked once at startup instead.
    """
    if len(tok_a) != len(tok_b):
        raise ValueError(f"tokenizer vocabulary sizes differ: {len(tok_a)} vs {len(tok_b)}")
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
        raise ValueError(
            f"tokenizer vocabularies differ in {len(diff)} (token, id) entries, e.g. {diff[:3]}; "
            "draft and target must share one vocabulary"
        )
