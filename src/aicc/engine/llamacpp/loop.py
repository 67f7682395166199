"""The engine thread: drain the inbox, schedule, decode, sample, emit — one step at a time."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aicc.engine.detokenizer import IncrementalDetokenizer
from aicc.engine.llamacpp.model import LlamaModel
from aicc.engine.llamacpp.runner import BatchRunner, DecodeError, KvCacheFullError
from aicc.engine.llamacpp.sampler import SamplerChain
from aicc.engine.scheduler import ScheduledChunk, Scheduler
from aicc.engine.sequence import Sequence
from aicc.engine.types import FinishReason, GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)

StreamItem = TokenEvent | BaseException
Delivery = list[tuple[asyncio.Queue[StreamItem], StreamItem]]

_IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class Submit:
    request: GenerationRequest
    max_tokens: int
    out: asyncio.Queue[StreamItem]


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


class Stop:
    """Ends the loop; everything still running is aborted."""


@dataclass(slots=True)
class _Stream:
    seq: Sequence
    sampler: SamplerChain
    detokenizer: IncrementalDetokenizer
    out: asyncio.Queue[StreamItem]


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
        self._streams: dict[str, _Stream] = {}
        self._num_arrived = 0
        self._pending: Delivery = []
        self.counters = LoopCounters()
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
            for request_id in list(self._streams):
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
                self._submit(message)
            else:
                self._abort(message.request_id, None)

    def _submit(self, message: Submit) -> None:
        request = message.request
        seq = Sequence(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            max_tokens=message.max_tokens,
            arrival=self._num_arrived,
        )
        self._num_arrived += 1
        eog = self.model.eog_token_ids if request.params.ignore_eos else ()
        sampler = SamplerChain(request.params, num_vocab=self.model.num_vocab, eog_token_ids=eog)
        detokenizer = IncrementalDetokenizer(request.params.stop)
        self._streams[request.request_id] = _Stream(seq, sampler, detokenizer, message.out)
        self.scheduler.add(seq)

    def _abort(self, request_id: str, error: BaseException | None) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # already finished
        found = self.scheduler.abort(request_id)
        if found is not None and found[1] >= 0:
            self.runner.release(found[1])
        stream.sampler.close()
        seq = stream.seq
        item: StreamItem = error or TokenEvent(
            "", seq.num_prompt_tokens, seq.num_generated, FinishReason.ABORT
        )
        self._pending.append((stream.out, item))
        self.counters.num_aborted += 1

    # -- one step --------------------------------------------------------------------------
    def _step(self) -> None:
        output = self.scheduler.schedule()
        for slot in output.freed_slots:
            self.runner.release(slot)
        for group in output.decode_groups(self.scheduler.config.is_batch_invariant):
            if not self._decode_and_sample(group):
                break
        self.counters.num_steps += 1
        self.counters.last_step_batch_size = len(output.chunks)

    def _decode_and_sample(self, chunks: tuple[ScheduledChunk, ...]) -> bool:
        """One `llama_decode` call, then sampling from its logits. False: skip the rest."""
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
            if index >= 0:
                try:
                    self._sample(self._streams[chunk.seq.request_id], index)
                except Exception as exc:  # one request's failure must not stop the others
                    logger.exception("sampling failed for %s", chunk.seq.request_id)
                    self._abort(chunk.seq.request_id, exc)
        return True

    def _sample(self, stream: _Stream, batch_index: int) -> None:
        seq = stream.seq
        token_id = stream.sampler.sample(self.model.ctx, batch_index)
        is_eog = self.model.is_eog(token_id)
        reason = self.scheduler.append_token(seq, token_id, is_eog=is_eog)
        text = "" if is_eog else stream.detokenizer.push(self.model.piece(token_id))
        if stream.detokenizer.stopped:
            reason = FinishReason.STOP
        if reason is not None:
            text += stream.detokenizer.flush()
            self.runner.release(self.scheduler.finish(seq, reason))
            stream.sampler.close()
            del self._streams[seq.request_id]
            self.counters.num_finished += 1
        event = TokenEvent(text, seq.num_prompt_tokens, seq.num_generated, reason)
        self._pending.append((stream.out, event))

    def _shrink_after_kv_full(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """llama.cpp found no room: preempt the newest sequence and try again next step."""
        if self.scheduler.num_running > 1:
            self.runner.release(self.scheduler.preempt_newest())
            return
        seq = chunks[0].seq
        self._abort(seq.request_id, RuntimeError("the KV cache cannot hold this sequence"))

    def _flush(self) -> None:
        if self._pending:
            self._deliver(self._pending)
            self._pending = []
