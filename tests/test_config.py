import pytest

from ssjf.config import EngineConfig


def test_from_strings_reads_parameters_and_env_overrides():
    params = {"policy": "fcfs", "max_batch_size": "8", "starvation_s": "2.5", "chat_template": "false"}
    c = EngineConfig.from_strings(params, environ={})
    assert (c.policy, c.max_batch_size, c.starvation_s, c.chat_template) == ("fcfs", 8, 2.5, False)
    c = EngineConfig.from_strings(params, environ={"SSJF_POLICY": "sjf_oracle", "SSJF_BATCHING": "dynamic"})
    assert (c.policy, c.batching) == ("sjf_oracle", "dynamic")
    assert c.cap_by_max_tokens is True
    assert EngineConfig.from_strings(params, environ={"SSJF_CAP_BY_MAX_TOKENS": "0"}).cap_by_max_tokens is False


def test_the_scheduler_queue_gets_the_cap_and_the_guard():
    from ssjf.scheduler import Scheduler

    assert Scheduler(EngineConfig(cap_by_max_tokens=False)).waiting.cap_by_max_tokens is False
    q = Scheduler(EngineConfig(max_batch_size=8)).waiting
    assert (q.cap_by_max_tokens, q.max_bypass_ratio, q.max_passes, q.starvation_s, q.slots) == (True, 2.0, 16, 60.0, 8)
    assert Scheduler(EngineConfig(batching="none", max_batch_size=8)).waiting.slots == 1
    q = Scheduler(EngineConfig(batching="dynamic", max_batch_size=8)).waiting
    assert (q.slots, q.batch_rounds) == (1, True)  # a request-level batch lasts as long as its longest job
    c = EngineConfig.from_strings({"max_bypass_ratio": "2"}, environ={"SSJF_MAX_BYPASS_RATIO": "0.5"})
    assert c.max_bypass_ratio == 0.5


@pytest.mark.parametrize("bad", [{"policy": "lifo"}, {"batching": "huge"}, {"max_batch_size": 0},
                                 {"dtype": "int3"}, {"starvation_s": -1}, {"max_passes": -1},
                                 {"max_bypass_ratio": -1}])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)


def test_tensor_and_pipeline_parallel_sizes_reach_vllms_engine_args():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from ssjf.assets import smollm2_path
    from ssjf.runners.vllm import engine_args

    path = str(smollm2_path())
    config = EngineConfig.from_strings({}, {"SSJF_TENSOR_PARALLEL_SIZE": "4", "SSJF_PIPELINE_PARALLEL_SIZE": "2",
                                            "SSJF_RUNNER": "vllm"})
    args = engine_args(config, path, "bfloat16")
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (4, 2)
    assert args.distributed_executor_backend == "mp"  # vLLM's own workers, one per GPU
    single = engine_args(EngineConfig(runner="vllm"), path, "bfloat16")
    assert (single.tensor_parallel_size, single.pipeline_parallel_size, single.distributed_executor_backend) == (1, 1, None)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(runner="vllm", tensor_parallel_size=0)


def test_one_refresh_config_both_models_read_from_parameters_and_the_environment():
    from ssjf.config import RefreshConfig, refresh_path

    default = RefreshConfig.from_strings({}, {})
    assert default.enabled and default.window == 4000 and default.file == refresh_path("")
    params = {"proxy_refresh": "0", "proxy_refresh_window": "128", "max_batch_size": "8"}
    assert (RefreshConfig.from_strings(params, {}).enabled, RefreshConfig.from_strings(params, {}).window) == (False, 128)
    env = {"SSJF_PROXY_REFRESH": "1", "SSJF_PROXY_REFRESH_INTERVAL_S": "2.5", "SSJF_PROXY_REFRESH_PATH": "/tmp/c.npz"}
    got = RefreshConfig.from_strings(params, env)
    assert (got.enabled, got.window, got.interval_s, str(got.file)) == (True, 128, 2.5, "/tmp/c.npz")


def test_server_settings_come_from_their_own_variables_with_defaults_stated_once():
    from ssjf.config import ServerConfig

    got = ServerConfig.from_env({"HTTP_PORT": "9100", "SSJF_HTTP_GATE": "0", "SSJF_DRAIN_S": "5", "OPENAI_PORT": "0"})
    assert (got.http_port, got.http_gate, got.drain_s, got.openai_port) == (9100, False, 5.0, 0)
    assert (got.grpc_port, got.max_restarts) == (ServerConfig().grpc_port, ServerConfig().max_restarts)
