"""The `--model-impl sgl` wrappers: a supported target (Qwen2-VL, Qwen2.5-VL) whose images are
pruned to the guide's keep set before they reach the language model.

Pieces, as in vLLM's own model files:
- SGLProcessorMixin: the multimodal processor emits k = max(1, floor(r * N)) placeholders per
  image (so the scheduler budgets and the paged KV cache hold the pruned length) and salts each
  image's cache identity with the prompt (a keep set depends on the whole prompt, not the image).
- SGLModelMixin: loads the guide beside the target in the worker; assigns keep sets (called by
  worker_hooks before the encoder runs); embed_multimodal gathers the kept embeddings of the
  target's own vision encoder and appends their unpruned M-RoPE positions; text positions are
  exact from the start because they never depend on which visual tokens are kept.
- One class per family at the bottom, registered by vllm_sgl.plugin.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)

from vllm_sgl.config import SGLConfig, keep_count
from vllm_sgl.protocol import (
    KEEP_KWARG,
    GuideFailure,
    GuideWork,
    attach_keep_sets,
    has_keep_set,
    has_keep_sets,
    has_pixels,
    image_features,
    visual_token_count,
)

logger = logging.getLogger("vllm_sgl")

# Test hook: the guide raises for every request whose (internal) id contains this string, so the
# engine's handling of a failing guide can be exercised on a real server. Unset in production.
FAIL_GUIDE_ENV = "VLLM_SGL_TEST_FAIL_GUIDE_FOR"

REQUEST_RATIO_KWARG = "sgl_keep_ratio"  # per request, through mm_processor_kwargs

# The keep ratio of the request being processed. A context variable rather than an attribute:
# one processor instance may serve concurrent requests.
_REQUEST_RATIO: contextvars.ContextVar[float | None] = contextvars.ContextVar("sgl_keep_ratio", default=None)


def parse_request_ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"mm_processor_kwargs.{REQUEST_RATIO_KWARG} must be a number in (0, 1], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Processor (front end)


class SGLProcessorMixin:
    def _sgl_config(self) -> SGLConfig | None:
        return getattr(self.info.ctx.model_config, "_vllm_sgl_config", None)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        cfg = self._sgl_config()
        if cfg is None:  # engine-core/worker copies profile with the full count: an upper bound
            return updates
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        image_token_id = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        request_ratio = _REQUEST_RATIO.get()
        ratio = cfg.keep_ratio if request_ratio is None else request_ratio

        def kept_placeholders(item_idx: int):
            n = visual_token_count(out_mm_kwargs["image"][item_idx], merge)
            return [image_token_id] * keep_count(n, ratio)

        return [u for u in updates if u.modality != "image"] + [
            PromptReplacement(modality="image", target=[image_token_id], replacement=kept_placeholders)
        ]

    def apply(self, inputs, timing_ctx):
        cfg = self._sgl_config()
        kwargs = dict(inputs.hf_processor_mm_kwargs or {})
        request_ratio = kwargs.pop(REQUEST_RATIO_KWARG, None)
        if request_ratio is not None:
            request_ratio = parse_request_ratio(request_ratio)  # a ValueError is the client's 400
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        images = inputs.mm_data_items.get("image") if inputs.mm_data_items else None
        if cfg is None or not images or len(images) == 0:
            return super().apply(inputs, timing_ctx)
        # The processor cache is keyed by image alone; with it, an image seen before would reach the
        # engine as a cache reference under the image-only key, while its encoder and prefix-cache
        # identity below must also depend on the prompt. Pixel processing is the cheap part here.
        token = _REQUEST_RATIO.set(request_ratio)
        try:
            out = super().apply(dataclasses.replace(inputs, cache=None), timing_ctx)
        finally:
            _REQUEST_RATIO.reset(token)
        hashes = out["mm_hashes"]
        salt = hashlib.sha256(
            json.dumps(
                [cfg.hash_salt(), list(out["prompt_token_ids"]), {m: list(h) for m, h in hashes.items()}]
            ).encode()
        ).hexdigest()[:32]
        out["mm_hashes"] = {
            m: ([f"{h}:sgl:{salt}" for h in hs] if m == "image" else hs) for m, hs in hashes.items()
        }
        return out


class SGLQwen2VLMultiModalProcessor(SGLProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class SGLQwen2_5_VLMultiModalProcessor(SGLProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


# ----------------------------------------------------------------------------------------------
# Positions


def media_positions(grid_thw: Sequence[int], merge: int, t_factor: float = 1.0) -> torch.Tensor:
    """(N, 4): each visual token's (t, h, w) M-RoPE offset from the media's first position, and in
    the 4th channel the offset of the text that follows (max over the grid + 1), as the runner's
    pruning path expects. Matches transformers' get_rope_index for images (t_factor 1)."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    grid = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    pos = torch.from_numpy(np.ascontiguousarray(grid.T)).long()
    span = int(pos.max()) + 1 if pos.numel() else 0
    return torch.cat([pos, torch.full((pos.shape[0], 1), span, dtype=torch.long)], dim=1)


# ----------------------------------------------------------------------------------------------
# Model (worker)


@dataclasses.dataclass
class _Tracked:
    prompt_len: int
    identifiers: list[str]  # image cache identities, for keep sets another request computed
    guide: Any = None  # GuideResult, when the guide ran for this request
    guide_phase: str | None = None  # "scheduler" (before the target's prefill) or "encode" (fallback)


class SGLModelMixin(SupportsMultiModalPruning):
    supports_multimodal_pruning = True

    def _sgl_init(self, vllm_config) -> None:
        from vllm_sgl import worker_hooks

        self.sgl_config = SGLConfig.from_additional_config(vllm_config.additional_config)
        self._sgl_guide_dir = self.sgl_config.check_pair(vllm_config.model_config.model)
        self._sgl_device = vllm_config.device_config.device
        self._sgl_dtype = vllm_config.model_config.dtype
        self._sgl_rank0 = True
        try:
            from vllm.distributed import get_tensor_model_parallel_rank

            self._sgl_rank0 = get_tensor_model_parallel_rank() == 0
        except Exception:  # noqa: BLE001 - no distributed state: single process
            pass
        self.sgl_guide = None  # loaded with the target's weights (load_weights)
        self.is_multimodal_pruning_enabled = True
        self._sgl_requests: dict[str, _Tracked] = {}
        self._sgl_guided: dict[str, Any] = {}  # guide-phase results of requests not yet tracked
        # What goes back to the scheduler on this step's output: guide-phase results and failures
        # of either path (taken by worker_hooks when the step's output is made).
        self._sgl_outbox: dict[str, Any] = {}
        self._sgl_fail_for = os.environ.get(FAIL_GUIDE_ENV) or None
        # Guide results by image cache identity. The identity is salted with the whole prompt, so a
        # request whose images were already encoded (encoder cache hit) gets the same result.
        self._sgl_guide_by_identifier: OrderedDict[str, Any] = OrderedDict()
        self._sgl_trace_lock = threading.Lock()
        worker_hooks.install()

    def _sgl_load_guide(self) -> None:
        from vllm_sgl.guide import Guide

        logger.info("SGL: loading guide %s", self._sgl_guide_dir)
        # A plain attribute (not a submodule): vLLM's loader checks the target's checkpoint covers
        # every registered parameter. Its weights are allocated inside load_model, so vLLM's memory
        # profiling counts them.
        object.__setattr__(
            self,
            "sgl_guide",
            Guide(
                self._sgl_guide_dir,
                device=self._sgl_device,
                dtype=self._sgl_dtype,
                max_tokens=self.sgl_config.guide_max_tokens,
                importance_backend=self.sgl_config.importance_backend,
            ),
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self._sgl_load_guide()
        return loaded

    # -- positions ----------------------------------------------------------------------------

    def _sgl_merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def _sgl_t_factor(self, feature) -> float:
        """Video frames are spaced by seconds-per-grid x tokens-per-second (Qwen2.5-VL only)."""
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", None)
        if feature.modality != "video" or tokens_per_second is None:
            return 1.0
        seconds = feature.data.get("second_per_grid_ts")
        return (float(seconds.data.item()) if seconds is not None else 1.0) * tokens_per_second

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions for the pruned prompt: text exact; a pruned image's placeholders get its first
        k grid positions until embed_multimodal delivers the kept tokens' own positions."""
        chunks: list[np.ndarray] = []
        st, next_pos = 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = f.mm_position.offset, f.mm_position.length
            text = offset - st
            chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
            next_pos += text
            grid = f.data[f"{f.modality}_grid_thw"].data.tolist()
            pos = media_positions(grid, self._sgl_merge(), self._sgl_t_factor(f)).numpy()
            chunks.append(pos[:length, :3].T + next_pos)
            next_pos += int(pos[0, 3]) if len(pos) else 0
            st = offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), dtype=np.int64)
        delta = int(positions.max()) + 1 - len(input_tokens) if positions.size else 0
        return torch.from_numpy(np.ascontiguousarray(positions)).long(), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Places the kept tokens' own positions (appended by embed_multimodal) at their
        placeholders. Text positions are exact already (get_mrope_input_positions), so nothing else
        moves. The embeddings are this step's slices of the request's media, in prompt order, from
        num_computed_tokens on (chunked prefill may split a media item)."""
        if not len(multimodal_embeddings):
            return multimodal_embeddings, mrope_positions, self._sgl_delta(mrope_positions, input_ids)
        ids = torch.as_tensor(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)
        media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        # Runs of media placeholders: (start, end)
        edges = torch.diff(torch.cat([torch.tensor([0]), media.int(), torch.tensor([0])]))
        runs = list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))
        runs = [(s, e) for s, e in runs if e > num_computed_tokens]
        positions = mrope_positions.clone()
        embeds = []
        for (start, end), mm in zip(runs, multimodal_embeddings):
            begin = max(start, num_computed_tokens)
            n = mm.shape[0]
            assert begin + n <= end, (begin, n, start, end)
            base = positions[0, start - 1] + 1  # the token before a media run is vision_start
            rel = mm[:, -4:-1].round().long().T.to(positions.device)
            positions[:, begin : begin + n] = rel + base
            embeds.append(mm[:, :-4])
        return embeds, positions, self._sgl_delta(positions, input_ids)

    @staticmethod
    def _sgl_delta(positions, input_ids) -> int:
        return int(positions.max()) + 1 - len(input_ids) if positions.numel() else 0

    # -- embeddings ---------------------------------------------------------------------------

    def _sgl_keep_list(self, keep, grids: list[list[int]]) -> list[torch.Tensor]:
        merge = self._sgl_merge()
        sizes = [int(np.prod(g)) // (merge * merge) for g in grids]
        if keep is None:
            # Profiling / warm-up dummies: no request, so no guide answer; keep the first k.
            return [torch.arange(keep_count(n, self.sgl_config.keep_ratio)) for n in sizes]
        if isinstance(keep, torch.Tensor):
            keep = list(keep.unbind(0))
        return list(keep)

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_KWARG, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not by_modality:
            return []
        merge = self._sgl_merge()
        out: tuple[torch.Tensor, ...] = ()
        for modality, mm_input in by_modality.items():
            grids = mm_input[f"{modality}_grid_thw"].tolist()
            if modality == "image":
                embeds = self._process_image_input(mm_input)
                keeps = self._sgl_keep_list(keep, grids)
                for emb, grid, k in zip(embeds, grids, keeps):
                    k = k.to(emb.device)
                    pos = media_positions(grid, merge).to(emb.device)
                    out += (torch.cat([emb[k], pos[k].to(emb.dtype)], dim=1),)
            else:  # videos pass through unpruned; positions appended for the runner's pruning path
                embeds = self._process_video_input(mm_input)
                seconds = mm_input.get("second_per_grid_ts") if hasattr(mm_input, "get") else None
                tps = getattr(self.config.vision_config, "tokens_per_second", None)
                for i, (emb, grid) in enumerate(zip(embeds, grids)):
                    t_factor = float(seconds[i]) * tps if (seconds is not None and tps) else 1.0
                    pos = media_positions(grid, merge, t_factor).to(emb.device)
                    out += (torch.cat([emb, pos.to(emb.dtype)], dim=1),)
        return out

    # -- the guide ----------------------------------------------------------------------------

    def _sgl_guide_request(self, request_id: str, prompt: Sequence[int], images):
        """The guide's input: the full prompt (every image with all N of its visual tokens) and
        the request's pixels, normalised as the target would."""
        from vllm_sgl.guide import GuideRequest

        merge = self._sgl_merge()
        full: list[int] = []
        st = 0
        prompt = list(prompt)
        for f in images:
            o, k = f.mm_position.offset, f.mm_position.length
            n = visual_token_count(f.data, merge)
            full += prompt[st:o] + [self.config.image_token_id] * n
            st = o + k
        full += prompt[st:]
        pixels = torch.cat([f.data["pixel_values"].data for f in images])
        # vLLM ships raw pixels and normalises on device; guide and target share the image
        # processor (checked at start-up), so the target's input norm is the guide's too.
        pixels = self.visual.input_norm(pixels.to(self._sgl_device), self._sgl_dtype)
        return GuideRequest(
            request_id=request_id,
            prompt_ids=full,
            pixel_values=pixels,
            image_grid_thw=torch.stack([f.data["image_grid_thw"].data for f in images]),
            keep_counts=[f.mm_position.length for f in images],
        )

    def _sgl_run_guide(self, items) -> dict[str, Any]:
        """items: (request_id, prompt_token_ids, image features). One batched guide call; if it
        raises, each request alone, so a request the guide cannot serve fails by itself and the
        others (and the engine) go on. Returns {request_id: GuideResult | GuideFailure}."""
        try:
            results = self._sgl_guide_batch(items)
        except Exception as exc:  # noqa: BLE001 - isolate below
            if len(items) == 1:
                logger.exception("SGL: the guide failed for request %s", items[0][0])
                results = {items[0][0]: GuideFailure(items[0][0], f"{type(exc).__name__}: {exc}")}
            else:
                logger.warning("SGL: a batched guide call of %d requests failed (%s: %s); running them "
                               "one by one", len(items), type(exc).__name__, exc)
                results = {}
                for item in items:
                    results.update(self._sgl_run_guide([item]))
            return results
        for req_id, _, images in items:
            res = results[req_id]
            for f in images:
                self._sgl_guide_by_identifier[f.identifier] = res
                self._sgl_guide_by_identifier.move_to_end(f.identifier)
            tracked = self._sgl_requests.get(req_id)
            if tracked is not None:
                tracked.guide = res
            else:  # guide phase: the request reaches this worker later, or never (aborted)
                self._sgl_guided[req_id] = res
        while len(self._sgl_guide_by_identifier) > 4096:
            self._sgl_guide_by_identifier.popitem(last=False)
        return results

    def _sgl_guide_batch(self, items) -> dict[str, Any]:
        requests = []
        for req_id, prompt, images in items:
            if self._sgl_fail_for is not None and self._sgl_fail_for in req_id:
                raise RuntimeError(f"{FAIL_GUIDE_ENV}: injected guide failure for request {req_id}")
            requests.append(self._sgl_guide_request(req_id, prompt, images))
        results = self.sgl_guide.run(requests)
        logger.debug("SGL guide: %d request(s) in %.3f s", len(results), results[0].step_seconds if results else 0)
        return {r.request_id: r for r in results}

    def sgl_guide_phase(self, work: Sequence[GuideWork]) -> None:
        """The scheduler's guide phase (vllm_sgl.scheduler): results go back to the scheduler,
        which attaches the keep sets before the request may be scheduled for the target."""
        results = self._sgl_run_guide([(w.request_id, w.prompt_token_ids, w.images) for w in work])
        for req_id, res in results.items():
            # Importance stays here (trace); the scheduler needs the answer and the keep sets.
            self._sgl_outbox[req_id] = res if isinstance(res, GuideFailure) else dataclasses.replace(res, importance=[])

    def sgl_take_outbox(self) -> dict[str, Any]:
        out, self._sgl_outbox = self._sgl_outbox, {}
        return out

    def _sgl_known_result(self, req_id: str, images) -> Any:
        """The guide's result for this request if it exists already: the request's own, or that of
        an identical earlier request (image identities are salted with the whole prompt)."""
        tracked = self._sgl_requests.get(req_id)
        if tracked is not None and tracked.guide is not None:
            return tracked.guide
        found = [self._sgl_guide_by_identifier.get(f.identifier) for f in images]
        if found and all(r is not None and r is found[0] for r in found):
            return found[0]
        return None

    def sgl_assign_keep_sets(self, requests: Mapping[str, Any], scheduled: Mapping[str, list[int]]) -> None:
        """Before the step's encoder runs, every image about to be encoded gets its keep set.

        Normally the scheduler attached it in the guide phase, and it stays on the item for every
        later encode (re-encode after eviction, preemption, later chunks), so nothing runs here.
        A request that skipped the guide phase uses its guide result if one exists, else the
        guide runs now on the request's pixels, batched over such requests. A request whose guide
        fails, or whose pixels vLLM already dropped, is reported to the scheduler, which finishes
        it with an error; its images get placeholder keep sets so this step stays well-formed."""
        todo, failed, encoding = [], {}, {}
        for req_id, input_ids in scheduled.items():
            state = requests[req_id]
            enc = [state.mm_features[i] for i in input_ids if state.mm_features[i].modality == "image"]
            if all(has_keep_set(f) for f in enc):
                continue
            encoding[req_id] = enc
            images = image_features(state.mm_features)
            known = self._sgl_known_result(req_id, images)
            if known is not None:
                attach_keep_sets(images, known.keep_indices)
            elif all(has_pixels(f) for f in images):
                todo.append((req_id, state.prompt_token_ids, images))
            else:
                failed[req_id] = GuideFailure(
                    req_id, "no keep set, and the guide cannot run: vLLM dropped the pixels of an image "
                    "covered by the prefix cache",
                )
        if todo:
            results = self._sgl_run_guide(todo)
            for req_id, _, images in todo:
                if isinstance(results[req_id], GuideFailure):
                    failed[req_id] = results[req_id]
                else:
                    attach_keep_sets(images, results[req_id].keep_indices)
        for req_id, failure in failed.items():
            missing = [f for f in encoding[req_id] if not has_keep_set(f)]
            attach_keep_sets(missing, [torch.arange(f.mm_position.length) for f in missing])
            self._sgl_outbox[req_id] = failure

    def sgl_track(self, new_requests) -> None:
        for r in new_requests:
            images = image_features(r.mm_features)
            self._sgl_requests[r.req_id] = _Tracked(
                prompt_len=len(r.prompt_token_ids or []),
                identifiers=[f.identifier for f in images],
                guide=self._sgl_guided.pop(r.req_id, None),
                # Keep sets already attached when the target first sees the request: the guide
                # ran in the scheduler's guide phase, before this prefill was scheduled.
                guide_phase=(
                    None if not images else "scheduler" if has_keep_sets(images) else "encode"
                ),
            )

    def sgl_finish(self, finished_req_ids) -> None:
        trace = self.sgl_config.trace_path
        lines = []
        for req_id in finished_req_ids:
            self._sgl_guided.pop(req_id, None)
            tracked = self._sgl_requests.pop(req_id, None)
            if tracked is None or not trace or not self._sgl_rank0:
                continue
            g, ran = tracked.guide, tracked.guide is not None
            if g is None and tracked.identifiers:
                g = self._sgl_guide_by_identifier.get(tracked.identifiers[0])
            lines.append(
                json.dumps(
                    {
                        "request_id": req_id,
                        "num_visual_tokens": g.num_visual_tokens if g else [],
                        "keep_indices": [k.tolist() for k in g.keep_indices] if g else [],
                        "guide_answer_ids": g.answer_ids if g else [],
                        "guide_finished": g.finished if g else None,
                        "guide_confidence": g.confidence if g else None,
                        "guide_step_seconds": g.step_seconds if ran else None,
                        "target_prompt_len": tracked.prompt_len,
                        "guide_ran": ran,  # false: no images, or results reused from the cache
                        "guide_phase": tracked.guide_phase,
                    }
                )
            )
        if lines:
            try:
                with self._sgl_trace_lock, open(os.path.expanduser(trace), "a") as f:
                    f.write("\n".join(lines) + "\n")
            except OSError as exc:  # a full disk must not take the engine down
                logger.warning("SGL: could not write %d trace line(s) to %s: %s", len(lines), trace, exc)


@MULTIMODAL_REGISTRY.register_processor(
    SGLQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class SGLQwen2_5_VLForConditionalGeneration(SGLModelMixin, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._sgl_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    SGLQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class SGLQwen2VLForConditionalGeneration(SGLModelMixin, Qwen2VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._sgl_init(vllm_config)
