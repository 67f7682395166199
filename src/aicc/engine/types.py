"""Plain data passed between the gateway and an engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a sequence stopped generating."""

    STOP = "stop"
    """End-of-generation token or a stop string."""
    LENGTH = "length"
    """`max_tokens` reached, or the context is full."""
    ABORT = "abort"
    """Cancelled: the client went away or the request timed out."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. Defaults match OpenAI's API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    """Same seed, prompt and params give the same text; None draws a random seed."""
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    """How many recent tokens the penalties look at."""
    max_tokens: int | None = None
    """None: up to the end of the context."""
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (benchmarks)."""
    n: int = 1
    """Completions to generate for the prompt; they share the prompt's KV cache."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the sampled token's plus the k most likely."""
    grammar: str | None = None
    """GBNF (start rule `root`) the output must match, e.g. compiled from a JSON schema."""
    render_special: bool = False
    """Render special tokens (e.g. `<｜tool▁calls▁begin｜>`) as text, for output parsers."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One prompt to complete, already tokenized."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_scope: str = ""
    """Prefix-cache partition: a request reuses cached prompt prefixes only from requests of
    the same scope (a tenant), so cache-hit timing cannot reveal another tenant's prompts."""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one sampled token under the model, and its top alternatives."""

    token_id: int
    token: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What one engine step produced for one request."""

    text: str
    """Newly released text (may be empty while bytes or a possible stop string are held)."""
    num_prompt_tokens: int
    num_generated_tokens: int
    """Tokens generated so far for this choice, including this step's."""
    finish_reason: FinishReason | None = None
    index: int = 0
    """Which of the request's `n` choices this event belongs to."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Of the tokens sampled in this event (when the request asked for them)."""
    queue_time_s: float | None = None
    """On a choice's first token only: seconds from submission to its first scheduled prompt
    chunk (the time it waited for a batch slot and KV cells)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the gateway needs to know about the loaded model."""

    name: str
    """The name the model is served under."""
    path: str
    architecture: str
    """GGUF `general.architecture`, e.g. gemma3, qwen2, deepseek2."""
    max_context: int
    """Most tokens (prompt + completion) one request may use."""
    vocab_size: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    general_name: str = ""
    """GGUF `general.name` (e.g. "DeepSeek R1 Distill Qwen 7B"): tells model families apart
    that share an architecture."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's counters (read by health checks and metrics)."""

    num_running: int
    num_waiting: int
    num_outstanding: int
    """Requests accepted by the client and not yet finished."""
    kv_cells_used: int
    kv_cells_total: int
    num_steps: int
    num_preemptions: int
    num_cached_prefixes: int
    """Finished prefixes kept in the KV cache for reuse."""
    num_prefix_hit_tokens: int
    """Prompt tokens taken from the prefix cache instead of being computed, since start."""
    num_finished: int
    num_aborted: int
    last_step_batch_size: int


@dataclass(frozen=True, slots=True)
class StepSample:
    """One engine step, for the batch-size and step-time histograms."""

    batch_size: int
    """Sequences (chunks) in the step."""
    num_tokens: int
    """Tokens fed to the model in the step (prompt chunks and decodes)."""
    duration_s: float
    """Wall time of the step's decode calls and sampling."""


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """Whether the engine can serve requests now."""

    is_ready: bool
    detail: str
