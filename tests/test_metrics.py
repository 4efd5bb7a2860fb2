"""The serving pod's metrics as a scraper reads them: vLLM's names, which inference gateways read by default,
follow the engine's load alongside FleetLM's own."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.engine.protocol import StepStats
from serving.metrics import Metrics


def _scrape(metrics: Metrics) -> dict[str, tuple[str, dict[tuple, float]]]:
    """{family: (type, {labels: value})}, parsed from the exposition text as a Prometheus scraper parses it."""
    return {
        family.name: (family.type, {tuple(sorted(s.labels.items())): s.value for s in family.samples})
        for family in text_string_to_metric_families(metrics.render().decode())
    }


def _stats(waiting: int, running: int, kv_usage: float) -> StepStats:
    return StepStats(batch_size=running, num_tokens=running, num_waiting=waiting, num_running=running,
                     kv_usage=kv_usage, num_preempted=0, duration=0.01)  # fmt: skip


def test_vllm_named_gauges_follow_each_step_as_gauges_labelled_by_model_name():
    metrics = Metrics("smollm2")
    label = (("model_name", "smollm2"),)
    before = _scrape(metrics)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert before[name] == ("gauge", {label: 0.0}), name  # there from the start, at zero
    for waiting, running, usage in ((4, 16, 0.625), (0, 3, 0.125), (0, 0, 0.0)):
        metrics.observe_step(_stats(waiting, running, usage))
        scraped = _scrape(metrics)
        assert scraped["vllm:num_requests_waiting"][1] == {label: waiting}
        assert scraped["vllm:num_requests_running"][1] == {label: running}
        assert scraped["vllm:kv_cache_usage_perc"][1] == {label: usage} == scraped["vllm:gpu_cache_usage_perc"][1]
        # The same numbers as FleetLM's own series.
        assert scraped["llm_queue_size"][1] == {(("model", "smollm2"),): waiting}
        assert scraped["llm_kv_cache_usage_ratio"][1] == {(("model", "smollm2"),): usage}


def test_cache_config_info_names_the_block_size_and_count_once_the_engine_is_loaded():
    metrics = Metrics("m")
    assert _scrape(metrics)["vllm:cache_config_info"] == ("gauge", {})  # not before the engine says
    metrics.describe_cache(16, 2048)
    assert _scrape(metrics)["vllm:cache_config_info"] == ("gauge", {(("block_size", "16"), ("num_gpu_blocks", "2048")): 1.0})


def test_lora_requests_info_names_the_adapters_running_and_waiting_in_one_series():
    from dataclasses import replace

    metrics = Metrics("m")
    metrics.observe_step(_stats(0, 1, 0.1))
    assert _scrape(metrics)["vllm:lora_requests_info"] == ("gauge", {})  # no adapters served: no series
    for running, waiting in ((("sql",), ()), (("sql", "tone"), ("tone",)), ((), ())):
        metrics.observe_step(replace(_stats(len(waiting), len(running), 0.1), running_adapters=running, waiting_adapters=waiting, adapters_loaded=2))
        (labels, seen), = _scrape(metrics)["vllm:lora_requests_info"][1].items()
        assert dict(labels) == {"running_lora_adapters": ",".join(running), "waiting_lora_adapters": ",".join(waiting), "max_lora": "2"}
        assert seen > 1.7e9  # when, as vLLM's
