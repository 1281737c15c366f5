"""The responder: sends, errors and cancellation checks off the engine thread, in order."""

import threading
import time

from ssjf.responder import Responder


class Recorder:
    def __init__(self, fail_after=None, cancelled=False):
        self.events, self.fail_after, self.cancelled, self.checks = [], fail_after, cancelled, 0
        self.threads = set()

    def send(self, text, final, tokens=0, reason=None):
        self.threads.add(threading.get_ident())
        if self.fail_after is not None and len(self.events) >= self.fail_after:
            raise RuntimeError("client gone")
        self.events.append((text, final))

    def error(self, message):
        self.events.append(("error", message))

    def is_cancelled(self):
        self.checks += 1
        return self.cancelled


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_pieces_go_out_in_order_on_another_thread_and_stop_drains_the_queue():
    responder = Responder()
    a, b = Recorder(), Recorder()
    sa, sb = responder.wrap(a), responder.wrap(b)
    for i in range(200):
        sa.send(f"a{i}", False)
        sb.send(f"b{i}", False)
    sa.send("", True)
    sb.error("deadline exceeded")
    responder.stop()
    assert a.events == [(f"a{i}", False) for i in range(200)] + [("", True)]
    assert b.events[-1] == ("error", "deadline exceeded") and len(b.events) == 201
    assert threading.get_ident() not in a.threads


def test_a_failed_send_reads_as_cancelled_so_the_engine_frees_the_slot():
    responder = Responder()
    sink = responder.wrap(Recorder(fail_after=1))
    sink.send("x", False)
    sink.send("y", False)  # raises on the responder: the client went away
    wait_for(sink.is_cancelled)
    responder.stop()


def test_cancellation_is_polled_without_blocking_and_at_most_every_poll_s():
    responder = Responder(poll_s=10.0)
    inner = Recorder(cancelled=True)
    sink = responder.wrap(inner)
    assert sink.is_cancelled() is False  # the answer is not waited for
    wait_for(lambda: inner.checks == 1)
    assert sink.is_cancelled() is True
    fast = Responder(poll_s=0.0)
    live = Recorder()
    s2 = fast.wrap(live)
    for _ in range(50):
        s2.is_cancelled()
        time.sleep(0.001)
    wait_for(lambda: live.checks >= 2)
    assert live.checks <= 50  # one check in flight at a time
    responder.stop()
    fast.stop()


def test_one_failing_job_does_not_stop_the_others():
    responder = Responder()
    bad = responder.wrap(Recorder())
    bad.inner.error = lambda message: (_ for _ in ()).throw(RuntimeError("boom"))
    good = Recorder()
    bad.error("x")
    responder.wrap(good).send("ok", True)
    responder.stop()
    assert good.events == [("ok", True)]
