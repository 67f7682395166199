"""The continuous-batching policy, driven by a fake runner (no llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from aicc.engine.prefix_cache import KvCopy, KvOp
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
    """A KV cache of shared cells: {seq_id: [(cell, token)]}; copies share cell identities as
    llama.cpp's unified cache does. 'Samples' len(kv) + 100 (never EOS)."""

    kv: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)
    num_cells_made: int = 0

    def apply(self, ops: list[KvOp]) -> None:
        for op in ops:
            if isinstance(op, KvCopy):
                assert not self.kv.get(op.dst), "copies go into empty sequences"
                assert len(self.kv[op.src]) >= op.num_tokens
                self.kv[op.dst] = self.kv[op.src][: op.num_tokens]
            else:
                self.kv.pop(op.seq_id, None)

    @property
    def num_cells(self) -> int:
        return len({cell for cells in self.kv.values() for cell, _ in cells})

    def check_accounting(self, scheduler: Scheduler, *, is_scheduled: bool) -> None:
        """Never fewer cells counted than used; within capacity once a step is scheduled
        (sampled tokens claim a cell each until the next schedule() makes room)."""
        assert self.num_cells <= scheduler.num_kv_cells_used
        if is_scheduled:
            assert scheduler.num_kv_cells_used <= scheduler.config.num_kv_cells

    def step(self, scheduler: Scheduler) -> list[tuple[Sequence, FinishReason]]:
        """One engine step, the way the llama.cpp loop runs it. Returns finished sequences."""
        output = scheduler.schedule()
        self.apply(scheduler.take_kv_ops())
        self.check_accounting(scheduler, is_scheduled=True)
        self.steps.append(output)
        for chunk in output.chunks:
            cache = self.kv.setdefault(chunk.seq.slot, [])
            assert len(cache) == chunk.start, "chunks must continue where the KV cache ends"
            assert [token for _, token in cache] == chunk.seq.token_ids(0, chunk.start)
            for token in chunk.token_ids:
                self.num_cells_made += 1
                cache.append((self.num_cells_made, token))
        scheduler.on_computed(output.chunks)
        finished = []
        for chunk in output.chunks:
            if chunk.needs_logits:
                for seq in (chunk.seq, *scheduler.fork(chunk.seq)):
                    self.apply(scheduler.take_kv_ops())
                    token = len(self.kv[chunk.seq.slot]) + 100 + seq.index
                    reason = scheduler.append_token(seq, token, is_eog=token == EOS)
                    if reason is not None:
                        scheduler.finish(seq, reason)
                        finished.append((seq, reason))
        self.apply(scheduler.take_kv_ops())
        self.check_accounting(scheduler, is_scheduled=False)
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
    (seq,) = scheduler.abort("r0")
    assert seq.finish_reason is FinishReason.ABORT
    runner.apply(scheduler.take_kv_ops())
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
    assert scheduler.abort("r1") == [second]
    assert scheduler.num_waiting == 0
    assert scheduler.abort("nope") == []


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


def make_sharing_scheduler(
    num_kv_cells: int = 256,
    is_prefix_caching: bool = True,
    num_prefix_slots: int = 6,
    **kwargs: bool,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=16,
            num_kv_cells=num_kv_cells,
            max_model_len=num_kv_cells,
            num_prefix_slots=num_prefix_slots,
            is_prefix_caching=is_prefix_caching,
            min_shared_running_prefix=8,
            **kwargs,
        )
    )


def make_prompt(request_id: str, tokens: list[int], arrival: int, scope: str = "") -> Sequence:
    return Sequence(request_id, tokens, max_tokens=3, arrival=arrival, cache_scope=scope)


SYSTEM = list(range(1, 41))


def test_a_finished_prefix_is_reused_by_the_next_request() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    first = make_prompt("a", [*SYSTEM, 50, 51], 0)
    scheduler.add(first)
    runner.run(scheduler)
    computed_before = runner.num_cells_made
    second = make_prompt("b", [*SYSTEM, 60, 61, 62], 1)
    scheduler.add(second)
    runner.run(scheduler)
    # Only the 3 new prompt tokens and 2 decodes were computed; the 40 shared ones were not.
    assert runner.num_cells_made - computed_before == 3 + 2
    assert scheduler.prefixes.num_hit_tokens == 40
    assert second.output_token_ids == [143, 144, 145], "same tokens as without the cache"


def test_a_repeated_prompt_recomputes_only_its_last_token() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    for i in range(2):
        scheduler.add(make_prompt(f"r{i}", SYSTEM, i))
        runner.run(scheduler)
    assert scheduler.prefixes.num_hit_tokens == 39


def test_prefixes_are_not_shared_across_scopes_by_default() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    scheduler.add(make_prompt("a", [*SYSTEM, 50], 0, scope="tenant-a"))
    runner.run(scheduler)
    scheduler.add(make_prompt("b", [*SYSTEM, 60], 1, scope="tenant-b"))
    runner.run(scheduler)
    assert scheduler.prefixes.num_hit_tokens == 0
    scheduler.add(make_prompt("c", [*SYSTEM, 70], 2, scope="tenant-a"))
    runner.run(scheduler)
    assert scheduler.prefixes.num_hit_tokens == 40

    shared = make_sharing_scheduler(is_prefix_shared_across_scopes=True)
    runner = FakeRunner()
    shared.add(make_prompt("a", [*SYSTEM, 50], 0, scope="tenant-a"))
    runner.run(shared)
    shared.add(make_prompt("b", [*SYSTEM, 60], 1, scope="tenant-b"))
    runner.run(shared)
    assert shared.prefixes.num_hit_tokens == 40


def test_no_reuse_when_prefix_caching_is_off() -> None:
    scheduler = make_sharing_scheduler(is_prefix_caching=False)
    runner = FakeRunner()
    for i in range(2):
        scheduler.add(make_prompt(f"r{i}", [*SYSTEM, 50 + i], i))
        runner.run(scheduler)
    assert scheduler.prefixes.num_hit_tokens == 0
    assert runner.kv == {}, "nothing is kept"


def test_a_running_sequences_prompt_is_shared_with_a_newcomer() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    long_running = Sequence("a", [*SYSTEM, 50], max_tokens=30, arrival=0)
    scheduler.add(long_running)
    for _ in range(4):
        runner.step(scheduler)
    assert long_running.is_decoding
    scheduler.add(make_prompt("b", [*SYSTEM, 60], 1))
    runner.run(scheduler)
    assert scheduler.prefixes.num_hit_tokens == 40
    assert long_running.output_token_ids[:3] == [141, 142, 143]


def test_lru_eviction_makes_room_and_keeps_accounting_exact() -> None:
    scheduler = make_sharing_scheduler(num_kv_cells=120)
    runner = FakeRunner()
    for i in range(8):  # distinct 40-token prompts: the cache must evict to admit them
        scheduler.add(make_prompt(f"r{i}", [1000 * (i + 1) + t for t in range(40)], i))
        runner.run(scheduler)
    assert scheduler.num_kv_cells_used <= 120
    assert len(scheduler.prefixes.entries) <= 2
    scheduler.prefixes.clear(scheduler._kv_ops)
    runner.apply(scheduler.take_kv_ops())
    assert runner.kv == {}


def test_n_choices_share_the_prompt_and_sample_from_the_same_logits() -> None:
    for caching in (True, False):
        scheduler = make_sharing_scheduler(is_prefix_caching=caching)
        runner = FakeRunner()
        parent, *forks = (
            Sequence("n", list(SYSTEM), max_tokens=3, arrival=0, index=i) for i in range(3)
        )
        parent.forks = forks
        scheduler.add(parent)
        runner.run(scheduler)
        assert runner.num_cells_made == 40 + 3 * 2, "the prompt is computed once"
        for seq in (parent, *forks):
            assert seq.finish_reason is FinishReason.LENGTH
            # The first token comes from the shared prompt logits, the rest from each own KV.
            assert seq.output_token_ids == [140 + seq.index, 141 + seq.index, 142 + seq.index]
        if not caching:
            assert runner.kv == {}, "the shared prompt is dropped with its last user"


def test_n_choices_need_slots_for_all_and_abort_together() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    other = Sequence("other", [7, 8], max_tokens=50, arrival=0)
    scheduler.add(other)
    runner.step(scheduler)
    parent, *forks = (Sequence("n", [1, 2, 3], 10, arrival=1, index=i) for i in range(4))
    parent.forks = forks
    scheduler.add(parent)
    runner.step(scheduler)
    assert parent.status is SequenceStatus.WAITING, "4 choices need 4 free slots"
    scheduler.abort("other")
    runner.apply(scheduler.take_kv_ops())
    runner.step(scheduler)
    runner.step(scheduler)
    assert scheduler.num_running == 4
    assert len(scheduler.abort("n")) == 4
    runner.apply(scheduler.take_kv_ops())
    assert scheduler.num_running == 0
    assert scheduler._free_slots == [0, 1, 2, 3]


def test_n_choices_without_prefix_slots_prefill_independently() -> None:
    scheduler = make_sharing_scheduler(num_prefix_slots=0)
    assert not scheduler.can_fork


def test_only_prompts_long_enough_to_reuse_are_kept() -> None:
    scheduler = make_sharing_scheduler()
    runner = FakeRunner()
    scheduler.add(make_prompt("short", list(range(1, 11)), 0))
    scheduler.add(make_prompt("long", [*SYSTEM, 50], 1))
    runner.run(scheduler)
    (entry,) = scheduler.prefixes.entries
    assert entry.token_ids == (*SYSTEM, 50), "the prompt, not the generated tokens"
    assert runner.num_cells == 41
