"""Policy ordering with fake requests: FCFS, SSJF, oracle SJF, ties by arrival, aging."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ssjf.config import EngineConfig
from ssjf.policy import UNKNOWN_LENGTH, FCFSQueue, OracleSJFQueue, SSJFQueue, make_queue
from ssjf.request import Request


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def req(rid, predicted=None, max_tokens=100, ignore_eos=False, at=0.0):
    return Request(rid, [1, 2, 3], max_tokens=max_tokens, predicted_length=predicted, ignore_eos=ignore_eos,
                   arrival_time=at)


def drain(q):
    out = []
    while q:
        out.append(q.pop().request_id)
    return out


def test_fcfs_serves_in_arrival_order():
    q = FCFSQueue()
    for r in [req("a", 500), req("b", 5), req("c", 50)]:
        q.add(r)
    assert [r.request_id for r in q] == ["a", "b", "c"]
    assert q.peek().request_id == "a"
    assert drain(q) == ["a", "b", "c"]


def test_ssjf_serves_shortest_predicted_first():
    q = SSJFQueue()
    for r in [req("a", 500), req("b", 5), req("c", 50)]:
        q.add(r)
    assert [r.request_id for r in q] == ["b", "c", "a"]
    assert drain(q) == ["b", "c", "a"]


def test_ties_go_to_the_earlier_arrival():
    q = SSJFQueue()
    for r in [req("first", 10), req("second", 10), req("short", 1), req("third", 10)]:
        q.add(r)
    assert drain(q) == ["short", "first", "second", "third"]


def test_unknown_prediction_uses_the_fallback_key():
    q = SSJFQueue()
    q.add(req("unknown", None))
    q.add(req("long", UNKNOWN_LENGTH + 1))
    q.add(req("short", UNKNOWN_LENGTH - 1))
    assert drain(q) == ["short", "unknown", "long"]


def test_oracle_uses_true_length_when_ignore_eos_fixes_it():
    q = OracleSJFQueue()
    q.add(req("pred-short-true-long", predicted=1, max_tokens=900, ignore_eos=True))
    q.add(req("pred-long-true-short", predicted=900, max_tokens=3, ignore_eos=True))
    q.add(req("natural", predicted=10, max_tokens=900))  # true length unknown: falls back to the prediction
    assert drain(q) == ["pred-long-true-short", "natural", "pred-short-true-long"]


def test_aging_promotes_a_request_that_waited_past_the_bound():
    clock = Clock()
    q = SSJFQueue(starvation_s=10.0, clock=clock)
    q.add(req("long", 1000, at=0.0))
    clock.now = 5.0
    for i in range(3):
        q.add(req(f"short{i}", 1, at=5.0))
    assert q.pop().request_id == "short0"  # not starving yet: shortest first
    clock.now = 10.0
    assert q.peek().request_id == "long"  # waited 10 s: served before younger, shorter jobs
    assert [r.request_id for r in q] == ["long", "short1", "short2"]
    assert drain(q) == ["long", "short1", "short2"]


def test_aging_serves_starving_requests_oldest_first():
    clock = Clock()
    q = SSJFQueue(starvation_s=1.0, clock=clock)
    q.add(req("old-long", 900, at=0.0))
    q.add(req("old-short", 1, at=0.5))
    q.add(req("young", 1, at=9.5))
    clock.now = 10.0
    assert drain(q) == ["old-long", "old-short", "young"]


def test_aging_off_never_promotes():
    clock = Clock()
    q = SSJFQueue(starvation_s=0.0, clock=clock)
    q.add(req("long", 1000, at=0.0))
    q.add(req("short", 1, at=0.0))
    clock.now = 1e9
    assert drain(q) == ["short", "long"]


def test_bounded_wait_under_a_stream_of_short_jobs():
    """A long job is passed over at most until its wait reaches the bound."""
    clock = Clock()
    q = SSJFQueue(starvation_s=3.0, clock=clock)
    q.add(req("long", 10_000, at=0.0))
    served_at = None
    for t in range(20):  # one short arrival and one service per second
        clock.now = float(t)
        q.add(req(f"s{t}", 1, at=clock.now))
        if q.pop().request_id == "long":
            served_at = clock.now
            break
    assert served_at == 3.0


@pytest.mark.parametrize("cls", [FCFSQueue, SSJFQueue, OracleSJFQueue])
def test_remove_and_len(cls):
    q = cls()
    a, b, c = req("a", 3), req("b", 2), req("c", 1)
    for r in (a, b, c):
        q.add(r)
    assert len(q) == 3
    assert q.remove(b) is True
    assert q.remove(b) is False
    assert len(q) == 2
    assert sorted(drain(q)) == ["a", "c"]
    assert not q
    with pytest.raises(IndexError):
        q.pop()


def test_cap_by_max_tokens_bounds_the_prediction():
    """A request that may not run past 8 tokens is short, whatever the proxy predicted."""
    capped = SSJFQueue(cap_by_max_tokens=True)
    plain = SSJFQueue()
    for q in (capped, plain):
        q.add(req("predicted-long-but-capped", 400, max_tokens=8))
        q.add(req("medium", 50, max_tokens=512))
        q.add(req("unknown-capped", None, max_tokens=20))
    assert drain(capped) == ["predicted-long-but-capped", "unknown-capped", "medium"]
    assert drain(plain) == ["medium", "unknown-capped", "predicted-long-but-capped"]


def test_oracle_falls_back_to_the_capped_prediction():
    q = OracleSJFQueue(cap_by_max_tokens=True)
    q.add(req("natural", 300, max_tokens=30))  # no ignore_eos: no true length, capped prediction 30
    q.add(req("fixed", 900, max_tokens=40, ignore_eos=True))  # true length 40
    assert drain(q) == ["natural", "fixed"]


def test_factory():
    assert isinstance(make_queue(EngineConfig(policy="fcfs")), FCFSQueue)
    assert isinstance(make_queue(EngineConfig(policy="ssjf")), SSJFQueue)
    assert isinstance(make_queue(EngineConfig(policy="sjf_oracle")), OracleSJFQueue)
    assert make_queue(EngineConfig(policy="ssjf", cap_by_max_tokens=True)).cap_by_max_tokens
    q = make_queue(EngineConfig(policy="sjf_oracle", max_bypass_ratio=1.5, max_batch_size=8))
    assert (q.max_bypass_ratio, q.slots) == (1.5, 8)
    with pytest.raises(ValueError, match="unknown policy"):
        make_queue(SimpleNamespace(policy="lifo", batching="continuous"))


def test_pass_bound_promotes_a_request_passed_over_by_k_later_arrivals():
    q = SSJFQueue(max_passes=3)
    q.add(req("long", 10_000))
    served = []
    for i in range(6):  # a short job arrives and one job is served, again and again
        q.add(req(f"s{i}", 1))
        served.append(q.pop().request_id)
    assert served == ["s0", "s1", "s2", "long", "s3", "s4"]  # passed over 3 times, then served


def test_pass_bound_counts_only_later_arrivals():
    q = SSJFQueue(max_passes=1)
    first, second = req("first", 50), req("second", 10)
    q.add(first)
    q.add(second)
    assert q.pop().request_id == "second"  # passes "first" once
    q.add(req("third", 1))
    assert q.pop().request_id == "first"  # now starving: served before the shorter "third"


def test_bypass_bound_promotes_a_request_once_the_work_served_ahead_reaches_k_times_its_own():
    q = SSJFQueue(max_bypass_ratio=2.0)
    q.add(req("long", 100))
    served = []
    for i in range(6):  # a 50-token job arrives and one job is served, again and again
        q.add(req(f"s{i}", 50))
        served.append(q.pop().request_id)
    assert served == ["s0", "s1", "s2", "s3", "long", "s4"]  # 4 x 50 = 2 x 100 passed it, then served


def test_bypass_bound_is_per_batch_slot_and_relative_to_the_request_size():
    for slots, size, passes in [(1, 100, 20), (2, 100, 40), (1, 30, 6)]:
        q = SSJFQueue(max_bypass_ratio=2.0, slots=slots)
        q.add(req("waiting", size))
        served = []
        while "waiting" not in served:  # 10-token jobs keep arriving and going first...
            q.add(req(f"s{len(served)}", 10))
            served.append(q.pop().request_id)
        # ...until 2 x its own length per slot has passed it
        assert served.index("waiting") == passes, (slots, size)


def test_a_starving_request_goes_first_even_when_an_older_one_is_not_starving():
    q = SSJFQueue(max_bypass_ratio=1.0)
    for name, size in [("old-long", 100), ("short", 10), ("a", 5), ("b", 6), ("c", 7)]:
        q.add(req(name, size))
    assert drain(q)[:3] == ["a", "b", "short"]  # a and b held "short" up 11 >= 10 (and "old-long" only 11 of 100)


def test_bypass_bound_does_not_count_earlier_arrivals_or_itself():
    q = SSJFQueue(max_bypass_ratio=1.0)
    q.add(req("early-short", 5))
    q.add(req("late-long", 100))
    assert q.pop().request_id == "early-short"  # an earlier arrival served first passes nobody
    for i in range(3):
        q.add(req(f"t{i}", 30))
        q.pop()
    assert [r.request_id for r in q] == ["late-long"]  # 90 < 100: not starving yet
    q.add(req("t3", 30))
    q.pop()
    q.add(req("t4", 1))
    assert q.pop().request_id == "late-long"  # 120 >= 100: served before the 1-token job


def test_in_request_level_batches_a_batch_holds_a_request_up_as_long_as_its_longest_job():
    q = SSJFQueue(max_bypass_ratio=1.0, batch_rounds=True)
    q.add(req("waiting", 100))
    q.new_round()
    for size in (30, 50, 20, 40):  # one batch of four passes it: held up 50 steps, not 140
        q.add(req(f"a{size}", size))
    assert [q.pop().request_id for _ in range(4)] == ["a20", "a30", "a40", "a50"]
    q.new_round()
    q.add(req("b40", 40))
    q.add(req("b45", 45))
    assert [q.pop().request_id for _ in range(2)] == ["b40", "b45"]  # held up 50 + 45 = 95 < 100
    q.new_round()
    q.add(req("c10", 10))
    assert q.pop().request_id == "c10"  # 95 + 10 >= 100: starving now
    q.new_round()
    q.add(req("tiny", 1))
    assert q.pop().request_id == "waiting"


def test_oracle_bypass_bound_uses_true_lengths():
    q = OracleSJFQueue(max_bypass_ratio=1.0)
    q.add(req("long", 1, max_tokens=60, ignore_eos=True))  # predicted 1 but truly 60
    for i in range(3):
        q.add(req(f"s{i}", 500, max_tokens=20, ignore_eos=True))
    assert drain(q) == ["s0", "s1", "s2", "long"]  # 60 >= 60 only after the third
    q = OracleSJFQueue(max_bypass_ratio=1.0)
    q.add(req("long", 1, max_tokens=60, ignore_eos=True))
    for i in range(4):
        q.add(req(f"s{i}", 500, max_tokens=20, ignore_eos=True))
    assert drain(q) == ["s0", "s1", "s2", "long", "s3"]


def test_with_no_predictions_at_all_ssjf_is_fcfs():
    """The proxy down for everyone: every request gets the fallback key, ties go by arrival."""
    q = SSJFQueue()
    for name in ["a", "b", "c", "d"]:
        q.add(req(name, None))
    assert drain(q) == ["a", "b", "c", "d"]


def test_expected_remaining_grows_for_a_job_that_outlives_its_guess_and_respects_its_limit():
    from ssjf.policy import LengthSpread

    spread = LengthSpread(sigma=0.8)
    fresh = spread.expected_remaining(100, 0)
    assert fresh == pytest.approx(100 * math.exp(0.32))  # the log-normal's mean
    early, late, far = (spread.expected_remaining(100, a) for a in (10, 300, 5000))
    assert early < fresh + 1 and late > early and far > late  # outliving the guess raises what is left
    assert spread.expected_remaining(100, 300, limit=20) == 20
    assert spread.expected_remaining(100, 10**6) >= 1


def test_the_spread_learns_bias_and_width_from_the_errors():
    from ssjf.policy import LengthSpread

    spread = LengthSpread(sigma=0.8)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spread.observe(100, int(round(100 * math.exp(0.5 + 0.3 * rng.standard_normal()))))
    assert spread.bias == pytest.approx(0.5, abs=0.1) and spread.sigma == pytest.approx(0.3, abs=0.1)


def test_ssrpt_keys_a_running_job_by_what_it_still_needs():
    from ssjf.policy import SSRPTQueue

    q = SSRPTQueue()
    a = Request("a", [1], max_tokens=1000, predicted_length=50)
    b = Request("b", [1], max_tokens=1000, predicted_length=80)
    assert q.sort_key(a) < q.sort_key(b)
    a.output_ids = [0] * 400  # a ran 8x past its guess: it now expects to need more than b
    assert q.sort_key(a) > q.sort_key(b)


def test_ssrpt_keeps_arrival_order_among_equal_predictions_as_its_spread_learns():
    from ssjf.policy import SSRPTQueue

    q = SSRPTQueue()
    reqs = []
    for i in range(6):
        r = Request(str(i), [1], max_tokens=1000, predicted_length=256)
        q.add(r)
        reqs.append(r)
        done = Request("f", [1], max_tokens=1000, predicted_length=256)
        done.output_ids = [0] * (40 + 30 * i)  # the learned bias moves after every arrival
        q.observe(done)
    assert [q.pop().request_id for _ in range(6)] == [str(i) for i in range(6)]  # a constant guess is FCFS


def test_ssrpt_preempts_only_while_its_predictions_rank():
    from ssjf.policy import OracleSRPTQueue, SSRPTQueue

    def finished(q, predicted, true):
        r = Request("f", [1], max_tokens=1000, predicted_length=predicted)
        r.output_ids = [0] * true
        q.observe(r)

    rng = np.random.default_rng(0)
    constant = SSRPTQueue(min_tau=0.1)
    assert constant.trusts_estimates()  # before any evidence, the artifact is trusted
    for _ in range(SSRPTQueue.MIN_RANKED):
        finished(constant, 256, int(rng.integers(10, 500)))  # a constant guess ranks nothing
    assert not constant.trusts_estimates()
    useful = SSRPTQueue(min_tau=0.1)
    for _ in range(50):
        n = int(rng.integers(10, 500))
        finished(useful, max(1, round(n * math.exp(0.3 * rng.standard_normal()))), n)
    assert useful.trusts_estimates()
    assert SSRPTQueue(min_tau=0.0).trusts_estimates() and OracleSRPTQueue(min_tau=0.1).trusts_estimates()
    assert make_queue(EngineConfig(policy="ssrpt")).min_tau == EngineConfig().preempt_min_tau > 0


def test_priority_classes_come_first_and_the_guard_works_within_a_class():
    clock = Clock()
    for q in (FCFSQueue(), SSJFQueue(max_passes=1, clock=clock)):
        low = Request("low", [1], max_tokens=5, predicted_length=1, priority=1)
        high_long = Request("high_long", [1], max_tokens=5, predicted_length=500, priority=0)
        high_short = Request("high_short", [1], max_tokens=5, predicted_length=5, priority=0)
        for r in (low, high_long, high_short):
            q.add(r)
        order = [q.pop().request_id for _ in range(3)]
        assert order[-1] == "low", order  # however short it is, class 1 waits for class 0
        assert set(order[:2]) == {"high_long", "high_short"}


def test_the_queue_keeps_no_state_for_requests_that_left():
    from ssjf.policy import SSRPTQueue

    q = SSRPTQueue(max_passes=4)
    reqs = [Request(str(i), [1], max_tokens=10, predicted_length=5 + i) for i in range(50)]
    for r in reqs:
        q.add(r)
    for _ in range(25):
        q.pop()
    for r in reqs[40:]:
        q.remove(r)
    live = {r.seq for r in q}
    assert set(q._entry) == live and set(q._passes) <= live
