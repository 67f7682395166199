"""The continuous-batching policy, driven by a fake runner (no llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from aicc.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from aicc.engine.sequence import Sequence, SequenceStatus
from aicc.engine.types import FinishReason

EOS = 0


def make_scheduler(
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 16,
    num_kv_cells: int = 256,
    max_model_len: int | None = None,
    is_batch_invariant: bool = False,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_cells=num_kv_cells,
            max_model_len=max_model_len or num_kv_cells,
            is_batch_invariant=is_batch_invariant,
        )
    )


def make_requests(count: int, prompt_len: int = 4, max_tokens: int = 3) -> list[Sequence]:
    return [
        Sequence(
            request_id=f"r{i}",
            prompt_token_ids=list(range(1, prompt_len + 1)),
            max_tokens=max_tokens,
            arrival=i,
        )
        for i in range(count)
    ]


@dataclass
class FakeRunner:
    """Keeps a KV cache as {slot: [tokens]} and 'samples' len(kv) + 100 (never EOS)."""

    kv: dict[int, list[int]] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)

    def release(self, slot: int) -> None:
        self.kv.pop(slot, None)

    def step(self, scheduler: Scheduler) -> list[tuple[Sequence, FinishReason]]:
        """One engine step, the way the llama.cpp loop runs it. Returns finished sequences."""
        output = scheduler.schedule()
        assert scheduler.num_kv_cells_used <= scheduler.config.num_kv_cells
        for slot in output.freed_slots:
            self.release(slot)
        self.steps.append(output)
        for chunk in output.chunks:
            cache = self.kv.setdefault(chunk.seq.slot, [])
            assert len(cache) == chunk.start, "chunks must continue where the KV cache ends"
            cache.extend(chunk.token_ids)
        scheduler.on_computed(output.chunks)
        finished = []
        for chunk in output.chunks:
            if chunk.needs_logits:
                seq = chunk.seq
                token = len(self.kv[seq.slot]) + 100
                reason = scheduler.append_token(seq, token, is_eog=token == EOS)
                if reason is not None:
                    self.release(scheduler.finish(seq, reason))
                    finished.append((seq, reason))
        return finished

    def run(self, scheduler: Scheduler, max_steps: int = 1000) -> list[Sequence]:
        done = []
        for _ in range(max_steps):
            if not scheduler.has_work:
                break
            done += [seq for seq, _ in self.step(scheduler)]
        return done


def test_admits_in_arrival_order_up_to_max_num_seqs() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for seq in make_requests(3):
        scheduler.add(seq)
    output = scheduler.schedule()
    assert [chunk.seq.request_id for chunk in output.chunks] == ["r0", "r1"]
    assert scheduler.num_running == 2
    assert scheduler.num_waiting == 1
    assert {chunk.seq.slot for chunk in output.chunks} == {0, 1}


def test_every_request_completes_with_its_own_tokens() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    requests = make_requests(5, prompt_len=3, max_tokens=4)
    for seq in requests:
        scheduler.add(seq)
    runner = FakeRunner()
    done = runner.run(scheduler)
    assert sorted(seq.request_id for seq in done) == [f"r{i}" for i in range(5)]
    for seq in requests:
        # Each token depends only on the sequence's own KV length: independent outputs.
        assert seq.output_token_ids == [103, 104, 105, 106]
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.status is SequenceStatus.FINISHED
    assert runner.kv == {}, "finished sequences leave no KV behind"


def test_step_never_exceeds_token_budget_and_decodes_go_first() -> None:
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    short, long_ = (
        make_requests(1, prompt_len=2, max_tokens=20)[0],
        make_requests(1, prompt_len=30)[0],
    )
    long_.request_id, long_.arrival = "long", 1
    scheduler.add(short)
    runner = FakeRunner()
    runner.step(scheduler)  # short prefilled; decoding from now on
    scheduler.add(long_)
    for _ in range(4):
        runner.step(scheduler)
    for output in runner.steps:
        assert output.num_tokens <= 8
    # While the long prompt is prefilled in chunks, the short stream decodes every step.
    for output in runner.steps[1:5]:
        assert output.chunks[0].seq is short
        assert output.chunks[0].num_tokens == 1
        assert output.chunks[1].seq is long_
        assert output.chunks[1].num_tokens == 7
    assert long_.num_computed == 28
    assert not runner.steps[1].chunks[1].needs_logits


def test_abort_frees_slot_and_kv_within_one_step() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    first, second = make_requests(2, max_tokens=50)
    scheduler.add(first)
    scheduler.add(second)
    runner = FakeRunner()
    runner.step(scheduler)
    runner.step(scheduler)
    assert scheduler.num_running == 1
    found = scheduler.abort("r0")
    assert found is not None
    seq, slot = found
    assert seq.finish_reason is FinishReason.ABORT
    runner.release(slot)
    assert scheduler.num_running == 0
    runner.step(scheduler)
    assert scheduler.running == [second], "the freed slot is reused at the next step"
    assert list(runner.kv) == [0]


def test_abort_of_waiting_and_unknown_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    first, second = make_requests(2)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()
    assert scheduler.abort("r1") == (second, -1)
    assert scheduler.num_waiting == 0
    assert scheduler.abort("nope") is None


def test_kv_budget_blocks_admission() -> None:
    # 2 prompts of 10 fit in 24 cells with the watermark; a third must wait.
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=64, num_kv_cells=24)
    for seq in make_requests(3, prompt_len=10, max_tokens=2):
        scheduler.add(seq)
    scheduler.schedule()
    assert scheduler.num_running == 2
    assert scheduler.num_waiting == 1


def test_preemption_when_kv_runs_out_and_recompute_keeps_output() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=32, num_kv_cells=30)
    old, new = make_requests(2, prompt_len=10, max_tokens=12)
    scheduler.add(old)
    scheduler.add(new)
    runner = FakeRunner()
    done = runner.run(scheduler)
    assert scheduler.num_preemptions >= 1
    assert {seq.request_id for seq in done} == {"r0", "r1"}
    # The newest sequence was preempted and recomputed; its output is unaffected.
    assert old.output_token_ids == new.output_token_ids == list(range(110, 122))


def test_oldest_sequence_is_never_preempted() -> None:
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=64, num_kv_cells=40)
    for seq in make_requests(3, prompt_len=8, max_tokens=20):
        scheduler.add(seq)
    runner = FakeRunner()
    runner.step(scheduler)
    oldest = scheduler.running[0]
    for _ in range(10):
        runner.step(scheduler)
        assert oldest in scheduler.running or oldest.status is SequenceStatus.FINISHED


def test_eos_and_length_finish() -> None:
    scheduler = make_scheduler(num_kv_cells=16, max_model_len=8)
    (seq,) = make_requests(1, prompt_len=5, max_tokens=100)
    scheduler.add(seq)
    FakeRunner().run(scheduler)
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.num_tokens == 8, "stops at the model's context length"

    scheduler = make_scheduler()
    (seq,) = make_requests(1)
    scheduler.add(seq)
    scheduler.schedule()
    scheduler.on_computed(scheduler.schedule().chunks)
    assert scheduler.append_token(seq, EOS, is_eog=True) is FinishReason.STOP


def test_rejects_sequences_that_cannot_fit() -> None:
    scheduler = make_scheduler(num_kv_cells=16)
    (seq,) = make_requests(1, prompt_len=17)
    with pytest.raises(ValueError, match="cannot fit"):
        scheduler.add(seq)
    (empty,) = make_requests(1, prompt_len=0)
    with pytest.raises(ValueError, match="cannot fit"):
        scheduler.add(empty)


def test_config_bounds() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, num_kv_cells=64, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4, num_kv_cells=64, max_model_len=65)


def test_isolated_prefill_chunks_do_not_depend_on_load() -> None:
    """Batch-invariant mode: a prompt is chunked the same way alone and under load."""

    def prefill_chunks(num_others: int) -> list[tuple[int, int]]:
        scheduler = make_scheduler(
            max_num_seqs=8, max_num_batched_tokens=8, is_batch_invariant=True
        )
        for seq in make_requests(num_others, prompt_len=3, max_tokens=30):
            scheduler.add(seq)
        target = make_requests(1, prompt_len=20, max_tokens=2)[0]
        target.request_id, target.arrival = "target", 99
        scheduler.add(target)
        runner = FakeRunner()
        runner.run(scheduler)
        spans = []
        for output in runner.steps:
            groups = output.decode_groups(is_batch_invariant=True)
            assert all(len(group) == 1 for group in groups), "each chunk is decoded alone"
            assert sum(not chunk.is_decode for chunk in output.chunks) <= 1, "one prefill a step"
            spans += [(c.start, c.num_tokens) for c in output.chunks if c.seq is target]
        return spans

    alone = prefill_chunks(0)
    assert alone[:3] == [(0, 8), (8, 8), (16, 4)]
    assert prefill_chunks(5) == alone
