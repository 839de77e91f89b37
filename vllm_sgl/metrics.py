"""SGL's Prometheus metrics, exported on the server's /metrics next to vLLM's own.

Two processes record them: the front end (visual tokens seen / kept / pruned, counted when the
processor emits k placeholders per image) and the engine core (the guide phase, recorded when the
guide's results reach the scheduler). The engine core's values reach /metrics through
prometheus_client's multiprocess mode, which `vllm-sgl serve` turns on (PROMETHEUS_MULTIPROC_DIR,
the mechanism vLLM itself uses with several API servers); without it the guide metrics stay in the
engine-core process and only the front-end counters are exported.
Metrics must never break serving: if they cannot be created, nothing is recorded.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_sgl")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Lazy:
    _instance = None
    _failed = False

    @classmethod
    def get(cls):
        if cls._instance is None and not cls._failed:
            try:
                cls._instance = cls()
            except Exception as exc:  # noqa: BLE001
                cls._failed = True
                logger.warning("SGL: metrics disabled (%s)", exc)
        return cls._instance


class FrontEndMetrics(_Lazy):
    def __init__(self):
        from prometheus_client import Counter

        self.images = Counter("vllm_sgl:images", "Images processed with SGL pruning")
        self.seen = Counter("vllm_sgl:visual_tokens_seen", "Visual tokens before pruning (N per image)")
        self.kept = Counter("vllm_sgl:visual_tokens_kept", "Visual tokens the target sees (k per image)")
        self.pruned = Counter("vllm_sgl:visual_tokens_pruned", "Visual tokens pruned (N - k per image)")

    def record_image(self, n: int, k: int) -> None:
        self.images.inc()
        self.seen.inc(n)
        self.kept.inc(k)
        self.pruned.inc(n - k)


class GuideMetrics(_Lazy):
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.requests = Counter("vllm_sgl:guide_requests", "Requests the guide ran for")
        self.step_seconds = Histogram(
            "vllm_sgl:guide_step_seconds",
            "Wall time of one guide call in the worker (all requests of a step together)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def record_step(self, num_requests: int, seconds: float) -> None:
        self.requests.inc(num_requests)
        self.step_seconds.observe(seconds)
