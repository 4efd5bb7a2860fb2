"""Prometheus metrics of the serving pod, all labelled by served model name."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from serving.engine.protocol import StepStats

disable_created_metrics()  # the *_created series only add noise to every scrape

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model"]
        # process_* (CPU seconds, resident memory, open fds, start time) of this, the API process, and
        # python_info; the engine process's come as llm_engine_process_* once it runs (watch_engine).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("llm_requests", "Generation requests received", labels, registry=r)
        self.requests_success = Counter("llm_requests_success", "Generation requests completed", labels, registry=r)
        self.requests_failed = Counter(
            "llm_requests_failed", "Generation requests that failed (bad input, overload, errors, disconnects)", labels, registry=r
        )
        self.request_duration = Histogram(
            "llm_request_duration_seconds", "End-to-end request latency", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.slow_readers = Counter(
            "llm_requests_aborted_slow_reader",
            "Requests aborted because their client left too much output unread",
            labels,
            registry=r,
        )
        self.tokens_generated = Counter("llm_tokens_generated", "Completion tokens generated", labels, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.queue_size = Gauge("llm_queue_size", "Sequences waiting for a batch slot", labels, registry=r)
        self.active_requests = Gauge("llm_active_requests", "Generation requests in flight", labels, registry=r)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "Time from request to first token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "llm_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            labels,
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_cache_usage = Gauge("llm_kv_cache_usage_ratio", "Share of KV-cache blocks in use", labels, registry=r)
        self.batch_size = Histogram(
            "llm_batch_size", "Sequences computed per engine step", labels, buckets=_BATCH_BUCKETS, registry=r
        )
        self.preemptions = Counter(
            "llm_preemptions", "Sequences preempted (blocks freed, recomputed later) because the KV cache was full",
            labels, registry=r,
        )
        self.prefix_cache_queries = Counter(
            "llm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self.prefix_cache_hits = Counter(
            "llm_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", labels, registry=r
        )
        self.step_duration = Histogram(
            "llm_engine_step_seconds",
            "Duration of one engine step (schedule, forward pass, sampling)",
            labels,
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        # The same load signals under vLLM's names and label, which inference gateways read by default: the
        # Gateway API Inference Extension's endpoint picker (InferencePool, llm-d) scores pods by
        # vllm:num_requests_waiting and vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc before vLLM 0.10),
        # and vLLM's dashboards and KEDA scalers query them. Sequences count as requests, as in vLLM's engine.
        vllm = ["model_name"]
        self.vllm_running = Gauge("vllm:num_requests_running", "Sequences in the running batch", vllm, registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for a batch slot", vllm, registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1)", vllm, registry=r)
        self.vllm_gpu_cache_usage = Gauge(
            "vllm:gpu_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1; vLLM's name before 0.10)", vllm, registry=r
        )
        self.vllm_cache_config = Gauge(
            "vllm:cache_config_info", "The KV cache's layout (labels; value 1)", ["block_size", "num_gpu_blocks"], registry=r
        )
        # vLLM's LoRA gauge, which LoRA-aware routers (vLLM's production-stack router) read: its labels say which
        # adapters have sequences running and waiting, its value when that was last seen. One series at a time
        # (vLLM keeps every combination it ever saw); none where no adapter is served.
        self.vllm_lora_info = Gauge(
            "vllm:lora_requests_info",
            "LoRA adapters with sequences running and waiting (labels: comma-separated names; max_lora: adapters "
            "loaded); the value is when this was seen (Unix time)",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self._lora_labels: tuple[str, str, str] | None = None
        self.model = model
        self._totals: dict[str, int] = {}  # the engine's running totals already counted
        every = (
            self.requests, self.requests_success, self.requests_failed, self.request_duration, self.tokens_generated,
            self.prompt_tokens, self.queue_size, self.active_requests, self.ttft, self.tpot, self.kv_cache_usage,
            self.batch_size, self.step_duration, self.preemptions, self.prefix_cache_queries, self.prefix_cache_hits,
            self.vllm_running, self.vllm_waiting, self.vllm_kv_usage, self.vllm_gpu_cache_usage,
        )  # fmt: skip
        for metric in every:
            metric.labels(model)  # every series exists from the start, so dashboards and rate() work at once

    def describe_cache(self, block_size: int, num_blocks: int) -> None:
        """The loaded engine's KV cache, as vllm:cache_config_info (prefix-aware gateways read its block size)."""
        self.vllm_cache_config.labels(str(block_size), str(num_blocks)).set(1)

    def watch_engine(self, pid: int) -> None:
        """The engine process's own process metrics, as llm_engine_process_* (its memory is the model's)."""
        ProcessCollector(namespace="llm_engine", pid=lambda: pid, registry=self.registry)

    def observe_step(self, stats: StepStats) -> None:
        """Called by the engine client with the stats of every message from the engine process."""
        m = self.model
        self.queue_size.labels(m).set(stats.num_waiting)
        self.kv_cache_usage.labels(m).set(stats.kv_usage)
        self.vllm_running.labels(m).set(stats.num_running)
        self.vllm_waiting.labels(m).set(stats.num_waiting)
        self.vllm_kv_usage.labels(m).set(stats.kv_usage)
        self.vllm_gpu_cache_usage.labels(m).set(stats.kv_usage)
        for key, counter, total in (
            ("preempted", self.preemptions, stats.preempted_total),
            ("prefix_queries", self.prefix_cache_queries, stats.prefix_queries_total),
            ("prefix_hits", self.prefix_cache_hits, stats.prefix_hits_total),
        ):
            seen = self._totals.get(key, 0)
            if total > seen:
                counter.labels(m).inc(total - seen)
                self._totals[key] = total
        if stats.batch_size:
            self.batch_size.labels(m).observe(stats.batch_size)
            self.step_duration.labels(m).observe(stats.duration)
        if stats.adapters_loaded or self._lora_labels is not None:
            self._observe_adapters(stats)

    def _observe_adapters(self, stats: StepStats) -> None:
        labels = (",".join(stats.running_adapters), ",".join(stats.waiting_adapters), str(stats.adapters_loaded))
        if labels != self._lora_labels:
            self.vllm_lora_info.clear()
            self._lora_labels = labels
        self.vllm_lora_info.labels(*labels).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
