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


def test_the_scheduler_queue_gets_the_cap():
    from ssjf.scheduler import Scheduler

    assert Scheduler(EngineConfig(cap_by_max_tokens=False)).waiting.cap_by_max_tokens is False
    assert Scheduler(EngineConfig()).waiting.cap_by_max_tokens is True


@pytest.mark.parametrize("bad", [{"policy": "lifo"}, {"batching": "huge"}, {"max_batch_size": 0},
                                 {"dtype": "int3"}, {"starvation_s": -1}, {"max_passes": -1}])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)
