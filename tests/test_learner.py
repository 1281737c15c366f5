"""Learning from served traffic: the rolling rank window, and a head that refreshes itself from
finished requests without ever swapping in a worse one."""

import json
import threading

import numpy as np
import pytest

from ssjf.metrics import RankWindow, kendall_tau
from ssjf.proxy.learner import OnlineHead


class LinearHead:
    def __init__(self, w):
        self.w = np.asarray(w, dtype=np.float32)

    def predict_log(self, x):
        return np.atleast_2d(x) @ self.w


def rows(n, seed, w_true):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(w_true))).astype(np.float32)
    y = np.expm1(np.clip(x @ np.asarray(w_true) + 4.0 + rng.normal(0, 0.2, n), 0, 8)).astype(int) + 1
    return x, y


def test_the_rank_window_keeps_the_last_n_and_skips_missing_predictions():
    w = RankWindow(size=3)
    for p, t in [(1, 1), (None, 5), (2, 2), (3, 3), (0, 9), (4, 4)]:
        w.add(p, t)
    assert list(w.pairs) == [(2, 2), (3, 3), (4, 4)]
    assert w.kendall_tau() == pytest.approx(1.0) and w.mae_tokens() == 0.0
    w.add(1, 100)
    assert w.kendall_tau() < 1.0 and w.mae_tokens() == pytest.approx(99 / 3)
    assert RankWindow().kendall_tau() == 0.0 and RankWindow().mae_tokens() == 0.0


def test_a_head_trained_elsewhere_learns_the_traffic_it_serves():
    # the shipped head ranks by feature 0; on this traffic length follows feature 1
    head = OnlineHead(LinearHead([1.0, 0.0, 0.0]), window=800, min_rows=64)
    x, y = rows(1200, 0, [0.1, 1.0, 0.0])
    assert head.refit() is False  # too few rows yet: the shipped head serves
    before = kendall_tau(head.predict_log(x[800:]), y[800:])
    for xi, yi in zip(x[:800], y[:800]):
        head.observe(xi, int(yi))
    assert head.refit() is True and head.version == 1
    after = kendall_tau(head.predict_log(x[800:]), y[800:])
    assert before < 0.2 and after > 0.7


def test_a_correction_that_does_not_beat_the_shipped_head_is_not_used():
    head = OnlineHead(LinearHead([1.0, 0.0, 0.0]), window=400, min_rows=32)
    x, y = rows(400, 1, [0.1, 1.0, 0.0])  # the shipped head ranks by the wrong feature: a correction helps
    for xi, yi in zip(x, y):
        head.observe(xi, int(yi))
    assert head.refit() is True and head.fit is not None
    shipped = head.base.predict_log(x)
    assert not np.allclose(head.predict_log(x), shipped)
    rng = np.random.default_rng(2)
    for xi in x:  # then the window fills with noise: lengths unrelated to the prompts
        head.observe(xi, int(rng.integers(1, 2000)))
    assert head.refit() is True and head.rejected >= 1  # the head in use changed: back to the shipped one
    assert np.allclose(head.predict_log(x), shipped)
    assert head.refit() is False  # and stays so


def test_a_correction_that_only_ties_is_not_taken():
    head = OnlineHead(LinearHead([0.0, 1.0, 0.0]), window=500, min_rows=32)
    x, y = rows(400, 5, [0.0, 1.0, 0.0])  # the shipped head is already right: nothing to gain
    for xi, yi in zip(x, y):
        head.observe(xi, int(yi))
    assert head.refit() is False and head.fit is None and head.rejected == 1


def test_memory_is_bounded_and_predicting_never_waits_for_a_refit():
    head = OnlineHead(LinearHead([1.0, 0.0, 0.0]), window=100, min_rows=16)
    x, y = rows(1000, 3, [0.0, 1.0, 0.0])
    for xi, yi in zip(x, y):
        head.observe(xi, int(yi))
    assert len(head.rows) == 100
    with head._refitting:  # a refit in progress holds its own lock, never the predictor's path
        t = threading.Thread(target=head.predict_log, args=(x[:4],))
        t.start()
        t.join(2)
        assert not t.is_alive()


def test_eval_proxy_online_reports_second_half_and_frozen_tau(tmp_path):
    from ssjf_tools.eval_proxy import main as eval_main

    rng = np.random.default_rng(0)
    lines = []
    for i in range(240):  # a source whose lengths the shipped artifact has backwards: its "essays" are one word
        essay = i % 2 == 0
        n = int(rng.integers(3, 12)) if essay else int(rng.integers(150, 200))
        lines.append({"prompt": f"Write {'an essay' if essay else 'one line'} about item {i}.", "response": "word " * n})
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines))
    report = eval_main(["--data", str(data), "--artifact", "recorded", "--online", "--refresh-every", "40",
                        "--out", str(tmp_path / "r.json")])
    for key in ("n", "kendall_tau", "frozen_kendall_tau", "spearman", "mae_tokens", "bucket_accuracy",
                "p50_latency_ms", "windows", "refits"):
        assert key in report, key
    assert report["n"] == 120  # the second half
    assert report["frozen_kendall_tau"] < 0 < report["kendall_tau"]  # the learner turned the ranking round
    assert len(report["windows"]) == 8 and report["refits"]["every_rows"] == 40


def test_the_correction_travels_through_its_file_and_a_refresher_writes_it_only_when_swapped(tmp_path):
    from ssjf.proxy.learner import CorrectionFile, Refresher

    x, y = rows(600, 4, [0.1, 1.0, 0.0])
    base = x[:, 0]  # the proxy's own (poor) log prediction, sent as the last column
    served = np.hstack([x, base[:, None]]).astype(np.float32)
    seen = []
    refresher = Refresher(tmp_path / "proxy.npz", window=600, min_rows=32, on_refit=lambda s, v: seen.append((s, v)))
    assert refresher.refresh() is False and not (tmp_path / "proxy.npz").exists()  # nothing learned yet
    for xi, yi in zip(served[:400], y[:400]):
        refresher.observe(xi, int(yi))
    refresher.observe(np.zeros(1, np.float32), 5)  # the proxy had no features: ignored
    assert refresher.refresh() is True and seen == [(True, 1)]
    proxy_side = CorrectionFile(tmp_path / "proxy.npz", poll_s=0.0)
    assert proxy_side.poll(dim=served.shape[1] + 1) is False  # another artifact's width: ignored
    assert proxy_side.poll(dim=served.shape[1]) is True and proxy_side.version == 1
    assert proxy_side.poll(dim=served.shape[1]) is False  # unchanged: not reloaded
    corrected = proxy_side.apply(served[400:], base[400:])
    assert kendall_tau(corrected, y[400:]) > kendall_tau(base[400:], y[400:]) + 0.3
    # a restarted llm starts from the saved correction, not from the bare head
    again = Refresher(tmp_path / "proxy.npz", window=600, min_rows=10_000)
    again.observe(served[0], int(y[0]))
    again.refresh()
    assert again.head.version == 1 and again.head.fit is not None


def test_the_served_proxy_sends_its_features_and_applies_a_correction(tmp_path):
    from ssjf.proxy.learner import CorrectionFile
    from ssjf.proxy import LengthPredictor

    predictor = LengthPredictor("recorded")
    lengths, served = predictor.predict_served(["Say hi.", "Write a long essay about rivers."])
    assert served.shape[0] == 2 and served.dtype == np.float32
    assert np.allclose(served[:, -1], predictor.head.predict_log(served[:, :-1]), atol=1e-5)
    assert list(lengths) == list(predictor.predict(["Say hi.", "Write a long essay about rivers."]))
    dim = served.shape[1]
    fit = (np.zeros(dim, np.float32), np.ones(dim, np.float32), np.zeros(dim, np.float32), float(np.log(2.0)))
    CorrectionFile(tmp_path / "c.npz").write(fit, 3)
    correction = CorrectionFile(tmp_path / "c.npz", poll_s=0.0)
    assert correction.poll(dim)
    doubled, _ = predictor.predict_served(["Say hi.", "Write a long essay about rivers."], correction)
    assert np.allclose(doubled, predictor.to_lengths(np.log(2.0) + served[:, -1]))  # + log 2: about twice
