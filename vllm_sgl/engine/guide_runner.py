"""The guide as a component of vLLM's model runner, the way the runner owns a speculative
decoding drafter: created in the runner's load_model (so vLLM's memory profiling counts the guide's
weights and workspace), then driven by the runner adapter (vllm_sgl.engine.runners) each step:

- guide_phase(work): the scheduler's guide phase (vllm_sgl.engine.scheduler) for this step's
  requests, before the target's forward; results and failures go to the outbox, which rides back
  on the step's output;
- assign_keep_sets(requests, scheduled): before the target's encoder runs, every image to be
  encoded has its keep set (the encode-time fallback for requests that skipped the guide phase);
- track / finish: per-request bookkeeping: the worker knows every request's guide result, whether
  the guide ran here (guide phase, fallback) or the scheduler reused an identical earlier
  request's (it sends those with the request: protocol.GUIDE_KNOWN), because on Model Runner V2
  the worker's drafts are the ones verified (vllm_sgl.engine.runners.mrv2).

With tensor parallelism each rank runs its share of a step's guide requests and the results are
gathered, so every rank holds all of them (vllm_sgl.engine.parallel).

A failure in the guide for one request never escapes: the batch is retried request by request and
the failing request comes back as a GuideFailure (the scheduler finishes it with an error).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_sgl.engine.config import DRAFT_TOKENS_KWARG, IMPORTANCE_KWARG, SGLConfig
from vllm_sgl.engine.parallel import SINGLE, Ranks, assign, last_pipeline_stage, tensor_ranks
from vllm_sgl.engine.protocol import (
    GUIDE_KNOWN,
    GUIDE_WORK,
    PIXEL_KEYS,
    PRUNED_MODALITIES,
    GuideFailure,
    GuideWork,
    ResultsByImages,
    attach_keep_sets,
    embed_runs,
    first_tokens,
    guide_prompt_len,
    has_keep_set,
    has_pixels,
    item_grid,
    item_tiles,
    item_visual_tokens,
    request_field,
    visual_features,
)
from vllm_sgl.pruning import IMPORTANCES

logger = logging.getLogger("vllm_sgl")

# Test hook: the guide raises for every request whose (internal) id contains this string, so the
# engine's handling of a failing guide can be exercised on a real server. Unset in production.
FAIL_GUIDE_ENV = "VLLM_SGL_TEST_FAIL_GUIDE_FOR"


class GuideRunner:
    def __init__(self, vllm_config):
        self.config = SGLConfig.from_additional_config(vllm_config.additional_config)
        self.guide_dir = self.config.check_pair(vllm_config.model_config.model)
        self.device = vllm_config.device_config.device
        self.dtype = vllm_config.model_config.dtype
        self.kv_tokens = self.config.step_tokens(vllm_config.scheduler_config)
        self.cuda_graphs = not vllm_config.model_config.enforce_eager
        # Each step's guide work is split across the TP ranks; with pipeline parallelism the guide
        # phase runs on the last stage, whose output reaches the scheduler (vllm_sgl.engine.parallel).
        self.ranks = tensor_ranks()
        self.runs_guide_phase = last_pipeline_stage()
        self.guide = None
        self.target = None
        self._requests: dict[str, Any] = {}  # requests this worker knows: their GuideResult or None
        self._prompts: dict[str, Any] = {}  # their (pruned) prompt token ids
        self._draft_limits: dict[str, int] = {}  # their own sgl_draft_tokens, where they set one
        self._guided: dict[str, Any] = {}  # guide-phase results of requests not yet known here
        self._by_images = ResultsByImages()  # identical earlier requests' results
        self._outbox: dict[str, Any] = {}  # results and failures for this step's output
        self._answered: set[str] = set()  # known requests whose result arrived since take_answered()
        self._fail_for = os.environ.get(FAIL_GUIDE_ENV) or None
        self._warned_pipeline = False

    def load_model(self, target_model) -> None:
        from vllm_sgl.guide import Guide

        self.target = target_model
        logger.info("SGL: loading guide %s", self.guide_dir)
        before = _allocated(self.device)
        self.guide = Guide.load(
            self.guide_dir, self.device, self.dtype, self.config.guide_max_tokens,
            importance_backend=self.config.importance_backend, max_batch=self.config.guide_max_batch,
            kv_tokens=self.kv_tokens, cuda_graphs=self.cuda_graphs,
            consistency_ratio=self.config.see_consistency_ratio, fixed_workspace=True,
        )
        used = _allocated(self.device) - before
        if torch.device(self.device).type == "cuda":
            # compile, capture every decode bucket and run one largest call now, not in a step
            w = self.guide.warm_up()
            logger.info("SGL: guide warmed up in %.1f s: %d decode graphs captured, a largest call (%d requests) "
                        "peaked at %.1f MiB above the workspace", w["seconds"], w["graphs"],
                        self.config.guide_max_batch, w["peak_bytes"] / 2**20)
        ranks = self.ranks
        logger.info(
            "SGL: guide loaded on rank %d of %d: %s of weights and workspace on %s (workspace %.1f MiB for "
            "%d requests of up to %d guide tokens per step)%s",
            ranks.index, ranks.size, f"{used / 2**20:.1f} MiB" if used else "(not measured on this device)",
            self.device, self.guide.workspace_bytes() / 2**20, self.config.guide_max_batch, self.kv_tokens,
            "; each step's guide requests are split across the ranks" if ranks.size > 1 else "",
        )

    def profile_run(self) -> None:
        """Inside vLLM's profile_run, after the target's dummy forward: the guide's largest call
        again, so the peak vLLM's memory profile reads (since its own start: a peak reached in
        load_model is not in it) is the larger of the target's and the guide's, and the KV cache is
        sized with both counted. Nothing here touches the allocator's peak statistics (a reset
        would erase the target's peaks). CUDA only: nothing to profile elsewhere."""
        if self.guide is not None and torch.device(self.device).type == "cuda":
            self.guide.largest_call()

    # -- running the guide ---------------------------------------------------------------------

    def _request(self, request_id: str, prompt: Sequence[int], images, see: bool = False):
        """The guide's input: the full prompt (every image with all N of its visual tokens) and
        the request's pixels, normalised as the target would."""
        from vllm_sgl.guide import GuideRequest

        config = self.target.config
        full: list[int] = []
        st = 0
        prompt = list(prompt)
        grids, tiles, counts, factors = [], [], [], []
        for f in images:  # each run's k media tokens back at N (InternVL's <img>, </img> stay)
            runs, grid = embed_runs(f), item_grid(f.data)
            n = item_visual_tokens(f.data, config) // len(runs)
            for lead, k in runs:
                o = f.mm_position.offset + lead
                # InternVL marks a video's frames <video>: to the guide (tiles) every run is an image's
                token = prompt[o] if grid is not None else self.guide.image_token_id
                full += prompt[st:o] + [token] * n
                st = o + k
                counts.append(k)
            if grid is None:  # InternVL: an image's tiles, or one tile per frame
                tiles += [1] * len(runs) if len(runs) > 1 else [item_tiles(f.data)]
            elif len(runs) > 1:  # a Qwen3-VL video: to the guide, one image of grid (1, h, w) per frame
                grids += [[1, *grid[1:]]] * len(runs)
                factors += [1.0] * len(runs)
            else:
                grids.append(grid)
                factors.append(self.target.sgl_t_factor(f))
        full += prompt[st:]
        pixels = torch.cat([f.data[PIXEL_KEYS[f.modality]].data for f in images])
        return GuideRequest(
            request_id=request_id,
            prompt_ids=full,
            pixel_values=self.target.sgl_normalize_pixels(pixels.to(self.device), self.dtype),
            image_grid_thw=torch.tensor(grids) if grids else None,
            image_tiles=tiles or None,
            keep_counts=counts,
            see=see,
            importance=self._importance(images),
            t_factors=factors or None,
        )

    def _importance(self, images) -> str:
        """The request's keep rule: its own (mm_processor_kwargs.sgl_importance) or the engine's."""
        own = request_field(images, IMPORTANCE_KWARG)
        return self.config.importance if own is None else IMPORTANCES[int(own)]

    def _run(self, items, ranks: Ranks = SINGLE) -> dict[str, Any]:
        """items: (request_id, prompt_token_ids, image features[, see]). Split across `ranks` (each
        runs its share; vllm_sgl.engine.parallel), gathered, and remembered on every rank.
        Returns {request_id: GuideResult | GuideFailure} for all items."""
        start = time.perf_counter()
        if ranks.size == 1:
            results = self._compute(items, 0)
        else:
            owner = assign([self._guide_tokens(item) for item in items], ranks.size)
            mine = [item for item, r in zip(items, owner) if r == ranks.index]
            t_c = time.perf_counter()
            local = self._compute(mine, ranks.index) if mine else {}
            t_g = time.perf_counter()
            results = ranks.gather(local)
            logger.debug("SGL guide rank %d of %d: %d of %d request(s), %.3f s, then %.3f s waiting in the gather",
                         ranks.index, ranks.size, len(mine), len(items), t_g - t_c, time.perf_counter() - t_g)
            # The step's guide time is the slowest share plus the gather: what the engine waited.
            wall = time.perf_counter() - start
            results = {k: v if isinstance(v, GuideFailure) else dataclasses.replace(v, step_seconds=wall)
                       for k, v in results.items()}
        for req_id, _, images, *_ in items:
            res = results[req_id]
            if isinstance(res, GuideFailure):
                continue
            self._by_images.put(images, res)
            if req_id in self._requests:
                self._set_result(req_id, res)
            else:  # guide phase: the request reaches this worker later, or never (aborted)
                self._guided[req_id] = res
        return results

    def _compute(self, items, rank: int) -> dict[str, Any]:
        """One batched guide call on this rank; if it raises, each request alone, so a request the
        guide cannot serve fails by itself and the others (and the engine) go on. Importance is
        dropped here: the engine needs the keep sets and the answer."""
        try:
            results = self._run_batch(items)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(items) == 1:
                logger.exception("SGL: the guide failed for request %s", items[0][0])
                return {items[0][0]: GuideFailure(items[0][0], f"{type(exc).__name__}: {exc}")}
            logger.warning("SGL: a batched guide call of %d requests failed (%s: %s); running them one by one",
                           len(items), type(exc).__name__, exc)
            results = {}
            for item in items:
                results.update(self._compute([item], rank))
            return results
        return {k: dataclasses.replace(v, importance=[], rank=rank) for k, v in results.items()}

    def _guide_tokens(self, item) -> int:
        """The guide's prompt length for one item (what its vision and prefill cost scales with)."""
        _, prompt, images, *_ = item
        return guide_prompt_len(len(prompt), images, self.target.config)

    def _run_batch(self, items) -> dict[str, Any]:
        requests, runs = [], {}
        for req_id, prompt, images, *see in items:
            if self._fail_for is not None and self._fail_for in req_id:
                raise RuntimeError(f"{FAIL_GUIDE_ENV}: injected guide failure for request {req_id}")
            requests.append(self._request(req_id, prompt, images, bool(see and see[0])))
            runs[req_id] = [len(embed_runs(f)) for f in images]
        results = self.guide.run(requests)
        logger.debug("SGL guide: %d request(s) in %.3f s", len(results), results[0].step_seconds if results else 0)
        return {r.request_id: _per_item(r, runs[r.request_id]) for r in results}

    def guide_phase(self, work: Sequence[GuideWork]) -> None:
        """The scheduler's guide phase: results go back to the scheduler, which attaches the keep
        sets before the request may be scheduled for the target."""
        if not self.runs_guide_phase:  # an earlier pipeline stage: keep sets come with the request
            return
        items = [(w.request_id, w.prompt_token_ids, w.images, w.see) for w in work]
        self._outbox.update(self._run(items, self.ranks))

    def begin_step(self, scheduler_output) -> None:
        """A step's worker side, before the target's forward (every runner adapter calls it, also
        on steps without target tokens): the step's guide-phase work, then new and finished requests."""
        work = getattr(scheduler_output, GUIDE_WORK, None)
        if work:
            self.guide_phase(work)
        self.track(scheduler_output.scheduled_new_reqs, getattr(scheduler_output, GUIDE_KNOWN, None) or {})
        if scheduler_output.finished_req_ids:
            self.finish(scheduler_output.finished_req_ids)

    def take_outbox(self) -> dict[str, Any]:
        out, self._outbox = self._outbox, {}
        return out

    def _known_result(self, req_id: str, images) -> Any:
        """The guide's result for this request if it exists already: the request's own, or that of
        an identical earlier request (image identities are salted with the whole prompt)."""
        if self._requests.get(req_id) is not None:
            return self._requests[req_id]
        return self._by_images.get(images)

    def assign_keep_sets(self, requests: Mapping[str, Any], scheduled: Mapping[str, list[int]]) -> list[str]:
        """Before the step's encoder runs, every image about to be encoded gets its keep set.

        Normally the scheduler attached it in the guide phase, and it stays on the item for every
        later encode (re-encode after eviction, preemption, later chunks), so nothing runs here.
        A request that skipped the guide phase uses its guide result if one exists, else the
        guide runs now on the request's pixels, batched over such requests. A request whose guide
        fails, or whose pixels vLLM already dropped, is reported to the scheduler, which finishes
        it with an error; its images get placeholder keep sets so this step stays well-formed.
        Returns the requests whose keep sets were attached here: their positions were made without
        them, and the runner adapter makes them again before the forward."""
        todo, failed, encoding = [], {}, {}
        for req_id, input_ids in scheduled.items():
            state = requests[req_id]
            enc = [state.mm_features[i] for i in input_ids if state.mm_features[i].modality in PRUNED_MODALITIES]
            if all(has_keep_set(f) for f in enc):
                continue
            encoding[req_id] = enc
            images = visual_features(state.mm_features)
            known = self._known_result(req_id, images)
            if known is not None:
                attach_keep_sets(images, known.keep_indices)
                self._set_result(req_id, known)
                self._outbox[req_id] = known
            elif all(has_pixels(f) for f in images):
                todo.append((req_id, state.prompt_token_ids, images))
            else:
                failed[req_id] = GuideFailure(
                    req_id, "no keep set, and the guide cannot run: vLLM dropped the pixels of an image "
                    "covered by the prefix cache",
                )
        if (todo or failed) and not self.runs_guide_phase and not self._warned_pipeline:
            self._warned_pipeline = True
            logger.warning(
                "SGL: with pipeline parallelism, requests %s skipped the guide phase (streaming input "
                "or no pixels in the scheduler): their keep sets are made here, on the first stage, and "
                "later stages place the kept tokens at the first positions of each image",
                sorted([*(t[0] for t in todo), *failed]),
            )
        if todo:
            results = self._run(todo, self.ranks)
            for req_id, _, images in todo:
                if isinstance(results[req_id], GuideFailure):
                    failed[req_id] = results[req_id]
                else:
                    attach_keep_sets(images, results[req_id].keep_indices)
                    self._outbox[req_id] = results[req_id]
        for req_id, failure in failed.items():
            missing = [f for f in encoding[req_id] if not has_keep_set(f)]
            attach_keep_sets(missing, [first_tokens(f, self.target.config) for f in missing])
            self._outbox[req_id] = failure
        return list(encoding)

    # -- bookkeeping ---------------------------------------------------------------------------

    def track(self, new_requests, known: Mapping[str, Any]) -> None:
        """Requests new to this worker (or back after a preemption, which keeps their result), with
        the guide results the scheduler reused for some of them."""
        for r in new_requests:
            result = self._guided.pop(r.req_id, None) or known.get(r.req_id)
            self._requests.setdefault(r.req_id, None)
            if result is not None:
                self._set_result(r.req_id, result)
            self._prompts[r.req_id] = r.prompt_token_ids
            own = request_field(r.mm_features, DRAFT_TOKENS_KWARG)
            if own is not None:
                self._draft_limits[r.req_id] = int(own)

    def _set_result(self, req_id: str, result) -> None:
        self._requests[req_id] = result
        self._answered.add(req_id)

    def take_answered(self) -> set[str]:
        """The requests whose guide result became known since the last call (their drafts change)."""
        out, self._answered = self._answered, set()
        return out

    def finish(self, finished_req_ids) -> None:
        """Forgets finished requests (their trace lines are the scheduler's: vllm_sgl.engine.trace)."""
        for req_id in finished_req_ids:
            self._answered.discard(req_id)
            self._guided.pop(req_id, None)
            self._requests.pop(req_id, None)
            self._prompts.pop(req_id, None)
            self._draft_limits.pop(req_id, None)

    def answer_of(self, req_id: str) -> list[int] | None:
        """The guide's answer for a request this worker knows, if the guide ran for it."""
        res = self._requests.get(req_id)
        return list(res.answer_ids) if res is not None else None

    def draft_limit_of(self, req_id: str) -> int:
        """How many of its guide answer's tokens a request may be proposed per step."""
        return min(self.config.draft_tokens, self._draft_limits.get(req_id, self.config.draft_tokens))

    def prompt_of(self, req_id: str) -> list[int]:
        return self._prompts[req_id]


def _per_item(result, runs: list[int]):
    """The guide's result per item: a video whose frames were runs of their own (Qwen3-VL, InternVL)
    gets one keep set over its N tokens, each frame's kept indices offset by the frame's first token."""
    if all(r == 1 for r in runs):
        return result
    keep, importance, sizes, i = [], [], [], 0
    for r in runs:
        n = result.num_visual_tokens[i]
        keep.append(torch.cat([k + j * n for j, k in enumerate(result.keep_indices[i : i + r])]))
        if result.importance:
            importance.append(torch.cat(result.importance[i : i + r]))
        sizes.append(n * r)
        i += r
    return dataclasses.replace(result, keep_indices=keep, importance=importance, num_visual_tokens=sizes)


def _allocated(device) -> int:
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
