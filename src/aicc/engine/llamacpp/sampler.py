"""Per-sequence `llama_sampler` chains: sampling stays in C, Python sees only token ids."""

from __future__ import annotations

import secrets

import llama_cpp
import numpy as np

from aicc.engine.types import SamplingParams

_BANNED = float("-inf")


class SamplerChain:
    """One request's sampler chain. Keeps its state (penalty history, RNG) across preemption.

    Greedy decoding without penalties needs no chain: an argmax over the logits row (numpy, in
    C) avoids building a candidate array of the whole vocabulary for every token.
    """

    def __init__(
        self, params: SamplingParams, *, num_vocab: int, eog_token_ids: tuple[int, ...] = ()
    ) -> None:
        self._num_vocab = num_vocab
        self._chain = None
        self._bias_ids = np.empty(0, dtype=np.int64)
        self._bias_values = np.empty(0, dtype=np.float32)
        if params.is_greedy and not _has_penalties(params):
            bias = _bias_entries(params, eog_token_ids)
            self._bias_ids = np.array([token for token, _ in bias], dtype=np.int64)
            self._bias_values = np.array([value for _, value in bias], dtype=np.float32)
            return
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        for sampler in _samplers(params, num_vocab, eog_token_ids):
            llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it now

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Pick and accept the next token from the logits at `batch_index` of the last decode."""
        if self._chain is not None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
        row = llama_cpp.llama_get_logits_ith(ctx, batch_index)
        logits = np.ctypeslib.as_array(row, shape=(self._num_vocab,))
        if self._bias_ids.size:
            logits = logits.copy()
            np.add.at(logits, self._bias_ids, self._bias_values)
        return int(np.argmax(logits))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _bias_entries(
    params: SamplingParams, eog_token_ids: tuple[int, ...]
) -> list[tuple[int, float]]:
    """Logit biases to apply; OpenAI's -100 (and ignore_eos) ban a token outright."""
    bias = [(token, _BANNED if value <= -100 else value) for token, value in params.logit_bias]
    if params.ignore_eos:
        bias += [(token_id, _BANNED) for token_id in eog_token_ids]
    return bias


def _samplers(
    params: SamplingParams, num_vocab: int, eog_token_ids: tuple[int, ...]
) -> list[llama_cpp.llama_sampler_p]:
    samplers = []
    bias = _bias_entries(params, eog_token_ids)
    if bias:
        entries = (llama_cpp.llama_logit_bias * len(bias))()
        for entry, (token_id, value) in zip(entries, bias, strict=True):
            entry.token = token_id
            entry.bias = value
        samplers.append(llama_cpp.llama_sampler_init_logit_bias(num_vocab, len(bias), entries))
    if _has_penalties(params):
        samplers.append(
            llama_cpp.llama_sampler_init_penalties(
                num_vocab,
                params.penalty_last_n,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.is_greedy:
        samplers.append(llama_cpp.llama_sampler_init_greedy())
        return samplers
    if params.top_k > 0:
        samplers.append(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        samplers.append(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        samplers.append(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    samplers.append(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    samplers.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return samplers
