"""The SGL scheduler: a request with images passes through a guide phase before it may be
scheduled for the target, so the guide's answer and scores exist before any target prefill for
it is committed (the early-exit step can then finish it without the target).

Flow of one image request (front end -> scheduler -> worker), see docs/ARCHITECTURE.md:
1. add_request: instead of the waiting queue it joins the guide queue (it holds no KV blocks),
   unless an identical earlier request's guide result is kept (then its keep sets are attached and
   the request goes straight to waiting).
2. schedule: after the normal schedule, queued requests ride on the step's SchedulerOutput as
   GuideWork, as many as fit the guide's step budget (guide_step_tokens) of guide prompt and
   max_num_seqs; the step may have no target tokens at all.
3. worker: the guide runs on them before the step's target forward (worker_hooks) and the results
   come back on that step's ModelRunnerOutput.
4. update_from_output: each image item gets its keep set, the result is kept on the request
   (request.sgl_guide), and the request enters the waiting queue like any new request.
Requests that cannot take this path (no pixels in the engine core, streaming-input sessions, KV
or encoder-cache connectors) go straight to waiting; the worker then runs the guide when their
images are encoded, as a fallback that keeps every request correct.
A request the guide failed for (a GuideFailure from the worker, in either path) is finished here
with an error output and counted on vllm_sgl:guide_failures; the other requests go on.
With draft_tokens, the drafts are made here after each step: the next tokens of the request's guide
answer while its output still follows it, at most its own sgl_draft_tokens (vllm_sgl.engine.draft);
each request's proposed and accepted draft tokens are counted for its trace line.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_sgl.engine import runners, see
from vllm_sgl.engine.config import DRAFT_TOKENS_KWARG, SGLConfig
from vllm_sgl.engine.draft import answer_draft_len, next_draft
from vllm_sgl.engine.metrics import SGLStats
from vllm_sgl.engine.protocol import (
    GUIDE_KNOWN,
    GUIDE_RESULTS,
    GUIDE_WORK,
    GuideFailure,
    GuideWork,
    ResultsByImages,
    attach_keep_sets,
    visual_features,
    lacks_keep_set,
    request_field,
    guide_prompt_len,
    PRUNED_MODALITIES,
    is_visual_item,
    item_visual_tokens,
    kept_tokens,
)
from vllm_sgl.engine.trace import TraceWriter

logger = logging.getLogger("vllm_sgl")

GUIDE_RESULT_ATTR = "sgl_guide"  # on Request: the GuideResult, once the guide phase is done
REUSE_ENTRIES = 4096  # images whose guide results are kept for identical later requests (a few KiB each)
# Test hook: every request takes the worker's encode-time path, as with a KV or encoder-cache
# connector, so that path can be exercised on a real engine. Unset in production.
ENCODE_TIME_GUIDE_ENV = "VLLM_SGL_TEST_ENCODE_TIME_GUIDE"


class SGLSchedulerMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sgl_guide_queue: deque[Request] = deque()
        self.sgl_in_guide: dict[str, Request] = {}  # sent to the worker, result not back yet
        # An identical later request has the same keep sets, so it skips the guide as vanilla skips
        # its prefill on a prefix-cache hit.
        self.sgl_results = ResultsByImages(REUSE_ENTRIES)
        # Connectors move KV or encoder outputs behind the scheduler's back; keep them on the
        # worker-side path.
        self.sgl_guide_phase = (self.connector is None and getattr(self, "ec_connector", None) is None
                                and not os.environ.get(ENCODE_TIME_GUIDE_ENV))
        # The guide runs inside a step, so its work per step is bounded like a prefill is: by
        # guide_step_tokens counted in the guide's full-prompt tokens (the front end refuses a request
        # larger alone), and by max_num_seqs. Otherwise a burst of image requests stalls running decodes.
        self.sgl_config = sgl = SGLConfig.from_additional_config(self.vllm_config.additional_config)
        self.sgl_guide_token_budget = sgl.step_tokens(self.scheduler_config)
        self.sgl_max_guide_batch = max(1, min(int(self.scheduler_config.max_num_seqs), sgl.guide_max_batch))
        self.sgl_trace = TraceWriter(sgl.trace_path, self.vllm_config.model_config.tokenizer)
        # score-only (calibration): every request that could exit is scored
        self._sgl_see_default = 0.0 if sgl.see_score_only and sgl.see_threshold is None else sgl.see_threshold
        self._sgl_hf_config = self.vllm_config.model_config.hf_config
        self._sgl_warned_missing = False
        # SGL's metrics: counted here, shipped on the step's SchedulerStats (vllm_sgl.engine.metrics)
        self.sgl_metrics = SGLStats() if self.log_stats else None
        self._sgl_step_drafts: dict[str, list[int]] = {}
        self._sgl_runner = runners.select()
        # vLLM charges an image's encoder work as its placeholder count, k; the target's encoder
        # runs on all N of its visual tokens (only its output is pruned). The compute budget is
        # checked and charged at N (the cache still holds k): this step's N - k so far.
        self._sgl_encoder_extra = 0
        self._sgl_can_allocate = self.encoder_cache_manager.can_allocate
        self.encoder_cache_manager.can_allocate = self._sgl_encoder_can_allocate

    def _sgl_encoder_can_allocate(self, request, input_id, encoder_compute_budget, num_embeds_to_schedule) -> bool:
        feature = request.mm_features[input_id]
        extra = 0
        if feature.modality in PRUNED_MODALITIES and is_visual_item(feature.data):
            extra = max(0, item_visual_tokens(feature.data, self._sgl_hf_config) - kept_tokens(feature))
        # (a request that then fails to schedule keeps its charge this step: conservative)
        budget = encoder_compute_budget - self._sgl_encoder_extra - extra
        if not self._sgl_can_allocate(request, input_id, budget, num_embeds_to_schedule):
            return False
        self._sgl_encoder_extra += extra
        return True

    # -- admission -----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests  # not a streaming-input update
        super().add_request(request)
        if is_new and (metrics := self.sgl_metrics) is not None:
            metrics.record_images(
                [
                    (item_visual_tokens(f.data, self._sgl_hf_config), kept_tokens(f))
                    for f in visual_features(request.mm_features)
                    if is_visual_item(f.data)
                ]
            )

    def _sgl_needs_guide(self, request: Request) -> bool:
        return (
            self.sgl_guide_phase
            and request.status == RequestStatus.WAITING
            and request.num_computed_tokens == 0
            and not request.resumable
            and not hasattr(request, GUIDE_RESULT_ATTR)
            and lacks_keep_set(visual_features(request.mm_features))
        )

    def _enqueue_waiting_request(self, request: Request) -> None:
        if self._sgl_needs_guide(request) and not self._sgl_reuse(request):
            self.sgl_guide_queue.append(request)
            return
        super()._enqueue_waiting_request(request)

    def _sgl_reuse(self, request: Request) -> bool:
        """An identical earlier request's guide result, if one is kept and this request does not ask
        for SEE (an exit is decided, and emitted, in the guide phase's output path)."""
        images = visual_features(request.mm_features)
        if see.request_threshold(request, self._sgl_see_default) is not None:
            return False
        result = self.sgl_results.get(images)
        if result is None:
            return False
        attach_keep_sets(images, result.keep_indices)
        setattr(request, GUIDE_RESULT_ATTR, result)
        request.sgl_guide_phase = "reused"
        if self.sgl_metrics is not None:
            self.sgl_metrics.record_reuse()
        return True

    # -- the guide phase -----------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        self._sgl_encoder_extra = 0
        output = super().schedule(*args, **kwargs)
        if self.sgl_guide_queue and self._pause_state == PauseState.UNPAUSED:
            work = []
            budget = self.sgl_guide_token_budget
            now = time.time()  # Request.arrival_time is wall-clock time
            while self.sgl_guide_queue and len(work) < self.sgl_max_guide_batch:
                cost = self._sgl_guide_tokens(self.sgl_guide_queue[0])
                if work and cost > budget:
                    break
                budget -= cost
                request = self.sgl_guide_queue.popleft()
                self.sgl_in_guide[request.request_id] = request
                if self.sgl_metrics is not None:
                    self.sgl_metrics.record_guide_wait(now - request.arrival_time)
                work.append(
                    GuideWork(
                        request_id=request.request_id,
                        prompt_token_ids=list(request.prompt_token_ids or []),
                        images=visual_features(request.mm_features),
                        see=see.request_threshold(request, self._sgl_see_default) is not None,
                    )
                )
            setattr(output, GUIDE_WORK, work)
        # The worker never ran the guide for a reused result: it comes with the request, since the
        # worker's side needs the answer too (Model Runner V2 verifies the worker's drafts).
        known = {}
        for new in output.scheduled_new_reqs:
            request = self.requests.get(new.req_id)
            if getattr(request, "sgl_guide_phase", None) == "reused":
                known[new.req_id] = getattr(request, GUIDE_RESULT_ATTR)
        if known:
            setattr(output, GUIDE_KNOWN, known)
        for req_id in output.num_scheduled_tokens:  # the target works on these this step
            request = self.requests.get(req_id)
            if request is not None:
                request.sgl_target_steps = getattr(request, "sgl_target_steps", 0) + 1
        return output

    def _sgl_guide_tokens(self, request: Request) -> int:
        return guide_prompt_len(len(request.prompt_token_ids or []), visual_features(request.mm_features),
                                self._sgl_hf_config)

    def update_from_output(self, scheduler_output, model_runner_output):
        self._sgl_step_drafts = scheduler_output.scheduled_spec_decode_tokens  # what the trace counts
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        results = getattr(model_runner_output, GUIDE_RESULTS, None) or {}
        work = getattr(scheduler_output, GUIDE_WORK, None) or []
        metrics = self.sgl_metrics
        served = [r for r in results.values() if not isinstance(r, GuideFailure)]
        if served and metrics is not None:
            metrics.record_step([r.rank for r in served], served[0].step_seconds)
        in_work = {item.request_id for item in work}
        # Results that concern requests outside this step's work come from the worker's
        # encode-time fallback: failures (finished below) and results (for the trace).
        failures = [r for r in results.values() if isinstance(r, GuideFailure)]
        for req_id, result in results.items():
            request = self.requests.get(req_id)
            if req_id not in in_work and request is not None and not isinstance(result, GuideFailure):
                setattr(request, GUIDE_RESULT_ATTR, result)
                request.sgl_guide_phase = "encode"
        exits = []
        for item in work:
            request = self.sgl_in_guide.pop(item.request_id, None)
            if request is None or request.is_finished():
                continue  # aborted while the guide ran
            result = results.get(item.request_id)
            if isinstance(result, GuideFailure):
                continue
            if result is not None:
                attach_keep_sets(item.images, result.keep_indices)
                setattr(request, GUIDE_RESULT_ATTR, result)
                request.sgl_guide_phase = "scheduler"
                self.sgl_results.put(item.images, result)
                if metrics is not None:
                    metrics.record_guide_phase(time.time() - request.arrival_time)
                threshold = see.request_threshold(request, self._sgl_see_default)
                if threshold is not None:
                    decision = see.decide(request, result, threshold, self.sgl_config.see_fuse,
                                          self.max_model_len)
                    if self.sgl_config.see_score_only:  # scored for calibration; the target answers
                        decision.exit = False
                    request.sgl_see = decision
                    if metrics is not None:
                        metrics.record_see(decision.exit)
                    if decision.exit:
                        exits.append((request, decision))
                        continue
            elif not self._sgl_warned_missing:
                self._sgl_warned_missing = True
                logger.warning(
                    "SGL: guide results did not come back with the step output; the worker "
                    "will run the guide when these requests' images are encoded"
                )
            super()._enqueue_waiting_request(request)
        if exits:
            self._sgl_finish_exits(exits, outputs)
        if failures:
            self._sgl_finish_failed(failures, outputs)
        if self.sgl_config.draft_tokens and self._sgl_runner.SCHEDULER_DRAFTS:
            self._sgl_propose_drafts(scheduler_output)
        if metrics is not None:
            metrics.ship(outputs)
        return outputs

    def _sgl_finish_exits(self, exits, outputs: dict[int, EngineCoreOutputs]) -> None:
        """SEE: the guide's answer is the request's output. The request finishes through vLLM's
        normal output path (tokens, finish reason, usage, streaming), holding no KV blocks; the
        target never runs for it."""
        for request, decision in exits:
            request.append_output_token_ids(decision.tokens)
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = decision.stopped_by
            self._free_request(request)
            _outputs_for(outputs, request.client_index).outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=list(decision.tokens),
                    finish_reason=request.get_finished_reason(),
                    stop_reason=request.stop_reason,
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )

    def _sgl_finish_failed(self, failures: list[GuideFailure], outputs: dict[int, EngineCoreOutputs]) -> None:
        """Finishes each request the guide failed for with an error output (finish reason
        "error": the OpenAI server answers that request with an error); nothing else changes."""
        why = {f.request_id: f.message for f in failures}
        finished = self.finish_requests(list(why), RequestStatus.FINISHED_ERROR)
        for request in finished:
            logger.error("SGL: request %s finished with an error: the guide failed (%s)",
                         request.request_id, why[request.request_id])
            _outputs_for(outputs, request.client_index).outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        if finished and (metrics := self.sgl_metrics) is not None:
            metrics.record_failures(len(finished))

    # -- drafts (vllm_sgl.engine.draft) --------------------------------------------------------

    def _sgl_propose_drafts(self, scheduler_output) -> None:
        """After a step: each request the target decodes whose output still follows its guide's
        answer gets the answer's next tokens as its draft for the next step (vLLM schedules and
        verifies them as any proposer's)."""
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            # A streaming-input session's later turns are new questions: the guide's answer was to the first.
            if (request is None or request.status != RequestStatus.RUNNING or request.is_prefill_chunk
                    or request.resumable or getattr(request, "sgl_draft_done", False)):
                continue
            try:
                draft = self._sgl_draft(request)
            except Exception:  # noqa: BLE001 - a draft is an optimisation: that request decodes without
                logger.exception("SGL: no drafts for request %s", req_id)
                draft = []
            if not draft:  # no answer, disagreed, spent or no room: never again for this request
                request.sgl_draft_done = True
                continue
            request.spec_token_ids = self._sgl_runner.trim_drafts(self.structured_output_manager, request, draft)

    def _sgl_draft(self, request: Request) -> list[int]:
        k = min(self._sgl_draft_limit(request), self.max_model_len - request.num_tokens)
        if request.max_tokens is not None:  # a verify step yields the accepted tokens and one of its own
            k = min(k, request.max_tokens - request.num_output_tokens - 1)
        guide = getattr(request, GUIDE_RESULT_ATTR, None)
        stops = request.sampling_params.all_stop_token_ids if request.sampling_params is not None else ()
        return next_draft(guide.answer_ids if guide is not None else [], request.output_token_ids, k, stops)

    def _sgl_draft_limit(self, request: Request) -> int:
        """The request's own sgl_draft_tokens (on its image items), else the engine's draft_tokens."""
        most = getattr(request, "sgl_draft_limit", None)
        if most is None:
            own = request_field(request.mm_features, DRAFT_TOKENS_KWARG)
            most = request.sgl_draft_limit = self.sgl_config.draft_tokens if own is None else int(own)
        return most

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        """vLLM's per-step spec-decode counts, and per request for the trace the guide answer's share:
        the answer tokens proposed and, of them, accepted. The output is the one the drafts were
        proposed after (this step's tokens are appended later)."""
        request = self.requests.get(request_id)
        if request is not None:
            if self._sgl_runner.SCHEDULER_DRAFTS:
                drafted = self._sgl_step_drafts.get(request_id) or []
                proposed = sum(1 for t in drafted if t >= 0)  # not vLLM's -1 placeholders (nor grammar-invalid ones)
            else:  # the worker proposed answer tokens first, then filler, in num_draft_tokens slots
                guide = getattr(request, GUIDE_RESULT_ATTR, None)
                k = min(self._sgl_draft_limit(request), num_draft_tokens)
                proposed = answer_draft_len(guide.answer_ids, request.output_token_ids, k) if guide is not None else 0
            request.sgl_draft_proposed = getattr(request, "sgl_draft_proposed", 0) + proposed
            request.sgl_draft_accepted = getattr(request, "sgl_draft_accepted", 0) + min(num_accepted_tokens, proposed)
        return super().make_spec_decoding_stats(spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                                num_invalid_spec_tokens, request_id)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _free_request(self, request: Request, *args, **kwargs):
        out = super()._free_request(request, *args, **kwargs)
        self.sgl_trace.write(request)  # every finished request passes here, aborted ones too
        return out

    def sgl_num_in_guide_phase(self) -> int:
        return len(self.sgl_guide_queue) + len(self.sgl_in_guide)

    def get_request_counts(self) -> tuple[int, int]:
        num_running, num_waiting = super().get_request_counts()
        return num_running, num_waiting + self.sgl_num_in_guide_phase()

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        if finished and self.sgl_num_in_guide_phase():
            gone = {r.request_id for r in finished}
            self.sgl_guide_queue = deque(r for r in self.sgl_guide_queue if r.request_id not in gone)
            for request_id in gone:
                self.sgl_in_guide.pop(request_id, None)
        return finished


class SGLScheduler(SGLSchedulerMixin, Scheduler):
    pass


class SGLAsyncScheduler(SGLSchedulerMixin, AsyncScheduler):
    pass



def _outputs_for(outputs: dict[int, EngineCoreOutputs], client_index: int) -> EngineCoreOutputs:
    eco = outputs.get(client_index)
    if eco is None:
        eco = outputs[client_index] = EngineCoreOutputs()
    return eco
