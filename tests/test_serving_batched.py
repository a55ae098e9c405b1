"""Continuous batching and per-row steering on tiny models: every row gives what it gives alone."""

import pytest
import torch
from conftest import PROMPTS, random_vector

from residlab.core.generation import SamplingParams
from residlab.engines import SteeringSpec, as_engine
from residlab.interventions.row_steer import RowSteering
from residlab.serving.continuous import ContinuousBatcher, prefill_groups
from residlab.serving.grouped import GroupedScheduler
from residlab.serving.jobs import Job, RequestError
from residlab.serving.metrics import ServerMetrics
from residlab.serving.steering import ResolvedSteering


def solo(lm, token_ids, budget, steering=None):
    """``token_ids`` generated alone by the engine (batch of one), greedy."""
    from residlab.core.generation import PromptBatch

    engine = as_engine(lm)
    with engine._steered(steering) as decode:
        return decode(PromptBatch((0,), (tuple(token_ids),)), SamplingParams(max_new_tokens=budget), None).token_ids[0]


def tokens(lm, text):
    return tuple(lm.tokenizer(text)["input_ids"])


def steer(lm, *terms, rule="prompt_last+generated", layers=None):
    """A ResolvedSteering of (vector, strength) terms."""
    named = tuple((f"v{i}", v, s) for i, (v, s) in enumerate(terms))
    chosen = tuple(layers) if layers is not None else tuple(sorted({x for _, v, _ in named for x in v.layers}))
    return ResolvedSteering(named, chosen, rule)


def drain(job):
    out, stream = [], job.tokens(60)
    while True:
        try:
            out.extend(next(stream))
        except StopIteration as stop:
            return out, stop.value


def test_row_steering_gives_each_row_its_own_vector_rule_and_layers(qwen):
    a, b = random_vector(qwen, [0, 1], seed=1), random_vector(qwen, [1, 2], seed=2)
    rows = [
        (PROMPTS[0], steer(qwen, (a, 2.0))),
        (PROMPTS[1], None),
        (PROMPTS[2], steer(qwen, (b, -1.5), rule="all", layers=[2])),
        (PROMPTS[0], steer(qwen, (a, 1.0), (b, 0.5), rule=(0, -1))),
        (PROMPTS[2], steer(qwen, (b, 3.0), rule="generated")),
    ]
    table = RowSteering(qwen, capacity=len(rows))
    for slot, (_, steering) in enumerate(rows):
        if steering is not None:
            table.set_row(slot, steering.deltas(), steering.rule)
    with table.applied(list(range(len(rows)))):
        together = qwen.generate([p for p, _ in rows], max_new_tokens=6, chat=False, batch_size=len(rows))
    for (prompt, steering), got in zip(rows, together, strict=True):
        spec = None if steering is None else steering.spec()
        alone = as_engine(qwen).generate([prompt], SamplingParams(max_new_tokens=6), steering=spec, chat=False)[0]
        assert got.token_ids == alone.token_ids
    unsteered = qwen.generate([rows[0][0]], max_new_tokens=6, chat=False)[0]
    assert together[0].token_ids != unsteered.token_ids  # the steering did something


def test_row_steering_leaves_no_hooks_and_a_zero_row_is_exact(qwen):
    from conftest import hook_keys

    before = hook_keys(qwen)
    table = RowSteering(qwen, capacity=2)
    table.set_row(0, random_vector(qwen, [1]).directions, "all")
    table.clear_row(0)
    assert not table.steers(0)
    with table.applied([0, 1]):  # nothing steers: no hooks at all
        assert hook_keys(qwen) == before
    table.set_row(1, random_vector(qwen, [1]).directions, "all")
    with table.applied([0, 1]):
        assert hook_keys(qwen) != before
    assert hook_keys(qwen) == before


def test_row_steering_refuses_bad_deltas(qwen):
    table = RowSteering(qwen, capacity=1)
    with pytest.raises(Exception, match="hidden size"):
        table.set_row(0, {0: torch.ones(3)}, "all")
    with pytest.raises(Exception, match="NaN"):
        table.set_row(0, {0: torch.full((qwen.hidden_size,), float("nan"))}, "all")
    with pytest.raises(Exception, match="position rule"):
        table.set_row(0, {0: torch.ones(qwen.hidden_size)}, "sometimes")


def test_requests_join_and_leave_mid_decode_with_identical_greedy_outputs(lm):
    engine = as_engine(lm)
    vector = random_vector(lm, [1], seed=3)
    batcher = ContinuousBatcher(engine, ServerMetrics(), max_batch=4)  # stepped by hand: deterministic
    first = Job(tokens(lm, PROMPTS[0]), SamplingParams(max_new_tokens=10, ignore_eos=True))
    batcher.submit(first)
    for _ in range(4):
        batcher.step()
    assert len(batcher._rows) == 1 and not first._events.empty()  # decoding when the others arrive
    later = [
        Job(tokens(lm, PROMPTS[1]), SamplingParams(max_new_tokens=3, ignore_eos=True), steer(lm, (vector, 2.0))),
        Job(tokens(lm, PROMPTS[2]), SamplingParams(max_new_tokens=8, ignore_eos=True), steer(lm, (vector, -3.0))),
    ]
    for job in later:
        batcher.submit(job)
    sizes = []
    while batcher._rows or batcher.queued:
        batcher.step()
        sizes.append(len(batcher._rows))
    if batcher._joinable:
        assert 3 in sizes and 2 in sizes  # they joined, and the short one left before the others
    else:  # a sliding-window cache (gemma3): the newcomers wait for the batch to drain, then run together
        assert 2 in sizes and 3 not in sizes
    for job in [first, *later]:
        got, finished = drain(job)
        assert finished.hit_limit and len(got) == job.sampling.max_new_tokens
        spec = None if job.steering is None else job.steering.spec()
        expected = solo(lm, job.token_ids, job.sampling.max_new_tokens, spec)
        assert got == expected
    assert batcher._free and sorted(batcher._free) == list(range(4))  # every slot came back


def test_threaded_batcher_matches_solo_for_staggered_arrivals(qwen):
    import time

    vector = random_vector(qwen, [0, 2], seed=4)
    batcher = ContinuousBatcher(as_engine(qwen), metrics := ServerMetrics(), max_batch=6)
    batcher.start()
    jobs = []
    try:
        for i in range(12):
            steering = None if i % 3 == 0 else steer(qwen, (vector, float(i % 3)))
            job = Job(tokens(qwen, PROMPTS[i % 3] * (1 + i % 2)), SamplingParams(max_new_tokens=3 + i % 5), steering)
            batcher.submit(job)
            jobs.append(job)
            if i % 4 == 3:
                time.sleep(0.03)
        outputs = [drain(job)[0] for job in jobs]
    finally:
        batcher.stop()
    for job, got in zip(jobs, outputs, strict=True):
        spec = None if job.steering is None else job.steering.spec()
        assert got == solo(qwen, job.token_ids, job.sampling.max_new_tokens, spec)
    assert metrics.snapshot()["batch_size"]["mean"] > 1


def test_seeded_sampling_in_a_batch_matches_the_same_seed_alone(qwen):
    batcher = ContinuousBatcher(as_engine(qwen), ServerMetrics(), max_batch=4)
    sampled = SamplingParams(max_new_tokens=6, temperature=0.9, seed=11)
    jobs = [Job(tokens(qwen, PROMPTS[0]), sampled), Job(tokens(qwen, PROMPTS[1]), SamplingParams(max_new_tokens=6))]
    for job in jobs:
        batcher.submit(job)
    while batcher.queued or batcher._rows:
        batcher.step()
    alone = as_engine(qwen).generate([PROMPTS[0]], sampled, chat=False)[0]
    assert drain(jobs[0])[0] == list(alone.token_ids)


def test_grouped_scheduler_groups_by_steering_and_matches_solo(qwen):
    vector = random_vector(qwen, [1], seed=5)
    metrics = ServerMetrics()
    scheduler = GroupedScheduler(as_engine(qwen), metrics, max_batch=8)
    kinds = [None, steer(qwen, (vector, 2.0)), None, steer(qwen, (vector, 2.0)), steer(qwen, (vector, -1.0))]
    jobs = [Job(tokens(qwen, PROMPTS[i % 3]), SamplingParams(max_new_tokens=2 + i), s) for i, s in enumerate(kinds)]
    for job in jobs:
        scheduler.submit(job)
    for _ in range(3):
        scheduler.step()
    assert metrics.snapshot()["batch_size"]["histogram"] == {"1": 1, "2": 2}  # three groups, by steering
    for job in jobs:
        spec = None if job.steering is None else job.steering.spec()
        assert drain(job)[0] == solo(qwen, job.token_ids, job.sampling.max_new_tokens, spec)


def test_a_full_queue_is_a_503_and_a_cancelled_job_is_dropped(qwen):
    batcher = ContinuousBatcher(as_engine(qwen), ServerMetrics(), max_batch=2, max_queue=1)
    waiting = Job(tokens(qwen, PROMPTS[0]), SamplingParams(max_new_tokens=2))
    batcher.submit(waiting)
    with pytest.raises(RequestError) as info:
        batcher.submit(Job(tokens(qwen, PROMPTS[1]), SamplingParams(max_new_tokens=2)))
    assert info.value.status == 503
    waiting.cancelled.set()
    batcher.step()
    assert not batcher._rows and waiting._events.empty()
    batcher.stop()


def test_prefill_groups_bound_padding():
    jobs = [Job(tuple(range(n)), SamplingParams(max_new_tokens=1)) for n in (10, 100, 11, 98, 12, 50)]
    groups = prefill_groups(jobs)
    assert sorted(len(j.token_ids) for g in groups for j in g) == [10, 11, 12, 50, 98, 100]
    for group in groups:
        lengths = [len(j.token_ids) for j in group]
        assert max(lengths) * len(lengths) <= 1.15 * sum(lengths)
    assert len(groups) == 3


def test_a_failing_batch_fails_its_requests_not_the_loop(qwen, monkeypatch):
    batcher = ContinuousBatcher(as_engine(qwen), ServerMetrics(), max_batch=2)
    job = Job(tokens(qwen, PROMPTS[0]), SamplingParams(max_new_tokens=4))
    batcher.submit(job)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(qwen, "_call", broken)
    batcher.step()
    with pytest.raises(RuntimeError, match="boom"):
        drain(job)
    monkeypatch.undo()
    assert sorted(batcher._free) == [0, 1]
    again = Job(tokens(qwen, PROMPTS[0]), SamplingParams(max_new_tokens=4))
    batcher.submit(again)
    while batcher.queued or batcher._rows:
        batcher.step()
    assert drain(again)[0] == solo(qwen, again.token_ids, 4)


def test_steering_spec_of_one_term_is_lm_steer(qwen):
    vector = random_vector(qwen, [1, 2])
    resolved = steer(qwen, (vector, 1.7), layers=[2])
    expected = SteeringSpec(vector, 1.7, "prompt_last+generated", (2,))
    assert resolved.spec().chosen_layers == expected.chosen_layers == [2]
    delta = resolved.deltas()[2]
    assert torch.equal(delta, torch.stack([vector.directions[2].float()])[0] * torch.tensor(1.7))


def test_stopping_answers_every_waiting_request(qwen):
    batcher = ContinuousBatcher(as_engine(qwen), ServerMetrics(), max_batch=2)
    running = Job(tokens(qwen, PROMPTS[0]), SamplingParams(max_new_tokens=20, ignore_eos=True))
    queued = [Job(tokens(qwen, p), SamplingParams(max_new_tokens=2)) for p in PROMPTS]
    batcher.submit(running)
    batcher.step()
    for job in queued:
        batcher.submit(job)
    batcher.stop()
    for job in [running, *queued]:
        with pytest.raises(RequestError, match="shutting down"):
            drain(job)
    with pytest.raises(RequestError):
        batcher.submit(Job(tokens(qwen, PROMPTS[0]), SamplingParams(max_new_tokens=2)))
