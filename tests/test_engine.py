"""Engine correctness: continuous batching with requests joining mid-flight gives the same
greedy tokens as transformers' generate on each prompt alone; streams end with one final."""

import threading
import time

import pytest
import torch

from conftest import ListSink
from ssjf.config import EngineConfig
from ssjf.engine import Engine, RequestError
from ssjf.runners.torch.runner import ModelRunner
from ssjf.request import LLMInputs, Request, RequestStatus, Sampling

PROMPTS = ["hello there", "a much longer prompt about the sea, the sky, the wind and more", "x",
           "What is 2+2?", "tell me a story about a dragon", "ok"]


class Backend:
    """One runner kind for the engine tests: an engine on it, its reference tokens (transformers'
    greedy generate on the same weights), and a way to break its forward pass."""

    def __init__(self, kind, model, tokenizer, llm=None):
        self.kind, self.model, self.tokenizer, self.llm = kind, model, tokenizer, llm

    def engine(self, clock=time.monotonic, on_death=None, **kw) -> Engine:
        config = EngineConfig(runner=self.kind, dtype="float32", max_seq_len=256, **{"max_batch_size": 4, **kw})
        if self.kind == "torch":
            runner = ModelRunner(config, model=self.model, tokenizer=self.tokenizer)
        else:
            from ssjf.runners.vllm import VllmRunner

            runner = VllmRunner(config, engine=self.llm, tokenizer=self.tokenizer)
        return Engine(config, runner=runner, clock=clock, on_death=on_death)

    def reference(self, prompt_ids, n):
        return reference(self.model, prompt_ids, n)

    def break_forward(self, monkeypatch, runner, phase, error="kaboom"):
        """Make the forward pass of `phase` ("admit": the prefill; "step": decoding) raise."""
        def fail(*a, **k):
            raise RuntimeError(error)

        if self.kind == "torch":
            monkeypatch.setattr(runner, "prefill" if phase == "admit" else "decode", fail)
        else:  # vLLM prefills and decodes inside its step
            monkeypatch.setattr(runner.engine, "step", fail)


@pytest.fixture(scope="session")
def vllm_backend(tokenizer):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install VLLM=1 installs it)")
    import importlib.metadata

    if not torch.cuda.is_available() and importlib.metadata.packages_distributions().get("vllm") == ["vllm"]:
        pytest.skip("vLLM's CUDA build (make test-gpu-deps) cannot start an engine without a GPU")
    from transformers import AutoModelForCausalLM

    from ssjf.assets import smollm2_path
    from ssjf.runners.vllm import VllmRunner

    config = EngineConfig(runner="vllm", dtype="float32", max_batch_size=8, max_seq_len=512, enforce_eager=True)
    llm = VllmRunner._start(config, str(smollm2_path()), "float32")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    return Backend("vllm", model, tokenizer, llm)


@pytest.fixture(params=["torch", "vllm"])
def backend(request, tiny_model, tokenizer):
    if request.param == "torch":
        return Backend("torch", tiny_model, tokenizer)
    return request.getfixturevalue("vllm_backend")


def reference(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def requests(engine, stream=True):
    return [Request(str(i), engine.encode_prompt(p), max_tokens=12 + 3 * i, sink=ListSink(), ignore_eos=True,
                    stream=stream) for i, p in enumerate(PROMPTS)]


def test_continuous_batching_with_joins_matches_generate(backend):
    engine = backend.engine()
    reqs = requests(engine)
    engine.add_request(reqs[0])
    engine.step()
    engine.add_request(reqs[1])
    engine.add_request(reqs[2])
    engine.step()
    engine.step()
    for r in reqs[3:]:  # more than the 4 slots: some wait, then join as others leave
        engine.add_request(r)
    engine.run_until_idle()
    for r in reqs:
        assert r.output_ids == backend.reference(r.prompt_ids, r.max_tokens), r.request_id
        assert r.status is RequestStatus.FINISHED and r.finish_reason == "length"
        assert r.sink.finals == 1 and not r.sink.errors
        assert r.sink.text == backend.tokenizer.decode(r.output_ids, skip_special_tokens=True)
    assert engine.scheduler.running == [] and len(engine.scheduler.waiting) == 0


@pytest.mark.parametrize("batching", ["none", "dynamic"])
def test_other_batching_modes_give_the_same_tokens(backend, batching):
    engine = backend.engine(batching=batching)
    reqs = requests(engine)
    for r in reqs:
        engine.add_request(r)
    before: set[str] = set()
    max_running = 0
    while engine._inbox or engine.scheduler.has_work():
        engine.step()
        after = {r.request_id for r in engine.scheduler.running}
        joined = after - before
        if batching == "dynamic":  # request-level batches: nobody joins while a batch is still running
            assert not (joined and (before & after)), (before, after)
        max_running = max(max_running, len(after))
        before = after
    assert max_running == (1 if batching == "none" else 4)
    for r in reqs:
        assert r.output_ids == backend.reference(r.prompt_ids, r.max_tokens)


def test_real_smollm2_matches_generate_in_fp32():
    config = EngineConfig(runner="torch", dtype="float32", max_batch_size=4, max_seq_len=512)
    engine = Engine(config)
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three colors."]
    reqs = [Request(str(i), engine.encode_prompt(p), max_tokens=16, sink=ListSink(), ignore_eos=True)
            for i, p in enumerate(prompts)]
    engine.add_request(reqs[0])
    engine.step()
    engine.step()
    engine.add_request(reqs[1])
    engine.add_request(reqs[2])
    engine.run_until_idle()
    for r in reqs:
        assert r.output_ids == reference(engine.runner.model, r.prompt_ids, 16)
    assert "Paris" in reqs[0].sink.text


def test_non_streaming_gets_exactly_one_response(backend):
    engine = backend.engine()
    reqs = requests(engine, stream=False)
    for r in reqs:
        engine.add_request(r)
    engine.run_until_idle()
    for r in reqs:
        assert len(r.sink.parts) == 1 and r.sink.finals == 1
        assert r.sink.parts[0] == backend.tokenizer.decode(r.output_ids, skip_special_tokens=True)


def test_streaming_sends_pieces_then_final(backend):
    engine = backend.engine()
    r = requests(engine)[4]
    engine.add_request(r)
    engine.run_until_idle()
    assert len(r.sink.parts) > 1 and r.sink.finals == 1


def test_stops_at_eos_unless_ignored(backend):
    engine = backend.engine()
    probe = Request("p", engine.encode_prompt("hello"), max_tokens=3, sink=ListSink(), ignore_eos=True)
    engine.add_request(probe)
    engine.run_until_idle()
    engine.runner.eos_token_ids = {probe.output_ids[1]}  # make the 2nd greedy token an EOS
    stops = Request("s", probe.prompt_ids, max_tokens=10, sink=ListSink())
    runs = Request("r", probe.prompt_ids, max_tokens=10, sink=ListSink(), ignore_eos=True)
    engine.add_request(stops)
    engine.add_request(runs)
    engine.run_until_idle()
    assert stops.finish_reason == "stop" and len(stops.output_ids) == 2
    assert runs.finish_reason == "length" and len(runs.output_ids) == 10


def test_a_stop_string_ends_the_text_before_it_and_the_stream_never_shows_it(backend):
    """The stop rule is the engine's, on both runners: the output ends where the first stop string
    begins, streamed pieces join to exactly that text, and the finish reason is "stop"."""
    engine = backend.engine()
    probe = Request("p", engine.encode_prompt("hello"), max_tokens=24, sink=ListSink(), ignore_eos=True)
    engine.add_request(probe)
    engine.run_until_idle()
    text = probe.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # three characters from the middle of the greedy answer
    assert len(stop) == 3
    cut = text.index(stop)
    stops = Request("s", probe.prompt_ids, max_tokens=24, sink=ListSink(), ignore_eos=True,
                    stop=("never in the answer", stop))
    engine.add_request(stops)
    engine.run_until_idle()
    assert stops.finish_reason == "stop" and stops.text == text[:cut]
    assert "".join(stops.sink.parts) == text[:cut] and stops.sink.finals == 1
    assert len(stops.output_ids) < len(probe.output_ids)  # it stopped generating there, too
    # every send carries the output tokens it covers, the final one the reason
    assert sum(stops.sink.tokens) == len(stops.output_ids) and stops.sink.reason == "stop"
    assert sum(probe.sink.tokens) == 24 and probe.sink.reason == "length"


def test_cancelled_request_frees_its_slot_within_one_step(backend):
    engine = backend.engine(max_batch_size=1, policy="fcfs")
    a = Request("a", engine.encode_prompt("first"), max_tokens=200, sink=ListSink(), ignore_eos=True)
    b = Request("b", engine.encode_prompt("second"), max_tokens=5, sink=ListSink(), ignore_eos=True)
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    engine.step()
    a.sink.cancelled = True
    engine.step()
    assert a.status is RequestStatus.ABORTED and a.sink.errors == ["request cancelled"] and a.sink.finals == 1
    assert b.status is RequestStatus.RUNNING
    engine.run_until_idle()
    assert b.status is RequestStatus.FINISHED and len(b.output_ids) == 5


def test_a_failing_step_ends_requests_with_an_error_and_the_engine_goes_on(backend, monkeypatch):
    engine = backend.engine()
    a = Request("a", engine.encode_prompt("boom"), max_tokens=5, sink=ListSink(), ignore_eos=True)
    engine.add_request(a)
    with monkeypatch.context() as patch:
        backend.break_forward(patch, engine.runner, "admit")
        engine.step()
    assert a.status is RequestStatus.FAILED and "kaboom" in a.sink.errors[0] and a.sink.finals == 1
    b = Request("b", engine.encode_prompt("fine"), max_tokens=5, sink=ListSink(), ignore_eos=True)
    engine.add_request(b)
    engine.run_until_idle()
    assert b.status is RequestStatus.FINISHED


def test_length_checks(backend):
    engine = backend.engine()
    r = Request("a", engine.encode_prompt("hi"), max_tokens=None, sink=ListSink())
    engine.check(r)
    assert r.max_tokens == min(engine.config.default_max_tokens, 256 - r.prompt_len)
    with pytest.raises(RequestError, match="^max_tokens:"):
        engine.check(Request("b", [1, 2], max_tokens=255, sink=ListSink()))
    with pytest.raises(RequestError, match="^max_tokens:"):
        engine.check(Request("c", [1, 2], max_tokens=-1, sink=ListSink()))
    with pytest.raises(RequestError, match="^text_input:"):
        engine.check(Request("d", list(range(300)), max_tokens=1, sink=ListSink()))


def test_engine_thread_serves_concurrent_adds(backend):
    engine = backend.engine()
    engine.start()
    try:
        reqs = requests(engine)
        threads = [threading.Thread(target=engine.add_request, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not all(r.is_done for r in reqs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(r.status is RequestStatus.FINISHED for r in reqs)
    finally:
        engine.stop()
    assert not engine.alive


def test_stop_fails_what_is_still_queued(backend):
    engine = backend.engine()
    engine.start()
    r = Request("late", engine.encode_prompt("x"), max_tokens=200, sink=ListSink(), ignore_eos=True)
    engine.stop()
    engine._inbox.append(r)
    engine._fail_all("server shutting down")
    assert r.sink.errors == ["server shutting down"] and r.sink.finals == 1


def test_a_full_waiting_queue_rejects_new_requests(backend):
    engine = backend.engine(max_waiting=3)
    for i in range(3):
        engine.add_request(Request(str(i), [1, 2], max_tokens=4, sink=ListSink()))
    with pytest.raises(RequestError, match="^queue full"):
        engine.check(Request("x", [1, 2], max_tokens=4, sink=ListSink()))
    engine.run_until_idle()
    engine.check(Request("y", [1, 2], max_tokens=4, sink=ListSink()))  # room again once they ran


class GoneSink(ListSink):
    """A client that disconnected: every send raises, and it reports cancellation."""

    def send(self, text, final, tokens=0, reason=None):
        raise RuntimeError("stream closed")

    def error(self, message):
        raise RuntimeError("stream closed")

    def is_cancelled(self):
        return True


def test_a_vanished_client_never_kills_the_engine(backend, monkeypatch):
    engine = backend.engine()
    gone = Request("gone", engine.encode_prompt("bye"), max_tokens=50, sink=GoneSink(), ignore_eos=True)
    ok = Request("ok", engine.encode_prompt("hi"), max_tokens=5, sink=ListSink(), ignore_eos=True)
    engine.add_request(gone)
    engine.add_request(ok)
    engine.run_until_idle()  # cancellation, then the final error to a closed stream: must not raise
    assert gone.status is RequestStatus.ABORTED and ok.status is RequestStatus.FINISHED
    boom = Request("boom", engine.encode_prompt("x"), max_tokens=5, sink=ListSink(), ignore_eos=True)
    boom.sink.error = GoneSink().error  # tokens arrive, but the error cannot be delivered
    backend.break_forward(monkeypatch, engine.runner, "step")
    engine.add_request(boom)
    engine.step()  # a failed step whose error cannot be delivered either
    assert boom.status is RequestStatus.FAILED


def test_one_failing_request_fails_alone_and_the_batch_goes_on(tiny_model, tokenizer, monkeypatch):
    """A forward pass that fails whenever the poisoned request is in the batch: the batch is retried
    one request at a time, the poisoned one gets the error, the others give their exact tokens."""
    backend = Backend("torch", tiny_model, tokenizer)  # retrying rows alone is the torch runner's
    engine = backend.engine()
    reqs = requests(engine)[:4]
    poison = reqs[1]
    real = engine.runner.decode

    def decode(tokens, positions, slots=None):
        if engine.runner.slot_of(poison) in (range(len(tokens)) if slots is None else slots):
            raise RuntimeError("poisoned row")
        return real(tokens, positions, slots)

    monkeypatch.setattr(engine.runner, "decode", decode)
    for r in reqs:
        engine.add_request(r)
    engine.run_until_idle()
    assert poison.status is RequestStatus.FAILED and "poisoned row" in poison.sink.errors[0]
    assert poison.sink.finals == 1
    for r in reqs:
        if r is not poison:
            assert r.status is RequestStatus.FINISHED and r.sink.finals == 1
            assert r.output_ids == backend.reference(r.prompt_ids, r.max_tokens)


def test_requests_past_their_deadline_end_with_an_error(backend):
    now = [0.0]
    engine = backend.engine(clock=lambda: now[0], max_batch_size=1, request_timeout_s=100, policy="fcfs")
    running = Request("run", engine.encode_prompt("a"), max_tokens=200, sink=ListSink(), ignore_eos=True,
                      arrival_time=0.0)
    waiting = Request("wait", engine.encode_prompt("b"), max_tokens=4, sink=ListSink(), ignore_eos=True,
                      arrival_time=0.0)
    later = Request("later", engine.encode_prompt("c"), max_tokens=4, sink=ListSink(), ignore_eos=True,
                    arrival_time=0.0)
    engine.add_request(running, timeout_s=5.0)  # the client asked for 5 s
    engine.add_request(waiting)
    assert running.deadline == 5.0 and waiting.deadline == 100.0  # the shorter of the client's and ours
    engine.step()
    now[0] = 6.0
    engine.step()  # the running request is past its 5 s
    assert running.status is RequestStatus.FAILED and running.sink.errors[0].startswith("deadline exceeded")
    assert 0 < len(running.output_ids) < 200
    engine.add_request(later)
    later.deadline = 1000.0  # as if it had asked for more time than the engine's bound
    now[0] = 101.0  # `waiting` is past the engine's 100 s bound
    engine.run_until_idle()
    assert waiting.status is RequestStatus.FAILED and "deadline exceeded" in waiting.sink.errors[0]
    assert later.status is RequestStatus.FINISHED


def test_tiny_temperatures_sample_greedily_instead_of_overflowing(backend):
    engine = backend.engine()
    r = Request("t", engine.encode_prompt("hello there"), max_tokens=6, sink=ListSink(), ignore_eos=True,
                sampling=Sampling(temperature=1e-30))
    engine.add_request(r)
    engine.run_until_idle()
    assert r.status is RequestStatus.FINISHED
    assert r.output_ids == backend.reference(r.prompt_ids, 6)


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_crashed_loop_fails_in_flight_requests_restarts_then_reports_death(backend, monkeypatch):
    deaths = []
    engine = backend.engine(on_death=deaths.append, max_engine_restarts=1)

    def crash(*a, **k):
        raise AssertionError("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "schedule", crash)
    engine.start()
    try:
        first = Request("1", engine.encode_prompt("x"), max_tokens=4, sink=ListSink(), ignore_eos=True)
        engine.add_request(first)
        assert _wait_for(lambda: first.is_done)
        assert first.status is RequestStatus.FAILED and "scheduler bug" in first.sink.errors[0]
        assert engine.alive and engine.crashes == 1  # restarted with a fresh scheduler
        ok = Request("2", engine.encode_prompt("y"), max_tokens=4, sink=ListSink(), ignore_eos=True)
        engine.add_request(ok)
        assert _wait_for(lambda: ok.is_done) and ok.status is RequestStatus.FINISHED
        monkeypatch.setattr(engine.scheduler, "schedule", crash)
        last = Request("3", engine.encode_prompt("z"), max_tokens=4, sink=ListSink(), ignore_eos=True)
        engine.add_request(last)
        assert _wait_for(lambda: not engine.alive)  # the second crash uses up the restarts
        assert last.status is RequestStatus.FAILED and last.sink.finals == 1
        assert len(deaths) == 1 and isinstance(engine.failure, AssertionError)
    finally:
        engine.stop()


@pytest.mark.parametrize("bound,long_pred,limit", [
    ({"starvation_s": 5.0, "max_passes": 0, "max_bypass_ratio": 0}, 500, 5),
    ({"starvation_s": 0.0, "max_passes": 4, "max_bypass_ratio": 0}, 500, 4),
    ({"starvation_s": 0.0, "max_passes": 0, "max_bypass_ratio": 2}, 6, 12),  # 2 x 6 one-token jobs
])
def test_under_sustained_short_load_the_longest_wait_stays_within_the_bound(backend, bound, long_pred,
                                                                            limit):
    """SSJF at batch 1 with a new short job every step (each step is one second on a fake clock):
    the long job is passed over, but only until the configured bound: by time, by passes, or by the
    work that passed it (one arrival per second: passes ~ seconds)."""
    now = [0.0]
    # the long job's key is its prediction, not max_tokens 2
    engine = backend.engine(clock=lambda: now[0], max_batch_size=1, policy="ssjf", cap_by_max_tokens=False, **bound)
    ids = engine.encode_prompt("x")
    long = Request("long", ids, max_tokens=2, sink=ListSink(), ignore_eos=True, predicted_length=long_pred,
                   arrival_time=0.0)
    shorts = []
    engine.add_request(long)
    for t in range(30):
        now[0] = float(t)
        short = Request(f"s{t}", ids, max_tokens=1, sink=ListSink(), ignore_eos=True, predicted_length=1,
                        arrival_time=now[0])
        shorts.append(short)
        engine.add_request(short)
        engine.step()
    assert long.first_token_time is not None
    waits = [r.first_token_time - r.arrival_time for r in [long, *shorts] if r.first_token_time is not None]
    assert limit - 2 <= long.first_token_time - long.arrival_time <= limit + 1  # the bound, not luck, served it
    assert max(waits) <= limit + 1


def test_the_torch_runner_keeps_its_slots_without_holes(tiny_model, tokenizer):
    config = EngineConfig(runner="torch", dtype="float32", max_seq_len=64, max_batch_size=4)
    runner = ModelRunner(config, model=tiny_model, tokenizer=tokenizer)
    a, b, c = [Request(x, [1, 2, 3], max_tokens=4) for x in "abc"]
    out = runner.admit([a, b, c])
    assert [runner.slot_of(r) for r in (a, b, c)] == [0, 1, 2] and len(out.tokens) == 3
    cached = runner.k_cache[:, 2, :, :3].clone()
    runner.release(a)  # c moves from slot 2 into the hole, its cache with it
    assert tuple(map(runner.slot_of, (a, b, c))) == (-1, 1, 0)
    assert torch.equal(runner.k_cache[:, 0, :, :3], cached)
    runner.release(b)  # the last slot: nothing moves
    assert runner.slots == [c] and runner.slot_of(c) == 0
    runner.release(b)  # twice: nothing happens


def test_prompts_of_very_different_lengths_prefill_in_groups_with_the_same_logits(tiny_model, tokenizer):
    from ssjf.runners.torch.model import prefill_groups

    # longest first; a short prompt is not padded to a long one's width, short ones still batch
    assert prefill_groups([50, 500, 480, 12, 10], 2048) == [[1, 2], [0, 3], [4]]
    assert prefill_groups([10, 12, 9], 2048) == [[1, 0, 2]]
    config = EngineConfig(runner="torch", dtype="float32", max_seq_len=256, max_batch_size=4)
    runner = ModelRunner(config, model=tiny_model, tokenizer=tokenizer)
    short, long = [5, 6, 7], list(range(10, 190))
    together = runner.prefill([0, 1], [short, long])  # two groups
    assert torch.allclose(together[0], runner.prefill([2], [short])[0], atol=1e-5)
    assert torch.allclose(together[1], runner.prefill([3], [long])[0], atol=1e-5)
    # each slot's cache holds its own prompt: slot 0 decodes as slot 2 (the short prompt alone) does
    assert torch.allclose(runner.decode([8], [len(short)], [0])[0], runner.decode([8], [len(short)], [2])[0], atol=1e-5)
    assert not torch.allclose(runner.decode([8], [len(long)], [1])[0], runner.decode([8], [len(long)], [2])[0], atol=1e-3)


def test_prefill_widths_come_from_a_small_fixed_ladder():
    from ssjf.runners.torch.model import prefill_width

    widths = {prefill_width(n, 2048) for n in range(1, 2049)}
    assert len(widths) <= 28 and max(widths) == 2048
    assert all(n <= prefill_width(n, 2048) <= max(16, n + 7) for n in range(1, 65))
    assert all(n <= prefill_width(n, 2048) <= 1.25 * n for n in range(65, 2049))
    assert prefill_width(3000, 2048) == 3000  # over the limit: the caller rejects it; never truncated here


class CountingSink(ListSink):
    def __init__(self):
        super().__init__()
        self.checks = 0

    def is_cancelled(self):
        self.checks += 1
        return self.cancelled


def test_waiting_requests_are_checked_for_cancellation_sparingly(backend):
    """Each check is an IPC call in Triton: the waiting queue is scanned every 10 s, not every step;
    a cancelled waiting request still never reaches prefill."""
    now = [0.0]
    engine = backend.engine(clock=lambda: now[0], max_batch_size=1, policy="fcfs")
    first = Request("a", engine.encode_prompt("a"), max_tokens=100, sink=ListSink(), ignore_eos=True)
    waiting = Request("b", engine.encode_prompt("b"), max_tokens=4, sink=CountingSink(), ignore_eos=True)
    engine.add_request(first)
    engine.add_request(waiting)
    for t in range(9):  # nine seconds, a step each
        now[0] = float(t)
        engine.step()
    assert waiting.sink.checks == 1  # the scan at t=0 only
    waiting.sink.cancelled = True
    now[0] = 10.0
    engine.step()
    assert waiting.status is RequestStatus.ABORTED and waiting.sink.errors == ["request cancelled"]
    assert waiting.output_ids == []


def test_packed_bf16_linears_compute_what_f_linear_does(tiny_model, tokenizer):
    """On a CPU in bf16 the torch runner packs each weight once (oneDNN's layout); where oneDNN has
    no bf16 it falls back to F.linear. Either way the products match F.linear's."""
    import copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    config = EngineConfig(runner="torch", dtype="bfloat16", max_seq_len=64, max_batch_size=4)
    runner = ModelRunner(config, model=model, tokenizer=tokenizer)
    w, b = model.model.layers[0].mlp.down_proj.weight, None
    x = torch.randn(3, 1, w.shape[1], dtype=torch.bfloat16)
    torch.testing.assert_close(runner._linear(w, b)(x), torch.nn.functional.linear(x, w, b), atol=2e-2, rtol=2e-2)
    engine = Engine(config, runner=runner)
    r = Request("p", engine.encode_prompt("hello"), max_tokens=6, sink=ListSink(), ignore_eos=True)
    engine.add_request(r)
    engine.run_until_idle()
    assert r.status is RequestStatus.FINISHED and len(r.output_ids) == 6


def test_the_fixed_shape_decode_cuda_graphs_capture_gives_the_same_tokens(tiny_model, tokenizer):
    """What a CUDA graph captures (the batch padded to its bucket, attention over the whole cache,
    masked), run eagerly here: requests joining and leaving move the batch across buckets."""
    backend = Backend("torch", tiny_model, tokenizer)
    engine = backend.engine(max_batch_size=4)
    engine.runner.static_decode = True
    reqs = requests(engine)
    engine.add_request(reqs[0])
    engine.step()
    engine.add_request(reqs[1])
    engine.add_request(reqs[2])
    engine.step()
    for r in reqs[3:]:
        engine.add_request(r)
    engine.run_until_idle()
    assert set(engine.runner._graphs) <= {1, 2, 4} and len(engine.runner._graphs) >= 2
    for r in reqs:
        assert r.output_ids == backend.reference(r.prompt_ids, r.max_tokens), r.request_id
    assert engine.runner.buckets() == [1, 2, 4]


def test_drain_finishes_what_fits_refuses_new_ones_and_ends_the_rest_with_an_error(tiny_model, tokenizer):
    """Graceful shutdown: after drain(s), no new request is admitted; a short request finishes; a long
    one still running at the drain deadline ends with one clear error; the loop stays alive."""
    now = [0.0]
    engine = Backend("torch", tiny_model, tokenizer).engine(clock=lambda: now[0])
    short = Request("short", engine.encode_prompt("hi"), max_tokens=3, sink=ListSink(), ignore_eos=True)
    long = Request("long", engine.encode_prompt("a story"), max_tokens=200, sink=ListSink(), ignore_eos=True)
    engine.add_request(short)
    engine.add_request(long)
    engine.start()
    try:
        engine.drain(5.0)
        with pytest.raises(RequestError, match="^server shutting down"):
            engine.submit(LLMInputs(text="late"), ListSink())
        deadline = time.monotonic() + 30
        while short.sink.finals == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert short.status is RequestStatus.FINISHED and short.sink.errors == []
        now[0] = 6.0  # the drain time runs out with the long one still generating
        while long.sink.finals == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert long.status is RequestStatus.FAILED and long.sink.finals == 1
        assert "did not finish within the drain time" in long.sink.errors[0]
        assert engine.alive and engine.idle
    finally:
        engine.stop()


def test_ssrpt_preempts_a_long_job_for_a_short_one_and_the_tokens_are_unchanged(backend):
    """Batch of 2, both places held by long jobs; a short job arrives: one long job gives its place
    back (its stream stays open), the short one finishes first, and the preempted job, prefilled again
    with its prompt plus what it had generated, ends with exactly the tokens of an uninterrupted run."""
    engine = backend.engine(policy="ssrpt", max_batch_size=2)
    longs = [Request(f"long{i}", engine.encode_prompt(p), max_tokens=40, sink=ListSink(), ignore_eos=True,
                     predicted_length=200) for i, p in enumerate(PROMPTS[:2])]
    for r in longs:
        engine.add_request(r)
    for _ in range(6):
        engine.step()
    short = Request("short", engine.encode_prompt(PROMPTS[3]), max_tokens=4, sink=ListSink(), ignore_eos=True,
                    predicted_length=2)
    engine.add_request(short)
    finished = []
    while not engine.idle:
        engine.step()
        finished += [r.request_id for r in [*longs, short] if r.is_done and r.request_id not in finished]
    assert sum(r.preemptions for r in longs) == 1
    assert finished[0] == "short"
    for r in [*longs, short]:
        want = backend.reference(r.prompt_ids, r.max_tokens)
        assert r.output_ids == want, (r.request_id, r.preemptions, str(r.output_ids), str(want))
        assert r.status is RequestStatus.FINISHED and r.sink.finals == 1 and not r.sink.errors
        assert r.sink.text == backend.tokenizer.decode(r.output_ids, skip_special_tokens=True)


@pytest.mark.parametrize("park_slots", [0, 1])
def test_a_preempted_job_resumes_from_its_parked_cache_or_is_prefilled_again(tiny_model, tokenizer, park_slots):
    """torch runner: with a park slot free the preempted job's KV is kept and it resumes with no
    prefill; with none it is prefilled again. Either way its tokens equal an uninterrupted run's."""
    backend = Backend("torch", tiny_model, tokenizer)
    engine = backend.engine(policy="ssrpt", max_batch_size=1, park_slots=park_slots)
    runner, prefilled = engine.runner, []
    prefill = runner.prefill
    runner.prefill = lambda slots, prompts: (prefilled.append(sum(map(len, prompts))), prefill(slots, prompts))[1]
    long = Request("long", engine.encode_prompt(PROMPTS[1]), max_tokens=30, sink=ListSink(), ignore_eos=True,
                   predicted_length=200)
    engine.add_request(long)
    for _ in range(5):
        engine.step()
    short = Request("short", engine.encode_prompt("hi"), max_tokens=3, sink=ListSink(), ignore_eos=True,
                    predicted_length=2)
    engine.add_request(short)
    engine.run_until_idle()
    assert long.preemptions == 1 and short.finish_time < long.finish_time
    for r in (long, short):
        assert r.output_ids == backend.reference(r.prompt_ids, r.max_tokens) and r.sink.finals == 1
    # the long prompt, the short one, and (without a park slot) the long one's prompt + 6 tokens again
    assert len(prefilled) == (2 if park_slots else 3)
    assert runner.parked == {} and runner.slots == []


def running_long_job(tiny_model, tokenizer, predicted: int, **settings):
    """An ssrpt engine of one batch place, a long job (30 tokens) running in it for one step."""
    engine = Backend("torch", tiny_model, tokenizer).engine(policy="ssrpt", max_batch_size=1, **settings)
    long = Request("long", engine.encode_prompt("a story"), max_tokens=30, sink=ListSink(), ignore_eos=True,
                   predicted_length=predicted)
    engine.add_request(long)
    engine.step()
    return engine, long


def test_a_parked_job_that_ends_while_waiting_frees_its_park_slot(tiny_model, tokenizer):
    engine, long = running_long_job(tiny_model, tokenizer, 200, park_slots=1)
    engine.step()
    engine.add_request(Request("s", engine.encode_prompt("hi"), max_tokens=20, sink=ListSink(), ignore_eos=True,
                               predicted_length=1))
    engine.step()
    assert long.preemptions == 1 and list(engine.runner.parked) == [long.seq]
    long.sink.cancelled = True
    engine._next_waiting_scan = engine._next_cancel_scan = 0.0  # the next scan checks cancellations
    engine.step()
    assert long.status is RequestStatus.ABORTED and engine.runner.parked == {}


def test_ssrpt_does_not_preempt_past_the_bounds(tiny_model, tokenizer):
    engine, long = running_long_job(tiny_model, tokenizer, 100, max_preemptions=1)
    for i in range(3):  # three short arrivals, one after another: only the first may take its place
        engine.add_request(Request(f"s{i}", engine.encode_prompt("hi"), max_tokens=2, sink=ListSink(),
                                   ignore_eos=True, predicted_length=1))
        engine.step()
        engine.step()
    engine.run_until_idle()
    assert long.preemptions == 1 and long.status is RequestStatus.FINISHED
    (done, expected), = long.preempted_at  # the estimate the preemption acted on, kept for the error metric
    assert 1 <= done < 30 and expected == 30 - done  # predicted 100 long: the estimate is capped by max_tokens


def test_queued_work_is_predicted_tokens_waiting_plus_predicted_remainders(tiny_model, tokenizer):
    engine = Backend("torch", tiny_model, tokenizer).engine(max_batch_size=1)
    a = Request("a", engine.encode_prompt("hi"), max_tokens=10, sink=ListSink(), ignore_eos=True, predicted_length=30)
    b = Request("b", engine.encode_prompt("yo"), max_tokens=50, sink=ListSink(), ignore_eos=True, predicted_length=20)
    c = Request("c", engine.encode_prompt("ok"), max_tokens=200, sink=ListSink(), ignore_eos=True)
    for r in (a, b, c):
        engine.add_request(r)
    engine.step()  # one admitted (one slot), one token generated
    running = engine.scheduler.running[0]
    assert engine.queued_work() == 10 + 20 + 200 - len(running.output_ids)  # capped by max_tokens (unknown: 256)


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_token_and_a_seed_repeats_a_draw(backend):
    """Sampling at temperature 1: top_k=1, or a nucleus so small it holds only the most likely
    token, gives exactly the greedy tokens; the same seed gives the same draw whatever the request
    is batched with, and another seed (almost surely) another."""
    engine = backend.engine()
    prompt = engine.encode_prompt(PROMPTS[4])

    def run(*samplings):
        reqs = [Request(f"r{i}", list(prompt), max_tokens=12, sink=ListSink(), ignore_eos=True, sampling=s)
                for i, s in enumerate(samplings)]
        for r in reqs:
            engine.add_request(r)
        engine.run_until_idle()
        assert all(r.status is RequestStatus.FINISHED for r in reqs)
        return [r.output_ids for r in reqs]

    greedy = backend.reference(prompt, 12)
    top_k, top_p = run(Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6))
    assert top_k == greedy and top_p == greedy
    alone, = run(Sampling(temperature=1.0, seed=7))
    batched = run(Sampling(temperature=1.0, seed=7), Sampling(temperature=1.0, seed=8), Sampling(temperature=1.0))
    assert batched[0] == alone
    assert batched[1] != alone


def test_sampling_values_are_checked_once_and_name_their_field(tiny_model, tokenizer):
    engine = Backend("torch", tiny_model, tokenizer).engine()
    for bad, field in ((Sampling(top_p=0.0), "top_p"), (Sampling(top_p=1.5), "top_p"), (Sampling(top_k=-1), "top_k"),
                       (Sampling(seed=-3), "seed"), (Sampling(temperature=float("nan")), "temperature")):
        with pytest.raises(RequestError) as err:
            engine.submit(LLMInputs(text="hi", sampling=bad), ListSink())
        assert err.value.field == field and str(err.value).startswith(f"{field}: ")
