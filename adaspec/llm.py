"""`LLM`: the offline API in the shape vLLM users know.

    llm = LLM()                                   # the embedded default pair
    llm = LLM(model="path/to/target", draft_model="path/to/draft", policy="static:3")
    outs = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=64))
    outs[0].outputs[0].text, outs[0].spec_stats
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaspec.engine import host
from adaspec.engine.engine import LLMEngine
from adaspec.engine.sampling import SamplingParams
from adaspec.engine.sequence import SLO, Sequence
from adaspec.model import check_same_vocab, load_model, load_tokenizer
from adaspec.model.loader import resolve_dtype as loader_resolve_dtype
from adaspec.spec.policy import Policy, make_policy

DEFAULT_PAIR = Path(__file__).resolve().parent / "models" / "default"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    spec_stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def request_output(seq: Sequence, prompt: str | None = None) -> RequestOutput:
    m = {"arrival_time": seq.arrival_time, "first_token_time": seq.first_token_time,
         "finish_time": seq.finish_time}
    if seq.first_token_time is not None:
        m["ttft"] = seq.first_token_time - seq.arrival_time
    if seq.finish_time is not None and seq.first_token_time is not None and seq.num_output_tokens > 1:
        m["tpot"] = (seq.finish_time - seq.first_token_time) / (seq.num_output_tokens - 1)
    return RequestOutput(
        seq.request_id, prompt, seq.prompt_token_ids,
        [CompletionOutput(0, seq.text, seq.output_token_ids, seq.finish_reason)],
        seq.finished, seq.stats.as_dict(), m, seq.error)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' (or None) means float32 on the CPU, where half precision is slow, and bfloat16 on a
    GPU; other names go through the loader's table."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return loader_resolve_dtype(dtype)


def build_engine(model: str | Path | None = None, draft_model: str | Path | None = None,
                 policy: str | Policy | None = None, num_speculative_tokens: int = 8,
                 max_num_seqs: int = 32, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, device: str = "cpu", dtype=None,
                 seed: int = 0, slo_tpot_ms: float | None = None,
                 slo_ttft_ms: float | None = None, reprofile: bool = False,
                 decision_log_size: int | None = None) -> LLMEngine:
    """Load models and tokenizer and build an engine (shared by `LLM` and the server).

    A policy that predicts step times (adaspec, smartspec) and has no cost model gets one from the
    start-up profile of this model pair on this device (cached; `reprofile` measures anew). A policy
    that keeps a decision log keeps its last `decision_log_size` steps (default: the policy's)."""
    if model is None:
        if draft_model is not None:
            raise ValueError("draft_model given without model")
        model, draft_model = DEFAULT_PAIR / "target", DEFAULT_PAIR / "draft"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    dt = resolve_dtype(dtype, dev)
    host.thaw_heap()
    if dev.type == "cpu":
        host.tune_allocator()
    target = load_model(model, dtype=dt, device=dev)
    tokenizer = load_tokenizer(model)
    draft = None
    if draft_model is not None:
        draft = load_model(draft_model, dtype=dt, device=dev)
        check_same_vocab(tokenizer, load_tokenizer(draft_model))
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"draft_model vocabulary size {draft.config.vocab_size} differs from the target's "
                f"{target.config.vocab_size}; the two must share a tokenizer")
    if policy is None:
        policy = f"static:{min(4, num_speculative_tokens)}" if draft is not None else "none"
    pol = make_policy(policy, num_speculative_tokens)
    if decision_log_size and getattr(pol, "log", None) is not None:
        from adaspec.spec.decisions import DecisionLog

        pol.log = DecisionLog(decision_log_size)
    max_model_len = max_model_len or min(target.config.max_position_embeddings, 4096)
    if draft is not None and draft.config.max_position_embeddings < max_model_len:
        raise ValueError(f"max_model_len={max_model_len} exceeds the draft model's "
                         f"max_position_embeddings={draft.config.max_position_embeddings}")
    slo = SLO(None if slo_tpot_ms is None else slo_tpot_ms / 1e3,
              None if slo_ttft_ms is None else slo_ttft_ms / 1e3)
    engine = LLMEngine(target, draft, tokenizer, pol, num_speculative_tokens=num_speculative_tokens,
                       max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                       max_num_batched_tokens=max_num_batched_tokens, dtype=dt, device=dev,
                       default_slo=slo, seed=seed)
    if pol.needs_cost_model and pol.cost_model is None:
        from adaspec.spec.profiler import profile_engine

        pol.cost_model = profile_engine(engine, (str(model), str(draft_model)), reprofile)
    host.freeze_heap()
    return engine


class LLM:
    """Offline batch generation with speculative decoding."""

    def __init__(self, model: str | Path | None = None, draft_model: str | Path | None = None,
                 policy: str | Policy | None = None, num_speculative_tokens: int = 8, **kwargs):
        self.engine = build_engine(model, draft_model, policy, num_speculative_tokens, **kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 slo: SLO | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); outputs in input order.

        Every request is validated before any is queued, so a bad one raises ValueError and
        leaves the engine as it was."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError("sampling_params list must have one entry per prompt")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        seqs: list[Sequence] = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                seqs.append(self.engine.add_request(p, sp, slo=slo))
        except ValueError:
            for s in seqs:
                self.engine.abort_request(s.request_id)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generate")
        done = 0
        while done < len(seqs):
            self.engine.step()
            now_done = sum(s.finished for s in seqs)
            if bar:
                bar.update(now_done - done)
            done = now_done
        if bar:
            bar.close()
        return [request_output(s, p if isinstance(p, str) else None) for s, p in zip(seqs, prompts,
                                                                                       strict=True)]
