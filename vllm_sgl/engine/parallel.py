"""The guide's work split across one engine's tensor-parallel ranks.

Every rank of an engine holds the whole guide (a small model: sharding it would add collectives to
each of its layers for weights one device holds easily, and its decode is latency-bound, not
bandwidth-bound). A step's guide requests are split across the tensor-parallel ranks by their
guide tokens (longest first, onto the least loaded rank), each rank runs its share, and the
results are gathered through vLLM's own TP group, so every rank ends the step with the same
results for all requests. The split depends only on the step's work list, which every rank
receives identically, and on the ranks vLLM's group reports: nothing process-local, so it holds
for the multiprocessing and the Ray executors.

With pipeline parallelism the guide phase runs on the last stage only (its TP ranks split it):
the step's output, which carries the results to the scheduler, comes from there, and a collective
across stages inside a step would deadlock against the stages' own send/receive of activations
(a later stage receives before its state update, an earlier one sends after it). The target's
encoder, on the first stage, gets the keep sets with the request, as on one device.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    """The ranks one piece of guide work is split over: `size` ranks, this one is `index`."""

    group: Any = None  # the vLLM GroupCoordinator the results are gathered through
    index: int = 0
    size: int = 1

    def gather(self, part: dict) -> dict:
        """Every rank's dict merged, on every rank (one all_gather_object on the group's CPU group)."""
        if self.size == 1:
            return dict(part)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, part, group=self.group.cpu_group)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged


SINGLE = Ranks()


def tensor_ranks() -> Ranks:
    """This process's tensor-parallel ranks within its engine (data-parallel engines each split
    their own work; pipeline stages each have their own TP group)."""
    try:
        from vllm.distributed.parallel_state import get_tp_group

        tp = get_tp_group()
    except (ImportError, AssertionError):  # no distributed state: a single process
        return SINGLE
    return Ranks(tp, tp.rank_in_group, tp.world_size) if tp.world_size > 1 else SINGLE


def last_pipeline_stage() -> bool:
    try:
        from vllm.distributed.parallel_state import get_pp_group

        return get_pp_group().is_last_rank
    except (ImportError, AssertionError):
        return True


def assign(costs: Sequence[int], size: int) -> list[int]:
    """The rank each item goes to: longest first onto the least loaded rank (ties: lower rank, then
    earlier item), so every rank computes the same assignment from the same costs."""
    owner = [0] * len(costs)
    loads = [(0, r) for r in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner
