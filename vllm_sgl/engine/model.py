"""The `--model-impl sgl` wrappers: a supported target (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and
MoE, InternVL) whose images and videos are pruned to the guide's keep set before they reach the
language model.

Pieces, as in vLLM's own model files:
- SGLProcessorMixin: the multimodal processor emits k = max(1, floor(r * N)) placeholders per
  image (so the scheduler budgets and the paged KV cache hold the pruned length), per video or per
  video frame where the frames are runs of their own (docs/VIDEO.md), and salts each item's cache
  identity with the prompt (a keep set depends on the whole prompt, not the image).
- SGLModelMixin: embed_multimodal gathers the kept embeddings (the keep set rides on each image
  item) of the target's own vision encoder; get_mrope_input_positions gives every kept token its
  unpruned M-RoPE position from the keep set, as integers on the host (exact in any model dtype;
  text positions never depend on which visual tokens are kept).
  Its `supports_sgl` marker makes the model runner own a GuideRunner (vllm_sgl.engine.runners: on
  Model Runner V2 through the model's own state class, get_model_state_cls); the model itself holds
  no guide state.
- One class per family at the bottom, registered by vllm_sgl.engine.plugin. Qwen3-VL's deepstack
  features ride in the same rows as the visual embeddings (vLLM concatenates them along the hidden
  dimension), so gathering the kept rows prunes both with one keep set.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
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
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo

from vllm_sgl.engine.config import (DRAFT_TOKENS_KWARG, IMPORTANCE_KWARG, ITEM_KWARGS, REQUEST_KWARGS, SGLConfig,
                                    parse_request_fields)
from vllm_sgl.pruning import IMPORTANCES
from vllm_sgl.engine.protocol import (
    HASH_MARK, KEEP_KWARG, PRUNED_MODALITIES, REQUEST_RATIO_KWARG, SEE_THRESHOLD_KWARG, embed_runs,
    item_grid, item_visual_tokens, keep_counts, kept_per_run,
)
from vllm_sgl.pruning import keep_count, media_positions

logger = logging.getLogger("vllm_sgl")

# The keep ratio of the request being processed. A context variable rather than an attribute:
# one processor instance may serve concurrent requests.
_REQUEST_RATIO: contextvars.ContextVar[float | None] = contextvars.ContextVar("sgl_keep_ratio", default=None)


_ABSENT = object()
# True while vLLM builds profiling dummies: an upper bound of encoder memory, not a request, so the
# guide's per-request budget does not apply (a dummy video is as long as max_model_len allows).
_PROFILING: contextvars.ContextVar[bool] = contextvars.ContextVar("sgl_profiling", default=False)


def _room_for_unpruned_positions() -> None:
    """Qwen3-VL sizes its rotary table at max_position_embeddings x mrope_positions_factor, 1 unless
    video pruning is on. A pruned prompt keeps its unpruned positions, which run past its token
    count (an image spans max(h, w) positions but keeps k tokens), so near max_model_len they would
    index past the table: SGL targets get the factor 4 the Qwen2 families have."""
    from vllm.model_executor.models import qwen3_vl, qwen3_vl_moe

    original = qwen3_vl.mrope_positions_factor
    if getattr(original, "_vllm_sgl", False):
        return

    def factor(vllm_config) -> int:
        base = original(vllm_config)
        sgl = getattr(getattr(vllm_config, "model_config", None), "model_impl", None) == "sgl"
        return max(base, 4) if sgl else base

    factor._vllm_sgl = True
    qwen3_vl.mrope_positions_factor = qwen3_vl_moe.mrope_positions_factor = factor


_room_for_unpruned_positions()


# ----------------------------------------------------------------------------------------------
# Processor (front end)


class SGLProcessorMixin:
    def _sgl_config(self) -> SGLConfig | None:
        return getattr(self.info.ctx.model_config, "_vllm_sgl_config", None)

    def get_dummy_mm_inputs(self, *args, **kwargs):
        token = _PROFILING.set(True)
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _PROFILING.reset(token)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        cfg = self._sgl_config()
        if cfg is None:  # engine-core/worker copies profile with the full count: an upper bound
            return updates
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        request_ratio = _REQUEST_RATIO.get()
        ratio = cfg.keep_ratio if request_ratio is None else request_ratio
        hf_config = self.info.get_hf_config()
        # Every image and video item: k = keep_count(N, r) of its N tokens (a video's budget is the
        # whole video's, one keep set over all its frames: docs/VIDEO.md, "The budget"), per frame
        # where the frames are runs of their own (Qwen3-VL, InternVL: protocol.keep_counts).
        pruned = {m: vocab[getattr(hf_processor, f"{m}_token")] for m in PRUNED_MODALITIES if m in out_mm_kwargs}

        def kept_placeholders(modality: str):
            def replacement(item_idx: int):
                item = out_mm_kwargs[modality][item_idx]
                counts = keep_counts(item, modality, hf_config, ratio)
                return self._sgl_placeholder(hf_processor, pruned[modality], counts, item)
            return replacement

        targets = {u.modality: u.target for u in updates}
        return [u for u in updates if u.modality not in pruned] + [
            PromptReplacement(modality=m, target=self._sgl_target(m, token, targets), replacement=kept_placeholders(m))
            for m, token in pruned.items()
        ]

    def _sgl_target(self, modality: str, token_id: int, targets: dict):
        """What a pruned item's placeholder replaces in the prompt (Qwen: its one media token)."""
        return [token_id]

    def _sgl_check_guide_budget(self, prompt_len: int, items, ratio: float) -> None:
        """The guide reads a request whole in one engine step, within the step's token budget
        (vllm_sgl.engine.scheduler), and its workspace is sized for that budget: a request whose
        guide prompt alone exceeds it is refused here, a 400 saying why (never an oversized step)."""
        budget = getattr(self.info.ctx.model_config, "_vllm_sgl_guide_tokens", None)
        if budget is None or _PROFILING.get():
            return
        config = self.info.get_hf_config()
        sizes = [item_visual_tokens(item, config) for _, item in items]
        need = prompt_len + sum(sizes) - sum(sum(keep_counts(item, m, config, ratio)) for m, item in items)
        if need > budget:
            raise ValueError(
                f"the guide reads this request as {need} tokens (its prompt with every image at its full "
                f"{'/'.join(str(n) for n in sizes)} visual tokens), more than the {budget} it reads in one "
                "engine step (the SGL setting guide_step_tokens, by default --max-num-batched-tokens): send "
                f"smaller or fewer images or shorter videos, or start the server with guide_step_tokens {need} or more")

    def _sgl_placeholder(self, hf_processor, token_id: int, counts: list[int], item):
        """An item's placeholder with counts[i] media tokens in its i-th run (Qwen: the tokens alone)."""
        return [token_id] * sum(counts)

    def apply(self, inputs, timing_ctx):
        cfg = self._sgl_config()
        kwargs = dict(inputs.hf_processor_mm_kwargs or {})
        # The per-request SGL fields (a ValueError is the client's 400, for that request only).
        fields = parse_request_fields(kwargs, draft_most=cfg.draft_tokens if cfg is not None else None)
        request_ratio = fields.get(REQUEST_RATIO_KWARG)
        see = fields.get(SEE_THRESHOLD_KWARG, _ABSENT)
        for name in REQUEST_KWARGS:
            kwargs.pop(name, None)
        if len(kwargs) != len(inputs.hf_processor_mm_kwargs or {}):
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        items = inputs.mm_data_items
        if cfg is None or not items or not any(len(items.get(m) or ()) for m in PRUNED_MODALITIES if m in items):
            return _with_reason(super().apply, inputs, timing_ctx)
        _check_videos(items.get("video"))
        # The processor cache is keyed by the media alone; with it, an image seen before would reach
        # the engine as a cache reference under the media-only key, while its encoder and prefix-cache
        # identity below must also depend on the prompt. Pixel processing is the cheap part here.
        token = _REQUEST_RATIO.set(request_ratio)
        try:
            out = _with_reason(super().apply, dataclasses.replace(inputs, cache=None), timing_ctx)
        finally:
            _REQUEST_RATIO.reset(token)
        visual = [(m, item) for m in PRUNED_MODALITIES for item in out["mm_kwargs"].get(m, ())]
        self._sgl_check_guide_budget(len(out["prompt_token_ids"]), visual,
                                     cfg.keep_ratio if request_ratio is None else request_ratio)
        hashes = out["mm_hashes"]
        # The keep rule decides which tokens the target's KV holds: part of the items' identity.
        importance = fields.get(IMPORTANCE_KWARG, cfg.importance)
        salt = hashlib.sha256(
            json.dumps(
                [cfg.hash_salt(), importance, list(out["prompt_token_ids"]), {m: list(h) for m, h in hashes.items()}]
            ).encode()
        ).hexdigest()[:32]
        out["mm_hashes"] = {
            m: ([f"{h}{HASH_MARK}{salt}" for h in hs] if m in PRUNED_MODALITIES else hs) for m, hs in hashes.items()
        }
        # The scheduler reads these from the request's image and video items.
        on_items = {}
        if see is not _ABSENT:
            on_items[SEE_THRESHOLD_KWARG] = torch.tensor(float("nan") if see is None else see)
        if DRAFT_TOKENS_KWARG in fields:
            on_items[DRAFT_TOKENS_KWARG] = torch.tensor(fields[DRAFT_TOKENS_KWARG])
        if IMPORTANCE_KWARG in fields:  # the guide reads it (as an index into IMPORTANCES)
            on_items[IMPORTANCE_KWARG] = torch.tensor(IMPORTANCES.index(fields[IMPORTANCE_KWARG]))
        for name, value in on_items.items():
            for _, item in visual:
                item[name] = MultiModalFieldElem(data=value, field=MultiModalBatchedField(keep_on_cpu=True))
        return out


def _check_videos(videos) -> None:
    """A video without frames is the client's error (a 400); the HF processor would divide by zero."""
    for i in range(len(videos) if videos is not None else 0):
        video = videos.get(i)  # frames, or (frames, metadata)
        frames = video[0] if isinstance(video, tuple) else video
        if frames is not None and len(frames) == 0:
            raise ValueError(f"video {i} of this request has no frames; a video needs at least one frame")


def _with_reason(apply, *args):
    """vLLM reports an input the HF processor refuses as "Failed to apply <Processor> on data=...
    with kwargs=...", the reason only in the exception's cause (e.g. an image of 300 x 1 px: "absolute
    aspect ratio must be smaller than 200"). The client's 400 says the reason."""
    try:
        return apply(*args)
    except ValueError as exc:
        cause, text = exc.__cause__, str(exc)
        if cause is None or not text.startswith("Failed to apply "):
            raise
        raise ValueError(f"{text.split()[3]} refused this request's input: {cause}") from exc


def _kept_rows(embeds, keeps) -> tuple[torch.Tensor, ...]:
    """Each image's kept rows (its keep set, in order) with one host-to-device copy for all the
    keep sets of the call: a blocking copy per image would stall the host at every image."""
    if not len(embeds):
        return ()
    device = embeds[0].device
    index = torch.cat([torch.as_tensor(k, dtype=torch.long) for k in keeps])
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    else:
        index = index.to(device)
    return tuple(emb[k] for emb, k in zip(embeds, index.split([len(k) for k in keeps])))


class SGLQwen2VLMultiModalProcessor(SGLProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class SGLQwen2_5_VLMultiModalProcessor(SGLProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


class SGLQwen3VLMultiModalProcessor(SGLProcessorMixin, Qwen3VLMultiModalProcessor):

    def _sgl_target(self, modality: str, token_id: int, targets: dict):
        # A video's placeholder is vLLM's (with or without its vision start and end, by release)
        return targets[modality] if modality == "video" else [token_id]

    def _sgl_placeholder(self, hf_processor, token_id: int, counts: list[int], item):
        """A video: vLLM's layout (each frame's timestamp text, vision start, its k_f video tokens,
        vision end), the frames' runs marked as embeddings."""
        if len(counts) == 1 and "timestamps" not in item:
            return [token_id] * counts[0]
        config = self.info.get_hf_config()
        return self.get_video_repl(
            tokens_per_frame=counts, timestamps=item["timestamps"].data, tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            video_token_id=token_id, select_token_id=True,
        )


class SGLInternVLMultiModalProcessor(SGLProcessorMixin, InternS1MultiModalProcessor):

    def _sgl_placeholder(self, hf_processor, token_id: int, counts: list[int], item):
        start, end = hf_processor.start_image_token_id, hf_processor.end_image_token_id
        if "video_num_patches" not in item:
            return PromptUpdateDetails.select_token_id([start, *[token_id] * sum(counts), end], token_id)
        # A video: vLLM's layout, "Frame{i}: <img>" + its k_f video tokens + "</img>", frames joined by
        # newlines (tokenized as vLLM does, the whole text at once)
        tok = hf_processor.start_image_token + "{}" + hf_processor.end_image_token
        text = "\n".join(f"Frame{i + 1}: " + tok.format(hf_processor.video_token * k) for i, k in enumerate(counts))
        ids = self.info.get_tokenizer().encode(text, add_special_tokens=False)
        return PromptUpdateDetails.select_token_id(ids, token_id)


# ----------------------------------------------------------------------------------------------
# Positions


# ----------------------------------------------------------------------------------------------
# Model (worker)


class SGLModelMixin:
    # Positions come from the keep set, as integers on the host (get_mrope_input_positions), never
    # through the embeddings: vLLM's multimodal-pruning path (video EVS) carries them as extra
    # embedding channels in the model's dtype, where bf16 rounds integers above 256.
    supports_multimodal_pruning = False
    # The capability marker the runner adapters look for (vllm_sgl.engine.runners.supports_sgl):
    # the runner then owns a GuideRunner for this model. No import between the two.
    supports_sgl = True

    def get_model_state_cls(self):
        """Model Runner V2's extension point for per-model behaviour (vLLM 0.34): the SGL model
        state owns the guide (vllm_sgl.engine.runners.mrv2)."""
        from vllm_sgl.engine.runners import mrv2

        return mrv2.model_state_cls()

    def _sgl_init(self, vllm_config) -> None:
        self.sgl_config = SGLConfig.from_additional_config(vllm_config.additional_config)
        self._sgl_model_path = vllm_config.model_config.model

    # -- positions ----------------------------------------------------------------------------

    def _sgl_merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def sgl_t_factor(self, feature) -> float:
        """Video frames are spaced by seconds-per-grid x tokens-per-second (Qwen2.5-VL only)."""
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", None)
        if feature.modality != "video" or tokens_per_second is None:
            return 1.0
        seconds = feature.data.get("second_per_grid_ts")
        return (float(seconds.data.item()) if seconds is not None else 1.0) * tokens_per_second

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions for the pruned prompt: text exact; an image whose keep set is known (the guide
        phase attaches it before the request reaches a worker) gets its kept tokens' own grid
        positions, so they are exact on every rank, pipeline stages that never run the encoder
        included. Without a keep set yet (the encode-time fallback) the placeholders get the first
        k grid positions; the runner adapter asks again once the fallback attached the keep set,
        before that step's forward (vllm_sgl.engine.runners)."""
        chunks: list[np.ndarray] = []
        st, next_pos = 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            runs = embed_runs(f)  # one, or one per frame (Qwen3-VL: each an image of grid (1, h, w))
            t, h, w = item_grid(f.data)
            grid, t_factor = ((1, h, w), 1.0) if len(runs) > 1 else ((t, h, w), self.sgl_t_factor(f))
            pos = media_positions(grid, self._sgl_merge(), t_factor).numpy()
            for (lead, k), mine in zip(runs, kept_per_run(f, len(pos))):
                text = f.mm_position.offset + lead - st  # text before the run (a frame's timestamp)
                chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
                next_pos += text
                chunks.append(pos[mine, :3].T + next_pos)
                next_pos += int(pos[0, 3]) if len(pos) else 0
                st = f.mm_position.offset + lead + k
        if st < len(input_tokens):
            text = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), dtype=np.int64)
        delta = int(positions.max()) + 1 - len(input_tokens) if positions.size else 0
        return torch.from_numpy(np.ascontiguousarray(positions)).long(), delta

    @staticmethod
    def _sgl_delta(positions, input_ids) -> int:
        return int(positions.max()) + 1 - len(input_ids) if positions.numel() else 0

    # -- embeddings ---------------------------------------------------------------------------

    def _sgl_keep_list(self, keep, grids: list[list[int]]) -> list[torch.Tensor]:
        merge = self._sgl_merge()
        sizes = [int(np.prod(g)) // (merge * merge) for g in grids]
        if keep is None:
            # Profiling / warm-up dummies: no request, so no guide answer; keep the first k (for
            # memory only: profiling never places these rows, so a per-frame video's count may differ).
            return [torch.arange(keep_count(n, self.sgl_config.keep_ratio)) for n in sizes]
        if isinstance(keep, torch.Tensor):
            keep = list(keep.unbind(0))
        return list(keep)

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_KWARG, None)
        for name in ITEM_KWARGS:  # the scheduler's and the guide's, not the encoder's
            kwargs.pop(name, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not by_modality:
            return []
        out: tuple[torch.Tensor, ...] = ()
        # vLLM encodes one modality per call (its items in prompt order), so the call's keep sets
        # are that modality's items'.
        for modality, mm_input in by_modality.items():
            if modality == "image":
                embeds, grids = self._process_image_input(mm_input), mm_input["image_grid_thw"]
            else:
                embeds, grids = self._process_video_input(mm_input), mm_input["video_grid_thw"]
            out += _kept_rows(embeds, self._sgl_keep_list(keep, grids.tolist()))
        return out

    # -- what the guide runner needs from the target -------------------------------------------

    def sgl_normalize_pixels(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The target's pixel normalisation: vLLM ships raw pixels and normalises them on the
        device; guide and target share the image processor (checked at start-up), so this is
        the guide's input too. A later pipeline stage has no vision weights (vLLM 0.34 leaves the
        norm's buffers on the meta device) yet runs the guide phase: there the same per-channel
        map, x * rescale / std - mean / std, from the processor's settings."""
        norm = self.visual.input_norm
        if not getattr(getattr(norm, "weight", None), "is_meta", False):
            return norm(pixels, dtype)
        if getattr(self, "_sgl_pixel_affine", None) is None:
            from transformers import AutoImageProcessor

            p = AutoImageProcessor.from_pretrained(self._sgl_model_path)
            scale = float(p.rescale_factor) if p.do_rescale else 1.0
            mean = [float(m) for m in p.image_mean] if p.do_normalize else [0.0] * 3
            std = [float(s) for s in p.image_std] if p.do_normalize else [1.0] * 3
            self._sgl_pixel_affine = (torch.tensor([scale / s for s in std]), torch.tensor([-m / s for m, s in zip(mean, std)]))
        weight, bias = (t.to(pixels.device) for t in self._sgl_pixel_affine)
        x = pixels.float().reshape(pixels.shape[0], len(weight), -1)  # (patches, C, L), as vLLM lays them out
        return (x * weight.view(1, -1, 1) + bias.view(1, -1, 1)).reshape(pixels.shape).to(dtype)


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


@MULTIMODAL_REGISTRY.register_processor(
    SGLQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SGLQwen3VLForConditionalGeneration(SGLModelMixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._sgl_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    SGLQwen3VLMultiModalProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SGLQwen3VLMoeForConditionalGeneration(SGLModelMixin, Qwen3VLMoeForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._sgl_init(vllm_config)


# ----------------------------------------------------------------------------------------------
# InternVL (transformers format; vLLM serves it as InternS1ForConditionalGeneration)


class SGLInternVLProcessingInfo(InternS1ProcessingInfo):
    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        """A whole image's or video's embeddings: the encoder cache must hold an item at any
        per-request keep ratio up to 1 (without this vLLM sizes it from dummy inputs, pruned at the
        engine's ratio)."""
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return {"image": self.get_max_image_tokens(),
                "video": frames * self.get_hf_processor().image_seq_length}


class _PositionedInternS1(InternS1ForConditionalGeneration, SupportsMRoPE):
    """vLLM's class with the M-RoPE capability it lacks declared after it in the MRO (a protocol
    before nn.Module would swallow nn.Module.__init__)."""


@MULTIMODAL_REGISTRY.register_processor(
    SGLInternVLMultiModalProcessor,
    info=SGLInternVLProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class SGLInternVLForConditionalGeneration(SGLModelMixin, _PositionedInternS1):
    """InternVL has 1D RoPE, but a kept token must keep its unpruned position while vLLM numbers a
    request's tokens consecutively. The plugin gives its config an M-RoPE section (vllm_sgl.engine.
    plugin), so the runner asks get_mrope_input_positions for positions (three equal rows) and
    forward hands the language model the first row; its RoPE is unchanged."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._sgl_init(vllm_config)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """<img> at p, kept token j at p + 1 + keep[j], </img> at p + 1 + N, text on from p + N + 2;
        a video's frames ("FrameI: <img>...</img>") each so, with its own keep set of its N / frames."""
        pos: list[np.ndarray] = []
        st, next_pos = 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            runs = embed_runs(f)
            n = item_visual_tokens(f.data, self.config) // len(runs)  # tokens per run, unpruned
            for (lead, k), mine in zip(runs, kept_per_run(f, n)):
                text = f.mm_position.offset + lead - st  # the text before, and <img>
                pos.append(np.arange(text) + next_pos)
                next_pos += text
                pos.append(mine + next_pos)
                next_pos += n
                st = f.mm_position.offset + lead + k
        pos.append(np.arange(len(input_tokens) - st) + next_pos)
        flat = np.concatenate(pos).astype(np.int64)
        positions = torch.from_numpy(np.broadcast_to(flat, (3, flat.size)).copy())
        return positions, self._sgl_delta(positions, input_tokens)

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_KWARG, None)
        for name in ITEM_KWARGS:
            kwargs.pop(name, None)
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        # vLLM encodes one modality per call, its items in prompt order: the call's keep sets are theirs
        embeds = tuple(e for m in ("images", "videos") if modalities.get(m) is not None
                       for e in self._process_vision_input(modalities[m]))
        if not embeds:
            return []
        if keep is None:  # profiling / warm-up dummies: keep the first k
            keeps = [torch.arange(keep_count(e.shape[0], self.sgl_config.keep_ratio)) for e in embeds]
        else:
            keeps = list(keep.unbind(0)) if isinstance(keep, torch.Tensor) else list(keep)
        return _kept_rows(embeds, keeps)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if positions.ndim == 2:  # the M-RoPE channel's rows are equal: the 1D positions
            positions = positions[0]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def sgl_normalize_pixels(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return pixels.to(dtype)  # vLLM's InternVL processor ships normalised pixels
