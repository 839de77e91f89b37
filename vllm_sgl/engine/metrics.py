"""SGL's Prometheus metrics, exported on the server's /metrics next to vLLM's own, on plain
`vllm serve` as on `vllm-sgl serve`, with no environment variable.

They travel the way vLLM's own spec-decoding and connector stats do:
- the engine core's scheduler counts what it sees (SGLStats: images and visual tokens when it
  accepts a request, so a request rejected before the engine counts nowhere; the guide's work
  and SEE decisions when their results reach it) and ships the counts since its last report on
  the step's SchedulerStats, in the field STATS_FIELD (add_stats_field gives vLLM's dataclass that
  field in every process that loads the plugin, so msgspec carries it to the front end);
- the front end's stat logger plugin (SGLStatLogger, entry point `vllm.stat_logger_plugins` in
  setup.py; vLLM builds it in every API server next to its own Prometheus logger) turns them into
  Prometheus series labelled like vLLM's (`model_name`, `engine`): one series per data-parallel
  engine, each count once. With several API servers vLLM turns on prometheus_client's
  multiprocess mode itself, and each engine's report reaches exactly one of them.
Metrics must never break serving: a failure to record is logged once and recording stops.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

logger = logging.getLogger("vllm_sgl")

STATS_FIELD = "sgl_stats"  # on vLLM's SchedulerStats: dict | None, SGL's counts since the last report
PREFIX = "vllm_sgl:"

# Wire key -> (Prometheus counter name, help). The engine core sends the keys with a count.
COUNTERS = {
    "images": ("images", "Images and videos of accepted requests, pruned with SGL"),
    "seen": ("visual_tokens_seen", "Visual tokens before pruning (N per image or video)"),
    "kept": ("visual_tokens_kept", "Visual tokens the target sees (k per image or video)"),
    "pruned": ("visual_tokens_pruned", "Visual tokens pruned (N - k per image or video)"),
    "requests": ("guide_requests", "Requests the guide ran for"),
    "failures": ("guide_failures", "Requests finished with an error because the guide failed for them"),
    "reused": ("guide_reused", "Requests that reused an identical earlier request's guide result (same images and prompt)"),
    "see_candidates": ("see_candidates", "Requests SEE decided on (early exit on, greedy, guide answered)"),
    "see_exits": ("see_exits", "Requests the guide answered itself (SEE early exit)"),
}
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def add_stats_field() -> None:
    """Gives vLLM's SchedulerStats dataclass the optional field STATS_FIELD (default None), so the
    engine core's msgspec encoder sends it and the front end's decoder keeps it. Idempotent; must
    run before the first stats are encoded or decoded (the plugin's register(), which vLLM calls
    first thing in the front end, the engine core and the workers). A process that does not load
    the plugin (vLLM's data-parallel coordinator) decodes the stats without it."""
    from vllm.v1.metrics.stats import SchedulerStats

    if STATS_FIELD in SchedulerStats.__dataclass_fields__:
        return
    field = dataclasses.field(default=None)
    field.name, field.type = STATS_FIELD, "dict[str, Any] | None"
    field._field_type = dataclasses._FIELD  # what dataclasses.fields() and msgspec list
    SchedulerStats.__dataclass_fields__[STATS_FIELD] = field
    SchedulerStats.__annotations__[STATS_FIELD] = dict[str, Any] | None
    setattr(SchedulerStats, STATS_FIELD, None)


class SGLStats:
    """The engine core's side: counts since the last report (one per scheduler, i.e. per engine)."""

    def __init__(self):
        self._pending: dict[str, Any] = {}
        self._see_totals = [0, 0]  # candidates, exits since this engine started (for the exit rate)

    def _add(self, key: str, n: int | float) -> None:
        self._pending[key] = self._pending.get(key, 0) + n

    def record_images(self, sizes: list[tuple[int, int]]) -> None:
        """sizes: (N, k) per image of one accepted request."""
        for n, k in sizes:
            self._add("images", 1)
            self._add("seen", n)
            self._add("kept", k)
            self._add("pruned", n - k)

    def record_step(self, ranks: list[int], seconds: float) -> None:
        """ranks: for each request of the step the guide served, the rank that ran it."""
        self._add("requests", len(ranks))
        by_rank = self._pending.setdefault("rank_requests", {})
        for rank in ranks:
            by_rank[str(rank)] = by_rank.get(str(rank), 0) + 1
        self._pending.setdefault("step_seconds", []).append(float(seconds))

    def record_reuse(self) -> None:
        self._add("reused", 1)

    def record_guide_wait(self, seconds: float) -> None:
        """One request's wait from its arrival to the step its guide runs in."""
        self._pending.setdefault("guide_wait_seconds", []).append(float(seconds))

    def record_guide_phase(self, seconds: float) -> None:
        """One request's whole guide phase: from its arrival until its keep sets are attached (it
        may be scheduled for the target, or it exits)."""
        self._pending.setdefault("guide_phase_seconds", []).append(float(seconds))

    def record_failures(self, num_requests: int) -> None:
        self._add("failures", num_requests)

    def record_see(self, exited: bool) -> None:
        self._see_totals[0] += 1
        self._see_totals[1] += int(exited)
        self._add("see_candidates", 1)
        if exited:
            self._add("see_exits", 1)
        self._pending["see_totals"] = list(self._see_totals)

    def ship(self, outputs) -> None:
        """Puts the pending counts on this step's SchedulerStats (the scheduler attaches one to one
        of the step's EngineCoreOutputs when stats are on); kept for the next step otherwise."""
        if not self._pending:
            return
        stats = next((eco.scheduler_stats for eco in outputs.values() if eco.scheduler_stats is not None), None)
        if stats is None:
            return
        setattr(stats, STATS_FIELD, self._pending)
        self._pending = {}


class SGLStatLogger(AggregateStatLoggerBase):
    """The front end's side (a vLLM stat logger plugin): one instance per API server for all its
    engines. Records nothing for an engine that is not `--model-impl sgl`."""

    def __init__(self, vllm_config, engine_indexes: list[int]):
        self.enabled = getattr(vllm_config.model_config, "model_impl", None) == "sgl"
        if not self.enabled:
            return
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        for collector in list(REGISTRY._collector_to_names):  # an earlier engine in this process
            if getattr(collector, "_name", "").startswith(PREFIX):
                REGISTRY.unregister(collector)
        labels = ["model_name", "engine"]
        model = vllm_config.model_config.served_model_name
        values = {idx: [model, str(idx)] for idx in engine_indexes}

        def per_engine(metric):
            return {idx: metric.labels(*v) for idx, v in values.items()}

        self.counters = {key: per_engine(Counter(PREFIX + name, help, labelnames=labels))
                         for key, (name, help) in COUNTERS.items()}
        self.rank_requests = Counter(
            PREFIX + "guide_rank_requests",
            "Requests the guide ran for, by the tensor-parallel rank that ran them (the ranks split each step)",
            labelnames=[*labels, "rank"],
        )
        self.labels = values
        self.step_seconds = per_engine(Histogram(
            PREFIX + "guide_step_seconds",
            "Wall time of one guide call in the worker (all requests of a step together)",
            labelnames=labels, buckets=STEP_BUCKETS,
        ))
        # Where a request's time to first token goes on an SGL server: waiting for the guide (behind
        # other requests' guide work) and the guide phase as a whole, next to vLLM's own TTFT.
        self.guide_wait_seconds = per_engine(Histogram(
            PREFIX + "guide_wait_seconds",
            "Per request: from its arrival in the engine to the step whose guide call serves it",
            labelnames=labels, buckets=STEP_BUCKETS,
        ))
        self.guide_phase_seconds = per_engine(Histogram(
            PREFIX + "guide_phase_seconds",
            "Per request: from its arrival in the engine until its keep sets exist (its target prefill may start)",
            labelnames=labels, buckets=STEP_BUCKETS,
        ))
        self.see_exit_rate = per_engine(Gauge(
            PREFIX + "see_exit_rate", "Early exits over SEE candidates since this engine started",
            labelnames=labels, multiprocess_mode="mostrecent",
        ))
        self._failed = False

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        sgl = getattr(scheduler_stats, STATS_FIELD, None) if scheduler_stats is not None else None
        if not sgl or not self.enabled or self._failed or engine_idx not in self.labels:
            return
        try:
            for key, children in self.counters.items():
                if sgl.get(key):
                    children[engine_idx].inc(sgl[key])
            for rank, n in (sgl.get("rank_requests") or {}).items():
                self.rank_requests.labels(*self.labels[engine_idx], rank).inc(n)
            for key, hist in (("step_seconds", self.step_seconds), ("guide_wait_seconds", self.guide_wait_seconds),
                              ("guide_phase_seconds", self.guide_phase_seconds)):
                for seconds in sgl.get(key) or ():
                    hist[engine_idx].observe(seconds)
            if totals := sgl.get("see_totals"):
                self.see_exit_rate[engine_idx].set(totals[1] / totals[0])
        except Exception as exc:  # noqa: BLE001 - metrics must never break serving
            self._failed = True
            logger.warning("SGL: metrics disabled (%s)", exc)

    def log_engine_initialized(self) -> None:
        pass
