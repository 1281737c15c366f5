"""Admission and batching modes, separate from ordering."""

from ssjf.config import EngineConfig
from ssjf.request import Request, RequestStatus
from ssjf.scheduler import Scheduler


def req(rid, prompt_len=4, predicted=10):
    return Request(rid, list(range(prompt_len)), max_tokens=64, predicted_length=predicted)


def test_continuous_admits_into_free_places_in_policy_order():
    s = Scheduler(EngineConfig(policy="ssjf", max_batch_size=2))
    for r in [req("a", predicted=30), req("b", predicted=10), req("c", predicted=20)]:
        s.add(r)
    admitted = s.schedule()
    assert [r.request_id for r in admitted] == ["b", "c"]
    assert all(r.status is RequestStatus.RUNNING for r in admitted)
    assert s.schedule() == []  # full
    s.retire(s.running[0])
    assert [r.request_id for r in s.schedule()] == ["a"]  # joins mid-flight
    assert [r.request_id for r in s.running] == ["c", "a"]


def test_dynamic_batching_waits_for_the_batch_to_drain():
    s = Scheduler(EngineConfig(policy="fcfs", batching="dynamic", max_batch_size=2))
    for r in [req("a"), req("b"), req("c")]:
        s.add(r)
    assert [r.request_id for r in s.schedule()] == ["a", "b"]
    s.retire(s.running[0])
    assert s.schedule() == []  # one slot is free, but dynamic batches run to completion
    s.retire(s.running[0])
    assert [r.request_id for r in s.schedule()] == ["c"]


def test_no_batching_runs_one_at_a_time():
    config = EngineConfig(batching="none", max_batch_size=8)
    assert config.max_batch_size == 1
    s = Scheduler(config)
    for r in [req("a"), req("b")]:
        s.add(r)
    assert len(s.schedule()) == 1
    assert s.schedule() == []


def test_prefill_budget_limits_padded_prompt_tokens_per_step():
    s = Scheduler(EngineConfig(policy="fcfs", max_batch_size=8, max_prefill_tokens=100))
    for r in [req("a", 40), req("b", 40), req("c", 40)]:
        s.add(r)
    assert [r.request_id for r in s.schedule()] == ["a", "b"]  # 3 x 40 > 100
    assert [r.request_id for r in s.schedule()] == ["c"]


def test_a_single_long_prompt_is_still_admitted():
    s = Scheduler(EngineConfig(max_batch_size=8, max_prefill_tokens=10))
    s.add(req("long", 500))
    assert [r.request_id for r in s.schedule()] == ["long"]
