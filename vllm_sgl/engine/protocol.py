"""What the SGL scheduler and the worker's guide hand each other (kept light: the engine core
imports it without the model).

One request's guide phase:
- the scheduler attaches a list of GuideWork to a SchedulerOutput (attribute GUIDE_WORK);
- the worker runs the guide on them before the step's target forward and returns
  {request_id: GuideResult} on that step's ModelRunnerOutput (attribute GUIDE_RESULTS);
- the scheduler writes each image's keep indices into the image item (KEEP_KWARG), where the
  wrapper's embed_multimodal finds them whenever the target encodes the image: the first prefill,
  a re-encode after encoder-cache eviction, preemption, a later chunk. The keep set is a CPU-side
  field, so it survives vLLM stripping a prefix-cache-covered item's pixels
  (strip_covered_mm_data): the guide never needs pixels vLLM has dropped.
A request the guide could not serve comes back as a GuideFailure; the scheduler finishes it with
an error and every other request goes on.
Both carriers are pickled between processes (multiproc executor), so extra attributes travel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The per-request fields (mm_processor_kwargs; parsed in vllm_sgl.engine.config). The SEE threshold
# (NaN for null) and the draft length ride to the scheduler on each image item, in fields of the
# same names.
from vllm_sgl.engine.config import DRAFT_TOKENS_KWARG, REQUEST_RATIO_KWARG, SEE_THRESHOLD_KWARG  # noqa: F401
from vllm_sgl.pruning import keep_count, visual_token_count

KEEP_KWARG = "sgl_keep"  # per image / video item: LongTensor of kept indices into its N visual tokens
PRUNED_MODALITIES = ("image", "video")
GRID_KEYS = ("image_grid_thw", "video_grid_thw")  # an item's (t, h, w) patch grid, by modality
# An SGL image item's hash is its image hash + HASH_MARK + a salt of the prompt (SGLProcessorMixin);
# the front end never sends such an item as a processor-cache reference.
HASH_MARK = ":sgl:"
GUIDE_WORK = "sgl_guide_work"  # on SchedulerOutput: list[GuideWork]
# on SchedulerOutput: {request_id: GuideResult} of the step's new requests whose guide result the
# scheduler reused from an identical earlier request (the worker never ran the guide for them)
GUIDE_KNOWN = "sgl_guide_known"
GUIDE_RESULTS = "sgl_guide_results"  # on ModelRunnerOutput: dict[request_id, GuideResult]


@dataclass
class GuideWork:
    request_id: str
    prompt_token_ids: list[int]  # the target's (pruned) prompt: k placeholders per image
    images: list[Any]  # the request's image MultiModalFeatureSpecs, in prompt order, with data
    see: bool = False  # the request may exit early: the guide also runs its consistency pass


@dataclass
class GuideFailure:
    """The guide could not produce keep sets for this request (the scheduler finishes it with an
    error; nothing else is affected)."""

    request_id: str
    message: str


def item_grid(item) -> list[int] | None:
    """The (t, h, w) patch grid of an image or video item (Qwen families); None for tiles."""
    for name in GRID_KEYS:
        if name in item:
            return item[name].data.tolist()
    return None


def item_visual_tokens(item, config) -> int:
    """N of one image or video item (its MultiModalKwargsItem), before any pruning: from its grid
    (Qwen families), or its tiles x image_seq_length (InternVL). config: the target's hf_config."""
    grid = item_grid(item)
    if grid is not None:
        return visual_token_count(grid, int(config.vision_config.spatial_merge_size))
    return item_tiles(item) * int(config.image_seq_length)


TILE_KEYS = ("image_num_patches", "video_num_patches")  # InternVL: an image's tiles, a video's frames


def item_tiles(item) -> int:
    """An InternVL item's 448 px tiles: an image's (with its thumbnail), a video's frames (one each)."""
    return int(next(item[k] for k in TILE_KEYS if k in item).data)


def keep_counts(item, modality: str, config, ratio: float) -> list[int]:
    """k per run of an item's placeholder at keep ratio `ratio`: keep_count(N, r) for an image or a
    one-run video; keep_count(N / frames, r) for each frame of a video whose frames are runs of their
    own (Family.frame_spans: Qwen3-VL's temporal patches, InternVL's frames)."""
    from vllm_sgl.families import family_for_config

    n = item_visual_tokens(item, config)
    if modality == "video" and family_for_config(config).frame_spans:
        grid = item_grid(item)
        frames = grid[0] if grid is not None else item_tiles(item)
        return [keep_count(n // frames, ratio)] * frames
    return [keep_count(n, ratio)]


def guide_prompt_len(prompt_len: int, images, config) -> int:
    """The guide's prompt length: the target's (pruned) prompt with every image back at its N
    visual tokens. images: the request's image features (with data); config: the target's
    hf_config."""
    return prompt_len + sum(max(0, item_visual_tokens(f.data, config) - kept_tokens(f)) for f in images)


def is_visual_item(item) -> bool:
    """An image or video item SGL prunes (with its data)."""
    return item is not None and any(name in item for name in (*GRID_KEYS, *TILE_KEYS))


def kept_tokens(feature) -> int:
    """k of an item: the embeddings in its placeholder (the kept visual tokens; InternVL's <img> and
    </img>, a video's text between frames are not among them)."""
    return sum(k for _, k in embed_runs(feature))


def embed_runs(feature) -> list[tuple[int, int]]:
    """(offset in the placeholder, k) of each run of embeddings: one for an image or a Qwen2/2.5-VL
    video, one per frame for a Qwen3-VL or InternVL video (each frame's text before it)."""
    pos = feature.mm_position
    if pos.is_embed is None:
        return [(0, pos.length)]
    embed = torch.as_tensor(pos.is_embed).to(torch.int8)
    edges = torch.diff(embed, prepend=embed.new_zeros(1), append=embed.new_zeros(1))
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return [(int(a), int(b - a)) for a, b in zip(starts, ends)]


def kept_per_run(feature, n: int) -> list[np.ndarray]:
    """Per run of an item's placeholder, its kept tokens' indices into the run's n unpruned tokens:
    from the item's keep set (indices into its N = n x runs, frame after frame), or the first k of
    each run while it has none yet (the encode-time fallback asks again once it has)."""
    runs = embed_runs(feature)
    keep = feature.data[KEEP_KWARG].data if KEEP_KWARG in feature.data else None
    if keep is None or len(keep) != sum(k for _, k in runs):
        return [np.arange(k) for _, k in runs]
    keep = keep.numpy()
    return [keep[(keep >= i * n) & (keep < (i + 1) * n)] - i * n for i in range(len(runs))]


def first_tokens(feature, config) -> torch.Tensor:
    """A placeholder keep set that fits the item's runs: the first k of each run's N / runs tokens
    (a request whose guide failed; its step must stay well-formed until it is finished)."""
    runs = embed_runs(feature)
    n = item_visual_tokens(feature.data, config) // len(runs)
    return torch.cat([torch.arange(k) + i * n for i, (_, k) in enumerate(runs)])


def visual_features(mm_features) -> list[Any]:
    """The request's items SGL prunes, images and videos, in prompt order (vLLM sorts a request's
    features by position)."""
    return [f for f in (mm_features or []) if f.modality in PRUNED_MODALITIES]


def request_field(mm_features, name: str):
    """A per-request field the front end put on each of the request's image items (the SEE
    threshold, the draft length), or None when the request did not set it."""
    for f in visual_features(mm_features):
        if f.data is not None and name in f.data:
            return f.data[name].data
    return None


def has_keep_set(feature) -> bool:
    return feature.data is not None and KEEP_KWARG in feature.data


PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}


def has_pixels(feature) -> bool:
    return feature.data is not None and PIXEL_KEYS[feature.modality] in feature.data


def lacks_keep_set(images) -> bool:
    """True when some image still needs the guide and all of them carry their pixels."""
    return bool(images) and all(has_pixels(f) for f in images) and not has_keep_sets(images)


def has_keep_sets(images) -> bool:
    return bool(images) and all(has_keep_set(f) for f in images)


def attach_keep_sets(images, keep_indices) -> None:
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

    if len(images) != len(keep_indices):
        raise ValueError(f"{len(images)} images but {len(keep_indices)} keep sets")
    for f, keep in zip(images, keep_indices):
        if f.data is None:  # stripped entirely (not an M-RoPE model): nothing will encode it
            continue
        # keep_on_cpu: a CPU-side field stays on the item when vLLM strips the pixels of a
        # prefix-cache-covered image, so the keep set lives as long as the request does.
        f.data[KEEP_KWARG] = MultiModalFieldElem(data=keep, field=MultiModalBatchedField(keep_on_cpu=True))


class ResultsByImages:
    """Guide results of earlier requests by their images' cache identities, the most recent
    `entries` kept. The front end salts each identity with the whole prompt (vllm_sgl.engine.model),
    so a request whose identities all find one result is identical to that result's request (same
    images, text and keep counts: the same keep sets). The scheduler uses it to skip the guide
    phase; the worker, to answer a request whose images hit the encoder cache."""

    def __init__(self, entries: int = 4096):
        self.entries = entries
        self._by_identifier: OrderedDict[str, Any] = OrderedDict()

    def put(self, images, result) -> None:
        for f in images:
            self._by_identifier[f.identifier] = result
            self._by_identifier.move_to_end(f.identifier)
        while len(self._by_identifier) > self.entries:
            self._by_identifier.popitem(last=False)

    def get(self, images) -> Any:
        found = [self._by_identifier.get(f.identifier) for f in images]
        if not found or not all(r is not None and r is found[0] for r in found):
            return None
        for f in images:
            self._by_identifier.move_to_end(f.identifier)
        return found[0]

    def __len__(self) -> int:
        return len(self._by_identifier)
