"""`ssjf bench`: SSJF against FCFS and oracle SJF on the same arrivals, through the real server.

For each batching mode and arrival rate, every policy gets a fresh tritonserver and the
same replay: the same prompts, sent open-loop at the same arrival times over one gRPC
stream. `--repeats K` runs K such rounds (new arrival times each), interleaving the
policies (each round starts with the next one, so a steady slowdown does not always hit the
same policy), and reports each round's ratio to FCFS as well as the means, and each run's
length against FCFS's on the same jobs: far from 1.00x, the machine's speed drifted. Trace replay
(default): each request's `max_tokens` = length-scale x its recorded response's token count
(the served model's tokenizer), with `ignore_eos`, so the model does real work of the
recorded length; the proxy (`recorded` artifact) predicts that length from
the prompt, and oracle SJF knows it (SSJF's cap by max_tokens is off here, since max_tokens
carries the true length). Natural workload: generation stops at EOS (`smollm2`
artifact; the oracle then has no true length and falls back to the prediction).

Metrics (client-side, per request): JCT = final response - arrival; TTFT = first token -
arrival; normalized latency = JCT / output tokens. Throughput = completed requests (and
output tokens) per second from the first arrival to the last completion. The paper's
"throughput" (jobs finished by the time 25% of jobs are done, over that time) is reported
separately as `paper_throughput_25pct_rps`. Utilization: the fraction of the run with at
least one request in the system, and the time-averaged number in the system. Capacity under
an SLO (a load sweep, `--rates`): per policy, the highest swept arrival rate up to which p90
normalized latency stays within `--slo-norm-latency` (s/token), and that rate interpolated
linearly between the last swept rate that meets it and the first that does not.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from ssjf.config import RefreshConfig, help_of
from ssjf_client.client import build_inputs, metric_total, scrape_metrics

from .flags import GUARD, PREEMPT, config_args


TEMPLATE_TOKENS = 32  # what the chat template adds to a prompt, in tokens


@dataclass
class Job:
    index: int
    prompt: str
    max_tokens: int | None
    arrival: float  # seconds from the start of the replay
    sent: float | None = None
    first: float | None = None
    done: float | None = None
    error: str | None = None
    chunks: int = 0
    finished: threading.Event = field(default_factory=threading.Event)


# ---- workloads and arrivals ---------------------------------------------------------------
def load_workload(data: str, n: int, seed: int, length_scale: float, natural: bool, max_prompt_tokens: int,
                  max_seq_len: int, split: str = "all", artifact: str = "recorded",
                  natural_max_tokens: int | None = None) -> list[tuple[str, int | None, int]]:
    """(prompt, max_tokens, recorded length) for n rows sampled from data. In natural mode max_tokens
    is natural_max_tokens (None: the server's default cap) and generation stops at EOS. split="test"
    keeps only prompts in the served artifact's held-out split (as its metadata records it), so
    the predictions the server makes are on prompts that artifact never saw."""
    from .data import count_tokens, load_rows, parse_data_spec, response_lengths
    from .split import held_out
    from ssjf.proxy import read_meta

    path, models = parse_data_spec(data)
    rows = [r for r in load_rows(path, models) if r.response or r.length]
    if split == "test":
        meta = read_meta(artifact)
        rows = [r for r in rows if held_out(r, meta)]
    lengths = response_lengths(rows)
    prompt_tokens_of = count_tokens([r.prompt for r in rows])
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(rows)):
        r, length = rows[i], lengths[i]
        prompt_tokens = prompt_tokens_of[i] + TEMPLATE_TOKENS
        max_tokens = max(1, round(length * length_scale))
        if prompt_tokens > max_prompt_tokens or prompt_tokens + max_tokens > max_seq_len:
            continue
        out.append((r.prompt, natural_max_tokens if natural else max_tokens, length))
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} usable rows in {data}")
    return out


def arrival_times(kind: str, n: int, rate: float, seed: int, cv: float = 2.0, trace: str | None = None,
                  trace_offset: int = 0) -> np.ndarray:
    """Arrival times (seconds from 0) with mean rate `rate`."""
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    elif kind == "gamma":
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
    elif kind == "azure":
        from .data import load_arrival_times

        stamps = np.array(load_arrival_times(trace))[trace_offset : trace_offset + n]
        if len(stamps) < n:
            raise SystemExit(f"the trace has fewer than {n} arrivals after offset {trace_offset}")
        gaps = np.diff(stamps)
        gaps = gaps * (1.0 / rate) / gaps.mean()  # time-scaled to the asked mean rate, burstiness kept
    else:
        raise ValueError(f"unknown arrivals {kind!r}")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def round_arrivals(args, rate: float, r: int) -> np.ndarray:
    """Round r's arrival times: a new seed for Poisson and Gamma arrivals, and the trace's next
    window of num_requests arrivals for the Azure trace (rounds on the same window would replay
    the same arrivals)."""
    return arrival_times(args.arrivals, args.num_requests, rate, args.seed + r, args.cv, args.azure_trace,
                         args.trace_offset + r * args.num_requests)


# ---- one replay against one server ------------------------------------------------------------
def replay(grpc_url: str, jobs: list[Job], ignore_eos: bool, timeout: float) -> None:
    by_id = {str(j.index): j for j in jobs}
    client = grpcclient.InferenceServerClient(grpc_url)

    def on_response(result, error):
        now = time.perf_counter()
        if error is not None:
            rid = getattr(error, "request_id", None)
            job = by_id.get(rid() if callable(rid) else rid or "")
            if job is None:  # the error does not say which request: attribute it to the oldest open job
                job = next((j for j in jobs if j.sent is not None and not j.finished.is_set()), None)
            if job is not None:
                job.error, job.done = str(error), now
                job.finished.set()
            return
        resp = result.get_response()
        job = by_id[resp.id]
        text = result.as_numpy("text_output")
        if text is not None and text.size and text.reshape(-1)[0]:
            job.chunks += 1
            if job.first is None:
                job.first = now
        final = resp.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            job.done = now
            job.finished.set()

    client.start_stream(callback=on_response)
    start = time.perf_counter()
    for job in jobs:
        delay = start + job.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        job.sent = time.perf_counter()
        client.async_stream_infer("ssjf", build_inputs(job.prompt, job.max_tokens, ignore_eos or None),
                                  request_id=str(job.index), enable_empty_final_response=True)
    wait_for_jobs(jobs, timeout)
    client.stop_stream()
    client.close()
    relative_times(jobs, start)


def wait_for_jobs(jobs: list[Job], timeout: float) -> None:
    """Wait up to timeout (in all) for every job's final response; a job without one fails."""
    deadline = time.perf_counter() + timeout
    for job in jobs:
        if not job.finished.wait(max(0.0, deadline - time.perf_counter())):
            job.error = "no final response before the timeout"


def relative_times(jobs: list[Job], start: float) -> None:
    """Each job's clock readings as seconds from the replay's start."""
    for job in jobs:
        for name in ("sent", "first", "done"):
            value = getattr(job, name)
            setattr(job, name, None if value is None else value - start)


def summarize(jobs: list[Job], lengths: list[int]) -> dict:
    ok = [(j, n) for j, n in zip(jobs, lengths) if j.error is None and j.done is not None]
    if not ok:
        return {"completed": 0, "failed": len(jobs)}
    jct = np.array([j.done - j.arrival for j, _ in ok])
    ttft = np.array([(j.first if j.first is not None else j.done) - j.arrival for j, _ in ok])
    tokens = np.array([n for _, n in ok], dtype=float)
    first_arrival = min(j.arrival for j in jobs)
    end = max(j.done for j, _ in ok)
    done_sorted = np.sort([j.done for j, _ in ok])
    k = max(1, int(0.25 * len(jobs)))
    # utilization: in the system = [arrival, done]
    events = sorted([(j.arrival, 1) for j, _ in ok] + [(j.done, -1) for j, _ in ok])
    busy, area, level, last = 0.0, 0.0, 0, first_arrival
    for t, d in events:
        if level > 0:
            busy += t - last
        area += level * (t - last)
        level, last = level + d, t
    span = end - first_arrival
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return {
        "completed": len(ok), "failed": len(jobs) - len(ok),
        "mean_jct_s": float(jct.mean()), "p50_jct_s": pct(jct, 50), "p90_jct_s": pct(jct, 90),
        "p99_jct_s": pct(jct, 99), "max_jct_s": float(jct.max()),
        "mean_ttft_s": float(ttft.mean()), "p50_ttft_s": pct(ttft, 50), "p99_ttft_s": pct(ttft, 99),
        "mean_norm_latency_s_per_tok": float((jct / tokens).mean()),
        "p90_norm_latency_s_per_tok": pct(jct / tokens, 90),
        "throughput_rps": len(ok) / span, "throughput_tok_s": float(tokens.sum()) / span,
        "paper_throughput_25pct_rps": k / (done_sorted[k - 1] - first_arrival) if len(done_sorted) >= k else None,
        "busy_fraction": busy / span, "mean_in_system": area / span, "duration_s": span,
        "window_mean_jct_s": window_means(jobs, ok),
    }


def window_means(jobs: list[Job], ok, windows: int = 4) -> list[float | None]:
    """Mean JCT of the jobs arriving in each quarter of the replay (by arrival order): how a policy
    fares as a run goes on (a proxy that learns from the traffic should move toward the oracle)."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].arrival)
    done = {j.index: j.done - j.arrival for j, _ in ok}
    out = []
    for part in np.array_split(np.array(order), windows):
        values = [done[jobs[i].index] for i in part if jobs[i].index in done]
        out.append(float(np.mean(values)) if values else None)
    return out


def fresh_refresh(args) -> dict[str, str]:
    """Every server starts from the shipped proxy: its own empty correction file, so nothing one
    policy's run learned carries into another's."""
    import tempfile

    return {"SSJF_PROXY_REFRESH": "1" if args.proxy_refresh else "0",
            "SSJF_PROXY_REFRESH_PATH": str(Path(tempfile.mkdtemp(prefix="ssjf-refresh-")) / "proxy.npz")}


def run_policy(policy: str, args, jobs_spec, times, lengths, batching: str) -> tuple[dict, list[Job]]:
    from ssjf.server import ServerConfig, TritonServer

    jobs = [Job(i, p, mt, float(t)) for i, ((p, mt, _), t) in enumerate(zip(jobs_spec, times))]
    env = dict(os.environ, SSJF_POLICY=policy, SSJF_BATCHING=batching,
               SSJF_MAX_BATCH_SIZE=str(args.max_batch_size), SSJF_PROXY_ARTIFACT=args.artifact,
               SSJF_STARVATION_S=str(args.starvation_s), SSJF_MAX_PASSES=str(args.max_passes),
               SSJF_MAX_BYPASS_RATIO=str(args.max_bypass_ratio),
               **{f"SSJF_{name.upper()}": str(getattr(args, name)) for name in PREEMPT},
               SSJF_MAX_SEQ_LEN=str(args.max_seq_len),
               # trace replay's max_tokens *is* the true length: SSJF must not read it
               SSJF_CAP_BY_MAX_TOKENS="1" if args.natural else "0", **fresh_refresh(args))
    log = Path(args.out).with_suffix(f".{batching}.{policy}.log") if args.out else None
    served = {}
    if args.url:
        replay(args.url, jobs, not args.natural, args.timeout)
    else:
        with TritonServer(ServerConfig.on_free_ports(), env=env, log_path=log) as server:
            warm = [Job(-1 - i, "Hello!", 4, 0.0) for i in range(2)]
            for w in warm:
                replay(server.grpc_url, [w], True, 60)
            before = server_counters(server.metrics_url)
            replay(server.grpc_url, jobs, not args.natural, args.timeout)
            served = {k: v - before.get(k, 0.0) for k, v in server_counters(server.metrics_url).items()}
    out_lengths = [j.chunks if args.natural else n for j, n in zip(jobs, lengths)]
    metrics = summarize(jobs, out_lengths)
    if served.get("generated_tokens"):
        metrics.update(served, recomputed_share=served["recomputed_tokens"] / served["generated_tokens"])
    return metrics, jobs


def server_counters(metrics_url: str) -> dict[str, float]:
    """The llm's own counts (what a client cannot see): tokens generated, preemptions, and tokens
    prefilled again after a preemption."""
    values = scrape_metrics(metrics_url)
    return {key: metric_total(values, f"ssjf_{key}_total") for key in ("generated_tokens", "preemptions",
                                                                       "recomputed_tokens")}


def combine_rounds(rounds: list[dict], base: str = "fcfs",
                   keys: tuple[str, ...] = ("mean_jct_s", "p99_jct_s", "duration_s")) -> dict:
    """Per policy: the mean of each metric over rounds (completed and failed summed), and each
    round's `keys` as a ratio to that round's `base` (`KEY_vs_BASE`: median, min, max), the
    comparison that survives a machine whose speed drifts between rounds."""
    out = {}
    for policy in rounds[0]:
        ms = [r[policy] for r in rounds if r.get(policy, {}).get("completed")]
        if not ms:
            out[policy] = {"completed": 0, "failed": sum(r[policy].get("failed", 0) for r in rounds)}
            continue
        m = {k: float(np.mean([x[k] for x in ms])) for k, v in ms[0].items()
             if isinstance(v, (int, float)) and all(x.get(k) is not None for x in ms)}
        m["completed"] = sum(r[policy].get("completed", 0) for r in rounds)
        m["failed"] = sum(r[policy].get("failed", 0) for r in rounds)
        m["rounds"] = len(rounds)
        pairs = [(r[policy], r[base]) for r in rounds
                 if base in r and r[policy].get("completed") and r[base].get("completed")]
        for key in keys:
            ratios = [x[key] / f[key] for x, f in pairs if x.get(key) and f.get(key)]
            if ratios:
                m[f"{key}_vs_{base}"] = {"median": float(np.median(ratios)), "min": float(min(ratios)),
                                       "max": float(max(ratios)), "rounds": ratios}
        out[policy] = m
    return out


def slo_capacity(runs: list[dict], slo: float, key: str = "p90_norm_latency_s_per_tok") -> dict:
    """Per batching mode and policy, the highest arrival rate at which `key` stays within `slo`.
    Rates are scanned upwards and the scan stops at the first miss, so a lucky point above a
    miss does not count. `max_rate_rps`: the last swept rate that meets the SLO (None: even the
    lowest misses it); `interpolated_rate_rps`: where `key` crosses the SLO between that rate and
    the next; `bounded`: False when every swept rate meets it (the capacity is at least the top rate).
    With `--repeats`, a rate's value is the mean of its rounds' values (as every metric of a run)."""
    out: dict = {}
    for batching in dict.fromkeys(r["batching"] for r in runs):
        sweep = sorted((r for r in runs if r["batching"] == batching), key=lambda r: r["rate"])
        for policy in sweep[0]["policies"]:
            points = [(r["rate"], r["policies"].get(policy, {}).get(key)) for r in sweep]
            best, interp, bounded = None, None, False
            for i, (rate, value) in enumerate(points):
                if value is None or value > slo:
                    bounded = True
                    if best is not None and value is not None:
                        lo_rate, lo_value = points[i - 1]
                        interp = lo_rate + (slo - lo_value) / (value - lo_value) * (rate - lo_rate)
                    break
                best = interp = rate
            out.setdefault(batching, {})[policy] = {"max_rate_rps": best, "interpolated_rate_rps": interp,
                                                    "bounded": bounded}
    return {"slo_s_per_token": slo, "metric": key, "capacity": out}


def sjf_limit(lengths: list[int]) -> dict:
    """What reordering can buy on these job lengths, as one number. With every job queued at once
    on one server, FCFS (arrival order independent of length) averages (n+1)/2 jobs' work per
    completion, and shortest-first, the best order there, gives 1 - n/(n+1) x Gini(lengths) times
    FCFS's mean JCT: 1.0 for equal lengths, about 0.5 for exponential ones. Finite runs at or past
    saturation land near it (less queueing, or more batch slots, gain less); a long run held just
    below saturation can gain more, by letting the longest jobs' waits grow without bound."""
    x = np.sort(np.asarray(lengths, dtype=float))
    n = len(x)
    if n < 2 or x.sum() <= 0:
        return {"n": n, "cv": 0.0, "gini": 0.0, "full_queue_sjf_vs_fcfs": 1.0}
    gini = float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum()))
    return {"n": n, "cv": float(x.std() / x.mean()), "gini": gini, "full_queue_sjf_vs_fcfs": 1 - n / (n + 1) * gini}


def write_aiperf_input(path: str, spec, times) -> None:
    """The replay as aiperf's single_turn JSONL: text, timestamp (ms, for --fixed-schedule) and
    output_length (max_tokens; omitted in natural mode)."""
    with open(path, "w") as f:
        for (prompt, max_tokens, _), t in zip(spec, times):
            rec = {"text": prompt, "timestamp": round(float(t) * 1000, 3)}
            if max_tokens is not None:
                rec["output_length"] = int(max_tokens)
            f.write(json.dumps(rec) + "\n")


def markdown(report: dict, drift: bool = True) -> str:
    """The report's tables; `drift`: under each, each run's length against FCFS's (real runs only)."""
    cols = ["mean_jct_s", "p50_jct_s", "p99_jct_s", "mean_ttft_s", "p99_ttft_s", "mean_norm_latency_s_per_tok",
            "throughput_rps", "throughput_tok_s", "busy_fraction", "completed", "failed"]
    lines = []
    limit = report["config"].get("sjf_limit")
    if limit:
        lines.append(f"\nJob lengths: CV {limit['cv']:.2f}, Gini {limit['gini']:.2f}. With every job queued at once on one "
                     f"server, shortest-first (true lengths) gives {limit['full_queue_sjf_vs_fcfs']:.2f}x FCFS's mean JCT "
                     "(1.00x: equal lengths, nothing to reorder; about 0.5x: exponential lengths).")
    for run in report["runs"]:
        lines.append(f"\n### batching={run['batching']}, rate={run['rate']} req/s "
                     f"({report['config']['arrivals']} arrivals, {report['config']['num_requests']} requests)\n")
        lines.append("| policy | " + " | ".join(cols) + " | mean JCT vs FCFS | p99 JCT vs FCFS |")
        lines.append("|---" * (len(cols) + 3) + "|")
        for name, m in run["policies"].items():
            cells = [f"{m[c]:.3f}" if isinstance(m.get(c), float) else str(m.get(c)) for c in cols]
            ratios = []
            for key in ("mean_jct_s", "p99_jct_s"):
                vs, fcfs = m.get(f"{key}_vs_fcfs"), run["policies"].get("fcfs", {}).get(key)
                if vs and len(vs["rounds"]) > 1:
                    ratios.append(f"{vs['median']:.2f}x (rounds {vs['min']:.2f}-{vs['max']:.2f}x)")
                else:
                    ratios.append(f"{m[key] / fcfs:.2f}x" if fcfs and m.get(key) else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {' | '.join(ratios)} |")
        base = (run.get("rounds") or [{}])[0].get("fcfs", {}).get("window_mean_jct_s")
        if base and all(base):
            lines.append("\nMean JCT by quarter of the arrivals, as a ratio to FCFS's (first round): "
                         + "; ".join(f"{name} " + ", ".join(f"{w / b:.2f}x" if w else "-" for w, b in zip(m["window_mean_jct_s"], base))
                                     for name, m in run["rounds"][0].items() if name != "fcfs" and m.get("window_mean_jct_s")))
        lengths = {name: m["duration_s_vs_fcfs"]["rounds"] for name, m in run["policies"].items()
                   if drift and name != "fcfs" and m.get("duration_s_vs_fcfs")}
        if lengths:  # same jobs and arrivals: a run longer or shorter than FCFS's had a slower or faster machine
            lines.append("\nRun length vs FCFS's on the same jobs, per round (far from 1.00x: the machine's speed "
                         "drifted, and in overload a few percent of speed moves JCT a lot): "
                         + "; ".join(f"{name} " + ", ".join(f"{x:.2f}x" for x in v) for name, v in lengths.items()))
    slo = report.get("slo")
    if slo and len(report["runs"]) > len(slo["capacity"]):  # a sweep: some mode has more than one rate
        lines.append(f"\n### capacity: highest arrival rate with p90 normalized latency <= {slo['slo_s_per_token']} s/token\n")
        lines.append("| batching | policy | highest swept rate | interpolated | vs FCFS |")
        lines.append("|---|---|---|---|---|")
        for batching, per_policy in slo["capacity"].items():
            fcfs = per_policy.get("fcfs", {})
            base = fcfs.get("interpolated_rate_rps") if fcfs.get("bounded") else None  # no ratio to a lower bound
            for name, c in per_policy.items():
                rate, interp = c["max_rate_rps"], c["interpolated_rate_rps"]
                shown = "below the sweep" if rate is None else f"{rate:g}" + ("" if c["bounded"] else " (or more)")
                ratio = f"{interp / base:.2f}x" if interp and base and c["bounded"] else "-"
                lines.append(f"| {batching} | {name} | {shown} | {'-' if interp is None else f'{interp:.2f}'} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, all_jobs: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for batching in sorted({r["batching"] for r in report["runs"]}):
        runs = [r for r in report["runs"] if r["batching"] == batching]
        fig, ax = plt.subplots(1, 4, figsize=(20, 4))
        last = runs[-1]
        for k, (policy, jobs) in enumerate(all_jobs[(batching, last["rate"])].items()):
            jct = np.sort([j.done - j.arrival for j in jobs if j.error is None and j.done is not None])
            ax[0].plot(jct, np.arange(1, len(jct) + 1) / len(jct), color=f"C{k}", label=policy)
        ax[0].set(title=f"JCT CDF, rate {last['rate']}/s", xlabel="JCT (s)", ylabel="fraction")
        rates = [r["rate"] for r in runs]
        for k, policy in enumerate(last["policies"]):
            per_rate = [r["policies"][policy] for r in runs]
            c = f"C{k}"  # one colour per policy in every panel
            ax[1].plot(rates, [m.get("mean_jct_s") for m in per_rate], "o-", color=c, label=f"{policy} mean")
            ax[1].plot(rates, [m.get("p99_jct_s") for m in per_rate], "x--", color=c, label=f"{policy} p99")
            ax[2].plot(rates, [m.get("mean_ttft_s") for m in per_rate], "o-", color=c, label=policy)
            ax[3].plot(rates, [m.get("p90_norm_latency_s_per_tok") for m in per_rate], "o-", color=c, label=policy)
        slo = report.get("slo", {}).get("slo_s_per_token")
        if slo is not None:
            ax[3].axhline(slo, color="grey", linestyle=":", label=f"SLO {slo} s/token")
        ax[1].set(title="JCT vs arrival rate", xlabel="req/s", ylabel="s")
        ax[2].set(title="mean TTFT vs arrival rate", xlabel="req/s", ylabel="s")
        ax[3].set(title="p90 normalized latency vs arrival rate", xlabel="req/s", ylabel="s/token", yscale="log")
        for a in ax:
            a.legend(fontsize=7)
        fig.suptitle(f"batching = {batching}")
        fig.tight_layout()
        path = out_dir / f"bench_{batching}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    return files


def workload_args(ap: argparse.ArgumentParser, required: bool = True, schedule: bool = True) -> None:
    """The flags `ssjf bench`, `ssjf simulate` and `ssjf versus` share: what is replayed, when, and
    on what server; `schedule`: also the policies, rates and batching modes to run."""
    ap.add_argument("--data", required=required, help="rows with prompt and response (any supported format)")
    ap.add_argument("--num-requests", type=int, default=100)
    if schedule:
        ap.add_argument("--policies", default="fcfs,ssjf,sjf_oracle")
        ap.add_argument("--rate", type=float, default=2.0, help="mean arrival rate, requests/s")
        ap.add_argument("--rates", help="comma list of rates: a load sweep (overrides --rate)")
        ap.add_argument("--batching", default="continuous", help="comma list of none,dynamic,continuous")
    ap.add_argument("--arrivals", choices=["poisson", "gamma", "azure"], default="poisson")
    ap.add_argument("--cv", type=float, default=2.0, help="coefficient of variation for gamma arrivals")
    ap.add_argument("--azure-trace", help="Azure LLM inference trace CSV (TIMESTAMP column)")
    ap.add_argument("--trace-offset", type=int, default=0, help="first trace row of round 1 (round r starts "
                                                                 "(r - 1) x --num-requests rows later)")
    ap.add_argument("--length-scale", type=float, default=1.0, help="max_tokens = scale x recorded length")
    ap.add_argument("--natural", action="store_true", help="stop at EOS instead of replaying recorded lengths")
    ap.add_argument("--natural-max-tokens", type=int,
                    help="natural mode: the max_tokens cap sent with each request (default: the server's, 512)")
    ap.add_argument("--artifact", help="proxy artifact (default: recorded for trace replay, smollm2 for natural)")
    # batch 8: a 2-core CPU queues at a load it can finish in minutes
    config_args(ap, ["max_batch_size", "max_seq_len"], max_batch_size=8)
    ap.add_argument("--proxy-refresh", type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                    default=RefreshConfig.enabled, help=help_of(RefreshConfig, "enabled"))
    ap.add_argument("--max-prompt-tokens", type=int, default=768, help="longer prompts are not sampled")
    ap.add_argument("--split", choices=["all", "test"], default="all",
                    help="test: only prompts in train-proxy's held-out split (for ../shared/data, the prompts the "
                         "shipped artifacts never saw); all: every row")
    ap.add_argument("--seed", type=int, default=0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap)
    config_args(ap, GUARD + PREEMPT)
    ap.add_argument("--slo-norm-latency", type=float, default=0.5,
                    help="SLO on p90 normalized latency (s/token) for a sweep's capacity: the highest rate that meets "
                         "it, per policy (0.5 suits this 2-core CPU; on a GPU a tenth of that)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds per rate: each round runs every policy once on new arrival times (seed + round; "
                         "with --arrivals azure, the trace's next window of --num-requests arrivals); "
                         "the report gives each metric's mean over rounds and each round's ratio to FCFS")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for stragglers after the last send")
    ap.add_argument("--url", help="use a running server (host:gRPC port) instead of starting one per policy")
    ap.add_argument("--plots", help="folder for PNG plots (JCT CDF; JCT, TTFT and p90 normalized latency against rate)")
    ap.add_argument("--aiperf-input", help="also write this replay (first rate) as an aiperf single_turn JSONL: the "
                                           "same prompts, arrival times and max_tokens, for an outside cross-check")
    ap.add_argument("--out", required=True, help="REPORT.json (a Markdown table is written beside it)")
    args = ap.parse_args(argv)
    args.artifact = args.artifact or ("smollm2" if args.natural else "recorded")

    spec = load_workload(args.data, args.num_requests, args.seed, args.length_scale, args.natural,
                         args.max_prompt_tokens, args.max_seq_len, args.split, args.artifact, args.natural_max_tokens)
    lengths = [mt if mt is not None else n for _, mt, n in spec]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    policies = [p.strip() for p in args.policies.split(",")]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plots")}
    config["mean_max_tokens"] = float(np.mean(lengths))
    if not args.natural:  # trace replay: the true lengths are known before the run
        config["sjf_limit"] = sjf_limit(lengths)
    report = {"config": config, "metrics": __doc__.split("Metrics", 1)[1].strip(), "runs": []}
    all_jobs = {}
    if args.aiperf_input:
        aiperf_spec = [(p, None if args.natural else mt, n) for p, mt, n in spec]  # natural: no output_length
        write_aiperf_input(args.aiperf_input, aiperf_spec, round_arrivals(args, rates[0], 0))
    for batching in [b.strip() for b in args.batching.split(",")]:
        for rate in rates:
            run = {"batching": batching, "rate": rate, "policies": {}, "rounds": [], "orders": []}
            all_jobs[(batching, rate)] = {}
            for r in range(args.repeats):  # rounds interleave the policies, so a drift in speed hits all of them
                times = round_arrivals(args, rate, r)
                round_ = {}
                # each round starts with the next policy, so a steady slowdown does not always hit the same one
                order = policies[r % len(policies):] + policies[: r % len(policies)]
                run["orders"].append(order)
                for policy in order:
                    t0 = time.time()
                    metrics, jobs = run_policy(policy, args, spec, times, lengths, batching)
                    round_[policy] = metrics
                    all_jobs[(batching, rate)].setdefault(policy, []).extend(jobs)
                    print(f"[{batching} rate={rate}{f' round {r + 1}' if args.repeats > 1 else ''}] {policy:10s} "
                          f"mean JCT {metrics.get('mean_jct_s', float('nan')):7.2f}s "
                          f"p99 {metrics.get('p99_jct_s', float('nan')):7.2f}s TTFT {metrics.get('mean_ttft_s', float('nan')):6.2f}s "
                          f"busy {metrics.get('busy_fraction', 0):.2f} failed {metrics['failed']} ({time.time() - t0:.0f}s)",
                          flush=True)
                run["rounds"].append({p: round_[p] for p in policies})
                run["policies"] = combine_rounds(run["rounds"])
                with open(args.out, "w") as f:  # written after every round: a long sweep keeps what it has
                    so_far = report["runs"] + [run]
                    json.dump({**report, "runs": so_far, "policies": so_far[0]["policies"],
                               "slo": slo_capacity(so_far, args.slo_norm_latency)}, f, indent=2)
            report["runs"].append(run)
    report["policies"] = report["runs"][0]["policies"]  # the contract's shape, for the first run
    report["slo"] = slo_capacity(report["runs"], args.slo_norm_latency)
    if args.plots:
        report["plots"] = plot(report, all_jobs, Path(args.plots))
    write_report(args.out, report, markdown(report))
    return report


def write_report(out: str, report: dict, md: str) -> None:
    """REPORT.json, and its Markdown beside it (also printed)."""
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    Path(out).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
