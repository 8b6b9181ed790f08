"""The server's Prometheus metrics, in a registry of its own (`/metrics` renders it)."""

from __future__ import annotations

from prometheus_client import (
  CollectorRegistry,
  Counter,
  Gauge,
  Histogram,
  generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("medusa_requests", "Requests received, by endpoint and outcome",
                            ["endpoint", "status"], registry=r)
    self.prompt_tokens = Counter("medusa_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
    self.completion_tokens = Counter("medusa_completion_tokens", "Tokens generated", registry=r)
    self.chunks = Counter("medusa_chunks", "Decode chunks run, by mode (plain, or treeN: a drafter "
                          "verifying N tokens per row and step)", ["mode"], registry=r)
    self.accepted_tokens_per_step = Gauge(
        "medusa_accepted_tokens_per_step", "Tokens per step of a drafting mode, running average over served "
        "rows", ["mode"], registry=r)
    self.step_seconds = Gauge(
        "medusa_step_seconds", "Seconds per decode step: measured at start-up, then a running average "
        "of served chunks, by row bucket, mode and attention span", ["rows", "mode", "span"],
        registry=r)
    self.compiled_programs = Gauge(
        "medusa_compiled_programs", "Programs serving may run: compiled (ready) and in all (total); "
        "those not ready compile in the background after start-up", ["state"], registry=r)
    self.active_rows = Gauge("medusa_active_rows", "Rows decoding now", registry=r)
    self.queue_depth = Gauge("medusa_queue_depth", "Requests waiting for a slot", registry=r)
    self.ttft = Histogram("medusa_time_to_first_token_seconds", "Arrival to first token",
                          buckets=_LATENCY, registry=r)
    self.itl = Histogram("medusa_inter_token_latency_seconds", "Time between streamed tokens",
                         buckets=_LATENCY, registry=r)

  def render(self) -> bytes:
    return generate_latest(self.registry)
