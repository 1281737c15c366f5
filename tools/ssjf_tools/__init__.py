"""The lab: training, evaluation, profiling, benchmarks, the simulator and the soak.

It depends on the serving package (`ssjf`) and the client (`ssjf_client`); neither imports it.
Its commands join the `ssjf` console script through the `ssjf.commands` entry point.
"""

COMMANDS = {
    "bench": ("ssjf_tools.bench:main", "SSJF vs FCFS vs oracle SJF on the same arrivals, a fresh server per policy"),
    "versus": ("ssjf_tools.versus:main", "this project against `vllm serve` (FCFS and priority), same arrivals, fresh servers"),
    "simulate": ("ssjf_tools.simulate:main", "the bench's replay through the real engine on a virtual clock"),
    "bench-engine": ("ssjf_tools.bench_engine:main", "engine tokens/s against transformers' generate and generate_batch"),
    "bench-overhead": ("ssjf_tools.overhead:main", "Triton round trip minus the engine's own time"),
    "soak": ("ssjf_tools.soak:main", "Locust for minutes at a multiple of measured capacity; memory and hangs"),
    "profile": ("ssjf_tools.profile:main", "record the served LLM's own output lengths over a prompt set (resumable)"),
    "train-proxy": ("ssjf_tools.train_proxy:main", "train a length-predictor artifact from prompt/response rows"),
    "loso": ("ssjf_tools.loso:main", "leave-one-source-out Kendall tau of the proxy's objectives and targets"),
    "eval-proxy": ("ssjf_tools.eval_proxy:main", "Kendall tau, Spearman, MAE, bucket accuracy and latency of an artifact"),
    "gpu-check": ("ssjf_tools.gpu_check:main", "the first run on a GPU: engine vs transformers on CUDA, speed, the proxy"),
}
