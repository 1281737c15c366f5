"""`ssjf simulate`: the bench's replay through the serving engine itself on a virtual clock.

The same workload, arrivals and flags as `ssjf bench`, with no server and no model: the code
that runs is the served code (`ssjf.engine.Engine.step`, its scheduler, policy, starvation guard,
admission and stop rules), with a cost-model runner in place of the model. Predictions are the
artifact's (as the served proxy makes them). The runner prefills the requests a step admits
(prefill_s + prefill_token_s x padded prompt tokens, one token each), then decodes every running
request (decode_s + decode_seq_s x running, one token each). The default costs are one CPU's
engine alone; a served run differs (Triton's sends, the proxy on the same cores, another
machine): `--calibrate-fcfs-mean S` scales every cost so that FCFS's
mean JCT is S seconds, the mean a real `ssjf bench` FCFS run measured on the same load.
`--from-bench REPORT.json` does both at once: that report's workload, arrivals, server and
guard settings, calibrated on its first run's FCFS mean (flags given too override the report's).

Seconds instead of half an hour per setting, so a load, a batch cap or a guard can be chosen
before the real run. `--max-passes`, `--max-bypass-ratio` and `--starvation-s` take comma
lists: each combination is a row (`ssjf K32 R2 S60`). A round is a seed: new arrival times
(for the Azure trace, its next window).
The report has `ssjf bench`'s shape, with each round's mean and p99 JCT as a ratio to FCFS.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ssjf.engine import Engine
from ssjf.request import NullSink, Request
from ssjf.runners.base import StepOutput

from .bench import (TEMPLATE_TOKENS, Job, combine_rounds, load_workload, markdown, round_arrivals, sjf_limit,
                    summarize, workload_args)
from .flags import GUARD, PREEMPT, config_args


@dataclass
class StepCost:
    """Seconds per engine step. The defaults were fitted to SmolLM2-135M on a 2-core CPU, the engine
    alone (ModelRunner.prefill / decode at batch 1-8, 100-400 cached tokens); calibrate for yours."""

    decode_s: float = 0.035
    decode_seq_s: float = 0.0011
    prefill_s: float = 0.03
    prefill_token_s: float = 0.0003

    def scaled(self, factor: float) -> "StepCost":
        return StepCost(*(factor * v for v in vars(self).values()))

    def prefill(self, width: int, count: int) -> float:
        return self.prefill_s + self.prefill_token_s * width * count

    def decode(self, running: int) -> float:
        return self.decode_s + self.decode_seq_s * running


class VirtualClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class _NoText:
    """A tokenizer that decodes nothing: the simulation needs timings, not text."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


class CostModelRunner:
    """A Runner (ssjf.runners.base) whose forward pass is a cost model: admit() and step() move the
    virtual clock by what that prefill or decode step costs and give each request one token. A
    job's last token is EOS, unless it ignores EOS, when its max_tokens ends it."""

    EOS = 1

    def __init__(self, clock: VirtualClock, cost: StepCost, lengths: dict[str, int], max_seq_len: int,
                 kv_parking: bool = False):
        self.clock, self.cost, self.lengths = clock, cost, lengths
        self.kv_parking = kv_parking  # a preempted request keeps its KV: coming back costs no prefill
        self.parked: set[int] = set()
        self.tokenizer = _NoText()
        self.max_seq_len = max_seq_len
        self.eos_token_ids = {self.EOS}

    def _one_token_each(self, reqs: list[Request]) -> StepOutput:
        last = [not r.ignore_eos and len(r.output_ids) + 1 >= self.lengths[r.request_id] for r in reqs]
        return StepOutput(tokens=[(r, [self.EOS if end else 0]) for r, end in zip(reqs, last)])

    def admit(self, reqs: list[Request]) -> StepOutput:
        """A preempted job whose cache was kept (kv_parking) resumes free, its next token from step()."""
        resumed = [r for r in reqs if r.seq in self.parked]
        self.parked -= {r.seq for r in resumed}
        fresh = [r for r in reqs if r not in resumed]
        if not fresh:
            return StepOutput(resumed=resumed)
        self.clock.now += self.cost.prefill(max(r.context_len for r in fresh), len(fresh))
        out = self._one_token_each(fresh)
        out.resumed = resumed
        return out

    def step(self, reqs: list[Request]) -> StepOutput:
        self.clock.now += self.cost.decode(len(reqs))
        return self._one_token_each(reqs)

    def preempt(self, req: Request) -> None:
        if self.kv_parking:
            self.parked.add(req.seq)

    def release(self, req: Request) -> None:
        self.parked.discard(req.seq)


def simulate(config, prompt_tokens: list[int], lengths: list[int], predictions: list[int | None],
             times: np.ndarray, cost: StepCost, ignore_eos: bool = True, kv_parking: bool = False) -> list[Job]:
    """Replay jobs (arriving at `times`, sorted) through the serving engine itself (`Engine.step`:
    its scheduler, policy, guard, admission and stop rules) built from `config` (an EngineConfig),
    on a virtual clock, with CostModelRunner in place of the model. lengths: the tokens each job
    generates. With ignore_eos the length is its max_tokens, so oracle SJF knows it; otherwise it
    stops at EOS and the oracle falls back to the prediction. Returns one Job per request with its
    first-token and done times."""
    config = dataclasses.replace(config, request_timeout_s=0.0, max_waiting=max(config.max_waiting, len(lengths)))
    clock = VirtualClock(0.0)
    runner = CostModelRunner(clock, cost, {str(i): n for i, n in enumerate(lengths)}, config.max_seq_len, kv_parking)
    engine = Engine(config, runner=runner, clock=clock)
    sink = NullSink()
    reqs = [Request(str(i), [0] * p, max_tokens=n if ignore_eos else None, sink=sink, ignore_eos=ignore_eos,
                    predicted_length=pred, arrival_time=float(t))
            for i, (p, n, pred, t) in enumerate(zip(prompt_tokens, lengths, predictions, times))]
    nxt = 0
    while nxt < len(reqs) or not engine.idle:
        while nxt < len(reqs) and reqs[nxt].arrival_time <= clock.now:
            engine.add_request(reqs[nxt])
            nxt += 1
        if engine.idle:
            clock.now = reqs[nxt].arrival_time
            continue
        engine.step()
    return [Job(i, "", n, float(t), first=r.first_token_time, done=r.finish_time)
            for i, (r, n, t) in enumerate(zip(reqs, lengths, times))]


def calibrate(target_mean_s: float, run_fcfs, lo: float = 0.02, hi: float = 50.0) -> float:
    """The factor on every step cost at which run_fcfs(factor) (FCFS's mean JCT) is target_mean_s.
    The mean grows with the factor, so bisect (in log space)."""
    if not run_fcfs(lo) < target_mean_s < run_fcfs(hi):
        raise SystemExit(f"no cost factor in [{lo}, {hi}] gives an FCFS mean JCT of {target_mean_s} s")
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if run_fcfs(mid) < target_mean_s else (lo, mid)
    return (lo * hi) ** 0.5


def guard_label(passes: float, ratio: float, starve: float, margin: float | None = None,
                fraction: float | None = None, times: float | None = None) -> str:
    """K: max_passes, R: max_bypass_ratio, S: starvation_s; for ssrpt M: preempt_margin,
    F: preempt_max_fraction, P: max_preemptions."""
    label = f"K{passes:g} R{ratio:g} S{starve:g}"
    return label if margin is None else f"{label} M{margin:g} F{fraction:g} P{times:g}"


def floats(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",")]


def bench_defaults(path: str, flags: set[str]) -> dict:
    """A bench report's settings for the flags this command shares with it (the workload, arrivals,
    server and guard), and its first run's FCFS mean JCT as the calibration target. Its --repeats
    is the real run's, not carried."""
    with open(path) as f:
        report = json.load(f)
    out = {k: v for k, v in report["config"].items() if k in flags and k != "repeats"}
    for key in ("starvation_s", "max_bypass_ratio", "max_passes"):  # comma lists here
        if key in out:
            out[key] = f"{out[key]:g}" if isinstance(out[key], (int, float)) else str(out[key])
    fcfs = report["runs"][0]["policies"].get("fcfs", {}).get("mean_jct_s")
    if fcfs:
        out["calibrate_fcfs_mean"] = fcfs
    return out


def main(argv=None) -> dict:
    from ssjf.config import PREEMPTIVE, EngineConfig
    from .data import count_tokens
    from ssjf.proxy import LengthPredictor

    from .embeddings import cached_encode

    ap = argparse.ArgumentParser(prog="ssjf simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap, required=False)
    ap.add_argument("--from-bench", metavar="REPORT.json",
                    help="a real `ssjf bench` report: its workload, arrivals, server and guard settings become this "
                         "run's defaults (flags given here override them), calibrated on its first run's FCFS mean")
    config_args(ap, GUARD + PREEMPT, sweep=True)
    ap.add_argument("--repeats", type=int, default=8, help="rounds: new arrival times each (seeds seed, seed+1, ...; "
                                                                    "the Azure trace's next window)")
    for name, value in vars(StepCost()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help="seconds (a step's cost model)")
    ap.add_argument("--noise-sigma", type=float,
                    help="replace the artifact's predictions by true length x exp(N(0, sigma^2)): the gain a "
                         "predictor of that quality would give (the report records its Kendall tau)")
    ap.add_argument("--constant-prediction", type=int,
                    help="every prediction is this many tokens: a useless proxy (the policies must then do no worse "
                         "than FCFS)")
    ap.add_argument("--kv-parking", action="store_true",
                    help="a preempted request keeps its KV cache (no recompute when it comes back); default: "
                         "it is prefilled again with its prompt and generated tokens, as the runners do")
    ap.add_argument("--calibrate-fcfs-mean", type=float,
                    help="scale the step costs so FCFS's mean JCT (over the rounds, first rate) is this many seconds")
    ap.add_argument("--out", required=True, help="REPORT.json (a Markdown table is written beside it)")
    args = ap.parse_args(argv)
    if args.from_bench:
        ap.set_defaults(**bench_defaults(args.from_bench, set(vars(args))))
        args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data (or --from-bench) is required")
    args.artifact = args.artifact or ("smollm2" if args.natural else "recorded")

    spec = load_workload(args.data, args.num_requests, args.seed, args.length_scale, args.natural,
                         args.max_prompt_tokens, args.max_seq_len, args.split, args.artifact, args.natural_max_tokens)
    prompts = [p for p, _, _ in spec]
    cap = args.natural_max_tokens or EngineConfig().default_max_tokens  # natural: stops at its length or the cap
    lengths = [min(n, cap) if args.natural else mt for _, mt, n in spec]
    prompt_tokens = [n + TEMPLATE_TOKENS for n in count_tokens(prompts)]
    if args.constant_prediction:
        predictions = [args.constant_prediction] * len(lengths)
    elif args.noise_sigma is None:
        predictor = LengthPredictor(args.artifact)
        predictions = [int(x) for x in predictor.predict(prompts, encode=cached_encode(predictor))]
    else:
        noise = np.random.default_rng(args.seed).normal(0.0, args.noise_sigma, len(lengths))
        predictions = [max(1, round(n * np.exp(e))) for n, e in zip(lengths, noise)]
    cost = StepCost(*(getattr(args, name) for name in vars(StepCost())))
    rates = floats(args.rates) if args.rates else [args.rate]
    batchings = [b.strip() for b in args.batching.split(",")]
    guards = list(itertools.product(floats(args.max_passes), floats(args.max_bypass_ratio), floats(args.starvation_s)))
    preempts = list(itertools.product(floats(args.preempt_margin), floats(args.preempt_max_fraction),
                                      floats(args.max_preemptions)))
    sweep = len(guards) > 1 or len(preempts) > 1
    arrivals = {}  # (rate, round) -> times: computed once (the Azure trace is a CSV read), replayed by every run

    def run(policy, batching, rate, r, guard, step_cost):
        passes, ratio, starve, *preempt = guard
        margin, fraction, times = preempt or preempts[0]
        config = EngineConfig(policy=policy, batching=batching, max_batch_size=args.max_batch_size,
                              max_seq_len=args.max_seq_len, starvation_s=starve, max_bypass_ratio=ratio,
                              max_passes=int(passes), cap_by_max_tokens=args.natural, preempt_margin=margin,
                              preempt_max_fraction=fraction, max_preemptions=int(times))
        if (rate, r) not in arrivals:
            arrivals[rate, r] = round_arrivals(args, rate, r)
        jobs = simulate(config, prompt_tokens, lengths, predictions, arrivals[rate, r], step_cost,
                        ignore_eos=not args.natural, kv_parking=args.kv_parking)
        return summarize(jobs, lengths)

    if args.calibrate_fcfs_mean:
        factor = calibrate(args.calibrate_fcfs_mean, lambda f: float(np.mean(
            [run("fcfs", batchings[0], rates[0], r, guards[0], cost.scaled(f))["mean_jct_s"]
             for r in range(args.repeats)])))
        cost = cost.scaled(factor)
        print(f"calibrated: step costs x {factor:.3f} give FCFS a mean JCT of {args.calibrate_fcfs_mean:.3f} s", flush=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["step_cost"] = vars(cost)
    config["mean_max_tokens"] = float(np.mean(lengths))
    config["prediction_kendall_tau"] = float(stats.kendalltau(predictions, lengths).statistic)
    config["sjf_limit"] = sjf_limit(lengths)
    report = {"config": config, "runs": []}
    for batching in batchings:
        for rate in rates:
            rounds = []
            for r in range(args.repeats):
                round_ = {}
                for policy in [p.strip() for p in args.policies.split(",")]:
                    settings = ([guards[0]] if policy == "fcfs" else
                                [g + p for g in guards for p in preempts] if policy in PREEMPTIVE else guards)
                    for guard in settings:
                        label = f"{policy} {guard_label(*guard)}" if sweep and policy != "fcfs" else policy
                        round_[label] = run(policy, batching, rate, r, guard, cost)
                rounds.append(round_)
            report["runs"].append({"batching": batching, "rate": rate, "policies": combine_rounds(rounds),
                                   "rounds": rounds})
    report["policies"] = report["runs"][0]["policies"]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report, drift=False)  # a virtual clock does not drift
    Path(args.out).with_suffix(".md").write_text(md)
    print(f"{md}\npredictions: Kendall tau {config['prediction_kendall_tau']:.3f} against the jobs' true lengths")
    return report


if __name__ == "__main__":
    main()
