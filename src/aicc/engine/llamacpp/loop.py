"""The engine thread: drain the inbox, schedule, decode, sample, emit — one step at a time."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aicc.engine.detokenizer import IncrementalDetokenizer
from aicc.engine.llamacpp.model import LlamaModel
from aicc.engine.llamacpp.runner import BatchRunner, DecodeError, KvCacheFullError
from aicc.engine.llamacpp.sampler import SamplerChain, token_logprob
from aicc.engine.scheduler import ScheduledChunk, Scheduler
from aicc.engine.sequence import Sequence
from aicc.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StepSample,
    TokenEvent,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

StreamItem = TokenEvent | BaseException
Delivery = list[tuple[asyncio.Queue[StreamItem], StreamItem]]

_IDLE_WAIT_S = 0.5
_MAX_STEP_SAMPLES = 4096
"""Steps kept for metrics between scrapes; older ones are dropped."""


@dataclass(frozen=True, slots=True)
class Submit:
    request: GenerationRequest
    max_tokens: int
    out: asyncio.Queue[StreamItem]
    submitted_at: float = field(default_factory=time.perf_counter)
    """When the client submitted it (for the queue time)."""


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


class Stop:
    """Ends the loop; everything still running is aborted."""


@dataclass(slots=True, eq=False)
class _Choice:
    """One of a request's `n` generations."""

    seq: Sequence
    sampler: SamplerChain
    detokenizer: IncrementalDetokenizer
    request: _Request
    queue_time_s: float | None = None
    """Set when its first prompt chunk is scheduled; sent with its first token."""


@dataclass(slots=True, eq=False)
class _Request:
    params: SamplingParams
    out: asyncio.Queue[StreamItem]
    submitted_at: float
    choices: list[_Choice] = field(default_factory=list)


@dataclass(slots=True)
class LoopCounters:
    """Written only by the engine thread; read (without locks) by stats()."""

    num_steps: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    last_step_batch_size: int = 0


class EngineLoop:
    """Runs in its own thread; talks to the event loop only through `deliver`."""

    def __init__(
        self,
        model: LlamaModel,
        runner: BatchRunner,
        scheduler: Scheduler,
        deliver: Callable[[Delivery], None],
    ) -> None:
        self.model = model
        self.runner = runner
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue[Submit | Abort | Stop] = queue.SimpleQueue()
        self._deliver = deliver
        self._requests: dict[str, _Request] = {}
        self._choices: dict[Sequence, _Choice] = {}
        self._num_arrived = 0
        self._pending: Delivery = []
        self.counters = LoopCounters()
        self.step_samples: deque[StepSample] = deque(maxlen=_MAX_STEP_SAMPLES)
        """Appended here, drained by the event loop (deque append/popleft are thread-safe)."""
        self.last_tick = time.monotonic()
        """Updated every iteration; readiness checks that the loop is alive."""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="aicc-engine", daemon=True)

    def run(self) -> None:
        try:
            while self._drain_inbox():
                if self.scheduler.has_work:
                    self._step()
                self._flush()
        except BaseException as exc:
            logger.exception("engine loop died")
            self.error = exc
        finally:
            for request_id in list(self._requests):
                self._abort(request_id, self.error)
            self._flush()

    # -- inbox -----------------------------------------------------------------------------
    def _drain_inbox(self) -> bool:
        """Apply queued submits and aborts; block briefly when idle. False: stop."""
        self.last_tick = time.monotonic()
        block = not self.scheduler.has_work
        while True:
            try:
                message = self.inbox.get(timeout=_IDLE_WAIT_S) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(message, Stop):
                return False
            if isinstance(message, Submit):
                try:
                    self._submit(message)
                except Exception as exc:  # one request's failure must not stop the loop
                    request_id = message.request.request_id
                    logger.exception("could not start %s", request_id)
                    if request_id in self._requests:
                        self._abort(request_id, exc)
                    else:
                        self._pending.append((message.out, exc))
            else:
                self._abort(message.request_id, None)

    def _submit(self, message: Submit) -> None:
        request, params = message.request, message.request.params
        state = _Request(params, message.out, message.submitted_at)
        try:
            for index in range(params.n):
                state.choices.append(self._new_choice(request, message.max_tokens, index, state))
        except BaseException:
            for choice in state.choices:
                choice.sampler.close()
            raise
        for choice in state.choices:
            self._choices[choice.seq] = choice
        self._num_arrived += 1
        self._requests[request.request_id] = state
        first, *others = (choice.seq for choice in state.choices)
        if self.scheduler.can_fork:
            first.forks = others
            self.scheduler.add(first)
        else:  # each choice computes the prompt itself (batch-invariant mode)
            for seq in (first, *others):
                self.scheduler.add(seq)

    def _new_choice(
        self, request: GenerationRequest, max_tokens: int, index: int, state: _Request
    ) -> _Choice:
        params = request.params
        seq = Sequence(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            max_tokens=max_tokens,
            arrival=self._num_arrived,
            index=index,
            cache_scope=request.cache_scope,
        )
        # Choices of one seeded request must differ from each other, yet be reproducible.
        seed = None if params.seed is None else params.seed + index
        sampler = SamplerChain(
            params,
            num_vocab=self.model.num_vocab,
            eog_token_ids=self.model.eog_token_ids if params.ignore_eos else (),
            seed=seed,
            vocab=self.model.vocab,
        )
        return _Choice(seq, sampler, IncrementalDetokenizer(params.stop), state)

    def _abort(self, request_id: str, error: BaseException | None) -> None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return  # already finished
        self.scheduler.abort(request_id)
        self._apply_kv_ops()
        for choice in state.choices:
            choice.sampler.close()
            if self._choices.pop(choice.seq, None) is not None and error is None:
                seq = choice.seq
                event = TokenEvent(
                    "", seq.num_prompt_tokens, seq.num_generated, FinishReason.ABORT, seq.index
                )
                self._pending.append((state.out, event))
        if error is not None:
            self._pending.append((state.out, error))
        self.counters.num_aborted += 1

    # -- one step --------------------------------------------------------------------------
    def _step(self) -> None:
        output = self.scheduler.schedule()
        started = time.perf_counter()
        self._note_queue_times(output.chunks, started)
        for group in output.decode_groups(self.scheduler.config.is_batch_invariant):
            if not self._decode_and_sample(group):
                break
        self._apply_kv_ops()
        duration_s = time.perf_counter() - started
        self.counters.num_steps += 1
        self.counters.last_step_batch_size = len(output.chunks)
        if output.chunks:
            self.step_samples.append(StepSample(len(output.chunks), output.num_tokens, duration_s))

    def _note_queue_times(self, chunks: tuple[ScheduledChunk, ...], now: float) -> None:
        """Stamp choices whose prompt starts computing now with their time in the queue."""
        # Prefill chunks come after the decodes: a decode-only step costs one look.
        for chunk in reversed(chunks):
            if chunk.is_decode:
                return
            for seq in (chunk.seq, *chunk.seq.forks):  # forks sample from this prompt's logits
                choice = self._choices.get(seq)
                if choice is not None and choice.queue_time_s is None:
                    choice.queue_time_s = now - choice.request.submitted_at

    def _decode_and_sample(self, chunks: tuple[ScheduledChunk, ...]) -> bool:
        """One `llama_decode` call, then sampling from its logits. False: skip the rest."""
        self._apply_kv_ops()
        try:
            logit_indices = self.runner.decode(chunks)
        except KvCacheFullError:
            self._shrink_after_kv_full(chunks)
            return False
        except DecodeError as exc:
            logger.error("decode failed; aborting the step's sequences: %s", exc)
            for chunk in chunks:
                self._abort(chunk.seq.request_id, exc)
            return False
        self.scheduler.on_computed(chunks)
        for chunk, index in zip(chunks, logit_indices, strict=True):
            if index < 0:
                continue
            # The request's other choices join now: they share this prompt and these logits.
            for seq in (chunk.seq, *self.scheduler.fork(chunk.seq)):
                choice = self._choices.get(seq)
                if choice is None:
                    continue  # aborted while sampling an earlier choice
                try:
                    self._sample(choice, index)
                except Exception as exc:  # one request's failure must not stop the others
                    logger.exception("sampling failed for %s", seq.request_id)
                    self._abort(seq.request_id, exc)
        return True

    def _sample(self, choice: _Choice, batch_index: int) -> None:
        seq, params = choice.seq, choice.request.params
        token_id = choice.sampler.sample(self.model.ctx, batch_index)
        logprobs: tuple[TokenLogprob, ...] = ()
        if params.logprobs is not None:
            logprobs = (
                token_logprob(
                    self.model.ctx,
                    batch_index,
                    self.model.num_vocab,
                    token_id,
                    params.logprobs,
                    self.model.raw_piece,
                ),
            )
        is_eog = self.model.is_eog(token_id)
        reason = self.scheduler.append_token(seq, token_id, is_eog=is_eog)
        piece = self.model.piece(token_id, special=params.render_special)
        text = "" if is_eog else choice.detokenizer.push(piece)
        if choice.detokenizer.stopped:
            reason = FinishReason.STOP
        if reason is not None:
            text += choice.detokenizer.flush()
            self.scheduler.finish(seq, reason)
            choice.sampler.close()
            del self._choices[seq]
            if not any(other.seq in self._choices for other in choice.request.choices):
                del self._requests[seq.request_id]
                self.counters.num_finished += 1
        event = TokenEvent(
            text,
            seq.num_prompt_tokens,
            seq.num_generated,
            reason,
            seq.index,
            logprobs,
            choice.queue_time_s if seq.num_generated == 1 else None,
        )
        self._pending.append((choice.request.out, event))

    def _shrink_after_kv_full(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """llama.cpp found no room: drop a cached prefix or preempt the newest sequence, and
        try again next step."""
        if self.scheduler.evict_prefix():
            pass
        elif self.scheduler.num_running > 1:
            self.scheduler.preempt_newest()
        else:
            seq = chunks[0].seq
            self._abort(seq.request_id, RuntimeError("the KV cache cannot hold this sequence"))
        self._apply_kv_ops()

    def _apply_kv_ops(self) -> None:
        ops = self.scheduler.take_kv_ops()
        if ops:
            self.runner.apply(ops)

    def _flush(self) -> None:
        if self._pending:
            self._deliver(self._pending)
            self._pending = []
