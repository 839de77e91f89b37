"""SGL's Prometheus metrics, exported on the server's /metrics next to vLLM's own.

All are recorded in the engine core's scheduler, which sees exactly the requests the engine
accepted. They reach /metrics through prometheus_client's multiprocess mode, which `vllm-sgl
serve` turns on (PROMETHEUS_MULTIPROC_DIR, the mechanism vLLM itself uses with several API
servers); with plain `vllm serve` the user sets PROMETHEUS_MULTIPROC_DIR (README).
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


class SGLMetrics(_Lazy):
    """Recorded in the engine core: images and visual tokens when the scheduler accepts a request
    (a request rejected before it reaches the engine counts nowhere), the guide's work when its
    results reach the scheduler."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.images = Counter("vllm_sgl:images", "Images of accepted requests, pruned with SGL")
        self.seen = Counter("vllm_sgl:visual_tokens_seen", "Visual tokens before pruning (N per image)")
        self.kept = Counter("vllm_sgl:visual_tokens_kept", "Visual tokens the target sees (k per image)")
        self.pruned = Counter("vllm_sgl:visual_tokens_pruned", "Visual tokens pruned (N - k per image)")
        self.requests = Counter("vllm_sgl:guide_requests", "Requests the guide ran for")
        self.rank_requests = Counter(
            "vllm_sgl:guide_rank_requests",
            "Requests the guide ran for, by the tensor-parallel rank that ran them (the ranks split each step)",
            labelnames=["rank"],
        )
        self.failures = Counter(
            "vllm_sgl:guide_failures", "Requests finished with an error because the guide failed for them"
        )
        self.see_candidates = Counter(
            "vllm_sgl:see_candidates", "Requests SEE decided on (early exit on, greedy, guide answered)"
        )
        self.see_exits = Counter("vllm_sgl:see_exits", "Requests the guide answered itself (SEE early exit)")
        self.see_exit_rate = Gauge(
            "vllm_sgl:see_exit_rate", "Early exits over SEE candidates since this engine started",
            multiprocess_mode="mostrecent",
        )
        self._see = [0, 0]  # candidates, exits (this process)
        self.step_seconds = Histogram(
            "vllm_sgl:guide_step_seconds",
            "Wall time of one guide call in the worker (all requests of a step together)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def record_images(self, sizes: list[tuple[int, int]]) -> None:
        """sizes: (N, k) per image of one accepted request."""
        for n, k in sizes:
            self.images.inc()
            self.seen.inc(n)
            self.kept.inc(k)
            self.pruned.inc(n - k)

    def record_step(self, ranks: list[int], seconds: float) -> None:
        """ranks: for each request of the step the guide served, the rank that ran it."""
        self.requests.inc(len(ranks))
        for rank in ranks:
            self.rank_requests.labels(rank=str(rank)).inc()
        self.step_seconds.observe(seconds)

    def record_failures(self, num_requests: int) -> None:
        self.failures.inc(num_requests)

    def record_see(self, exited: bool) -> None:
        self._see[0] += 1
        self._see[1] += int(exited)
        self.see_candidates.inc()
        if exited:
            self.see_exits.inc()
        self.see_exit_rate.set(self._see[1] / self._see[0])
