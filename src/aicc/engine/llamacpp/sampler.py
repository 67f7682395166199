"""Per-sequence `llama_sampler` chains: sampling stays in C, Python sees only token ids."""

from __future__ import annotations

import ctypes
import secrets
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from aicc.engine.types import SamplingParams, TokenLogprob, TopLogprob

_BANNED = float("-inf")
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarError(ValueError):
    """llama.cpp rejected a grammar."""


def new_grammar(vocab: Any, grammar: str) -> Any:
    """A grammar sampler for `grammar` (GBNF, start rule `root`). Raises `GrammarError`."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar")
    return sampler


class SamplerChain:
    """One sequence's sampler chain. Keeps its state (penalty history, RNG, grammar) across
    preemption.

    Greedy decoding without penalties or grammar needs no chain: an argmax over the logits row
    (numpy, in C) avoids building a candidate array of the whole vocabulary for every token.
    With a grammar, the token is first sampled freely and only checked against the grammar;
    the grammar filters the whole vocabulary only when that token is rejected (most tokens of
    a constrained output are accepted, and filtering 262k candidates costs milliseconds).
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        num_vocab: int,
        eog_token_ids: tuple[int, ...] = (),
        seed: int | None = None,
        vocab: Any = None,
    ) -> None:
        self._num_vocab = num_vocab
        self._chain = None
        self._grammar = None
        self._bias_ids = np.empty(0, dtype=np.int64)
        self._bias_values = np.empty(0, dtype=np.float32)
        if params.is_greedy and not _has_penalties(params) and params.grammar is None:
            bias = _bias_entries(params, eog_token_ids)
            self._bias_ids = np.array([token for token, _ in bias], dtype=np.int64)
            self._bias_values = np.array([value for _, value in bias], dtype=np.float32)
            return
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        seed = params.seed if seed is None else seed
        for sampler in _samplers(params, num_vocab, eog_token_ids, seed):
            llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it now
        if params.grammar is not None:
            self._grammar = new_grammar(vocab, params.grammar)
            self._candidates = np.zeros(num_vocab, dtype=_TOKEN_DATA)
            self._token_ids = np.arange(num_vocab, dtype=np.int32)
            self._one = np.zeros(1, dtype=_TOKEN_DATA)

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Pick and accept the next token from the logits at `batch_index` of the last decode."""
        if self._grammar is not None:
            return self._sample_with_grammar(ctx, batch_index)
        if self._chain is not None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))
        logits = _logits_row(ctx, batch_index, self._num_vocab)
        if self._bias_ids.size:
            logits = logits.copy()
            np.add.at(logits, self._bias_ids, self._bias_values)
        return int(np.argmax(logits))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None

    def _sample_with_grammar(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        logits = _logits_row(ctx, batch_index, self._num_vocab)
        token_id = self._select(logits, with_grammar=False)
        self._one["id"] = token_id
        self._one["logit"] = 0.0
        _apply(self._grammar, self._one)
        if self._one["logit"][0] == _BANNED:
            token_id = self._select(logits, with_grammar=True)
        llama_cpp.llama_sampler_accept(self._grammar, token_id)
        llama_cpp.llama_sampler_accept(self._chain, token_id)
        return token_id

    def _select(self, logits: Any, *, with_grammar: bool) -> int:
        """Run the chain (after the grammar, if asked) over the whole vocabulary without
        accepting; the selected token id. The candidates are refilled every time: samplers
        such as top-k sort and truncate the array in place."""
        candidates = self._candidates
        candidates["id"] = self._token_ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = _token_data_array(candidates)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        return int(array.data[array.selected].id)


def token_logprob(
    ctx: llama_cpp.llama_context_p,
    batch_index: int,
    num_vocab: int,
    token_id: int,
    num_top: int,
    piece: Callable[[int], bytes],
) -> TokenLogprob:
    """The model's log-probability of `token_id` and its `num_top` most likely alternatives
    (from the raw logits, before sampling parameters reshape them, as OpenAI reports them)."""
    logits = _logits_row(ctx, batch_index, num_vocab).astype(np.float64)
    top_logit = float(logits.max())
    log_total = top_logit + float(np.log(np.exp(logits - top_logit).sum()))
    top: tuple[TopLogprob, ...] = ()
    if num_top > 0:
        ids = np.argpartition(logits, -num_top)[-num_top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple(TopLogprob(int(i), piece(int(i)), float(logits[i]) - log_total) for i in ids)
    return TokenLogprob(token_id, piece(token_id), float(logits[token_id]) - log_total, top)


def _logits_row(ctx: llama_cpp.llama_context_p, batch_index: int, num_vocab: int) -> Any:
    row = llama_cpp.llama_get_logits_ith(ctx, batch_index)
    return np.ctypeslib.as_array(row, shape=(num_vocab,))


def _token_data_array(candidates: Any) -> llama_cpp.llama_token_data_array:
    return llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )


def _apply(sampler: Any, candidates: Any) -> None:
    array = _token_data_array(candidates)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))


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
    params: SamplingParams, num_vocab: int, eog_token_ids: tuple[int, ...], seed: int | None
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
    seed = seed if seed is not None else secrets.randbits(32)
    samplers.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return samplers
