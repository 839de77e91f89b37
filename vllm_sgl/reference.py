"""The SGL reference: plain PyTorch over the transformers checkpoint, with explicit attention
probabilities. It is the definition the kernel and the engine are checked against
(../shared/SGL_METHOD.md); batch size 1, fp32, readable over fast.

The language model's forward is written out here (rather than calling transformers' attention)
so that every probability is materialised and so that visual tokens can be dropped at the input
or at any layer while every retained token keeps its unpruned M-RoPE position.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from vllm_sgl.pruning import (FUSES, IMPORTANCES, confidence, grid_layout, keep_count, keep_set,  # noqa: F401
                              mrope_positions, tile_layout, top_k_keep, visual_spans)


@dataclass
class SGLSettings:
    keep_ratio: float = 0.25
    consistency_ratio: float = 0.05
    max_new_tokens: int = 16
    prune_layer: float = 0.0  # rho: drop pruned tokens after floor(rho * depth) target layers
    exit_threshold: float = 0.6
    fuse: str = "mean"
    importance: str = "sgl"  # which keep set the guide's importance picks (IMPORTANCES; docs/importance.md)

    def validate(self) -> "SGLSettings":
        for name in ("keep_ratio", "consistency_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not (isinstance(self.prune_layer, (int, float)) and 0.0 <= self.prune_layer < 1.0):
            raise ValueError(f"prune_layer (rho) must be in [0, 1), got {self.prune_layer!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.fuse not in FUSES:
            raise ValueError(f"fuse must be one of {', '.join(FUSES)}, got {self.fuse!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        return self


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PreparedInput:
    """One prompt as both models see it before pruning. "Images" below are the prompt's images and
    videos: a video is one span of video tokens on a (t, h, w) grid, pruned like an image."""

    input_ids: torch.Tensor  # (L,)
    mm_token_type_ids: torch.Tensor  # (L,)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None  # (num_images, 3)
    visual_spans: list[tuple[int, int]]  # (start, N) per image or video, in prompt order
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # (num_videos, 3)
    video_seconds: list[float] = field(default_factory=list)  # per video: seconds per temporal grid step
    span_modalities: list[str] = field(default_factory=list)  # "image" or "video", per span
    # Per span, its item (image or video) in prompt order: a Qwen3-VL video's frames are spans of
    # their own (timestamp text between them), each an image of grid (1, h, w), one item together.
    span_items: list[int] = field(default_factory=list)

    def _items(self) -> list[tuple[str, int, list[int] | None]]:
        """Per span: its modality, how many spans its item has, and its item's (t, h, w) grid."""
        by = {m: iter([] if g is None else g.tolist()) for m, g in (("image", self.image_grid_thw),
                                                                    ("video", self.video_grid_thw))}
        out, last, grid = [], None, None
        for m, item in zip(self.span_modalities, self.span_items):
            if item != last:
                grid, last = next(by[m], None), item
            out.append((m, self.span_items.count(item), grid))
        return out

    @property
    def grids(self) -> list[list[int]]:
        """(t, h, w) per span, in prompt order (Qwen families); (1, h, w) for a frame of its own."""
        return [[1, *g[1:]] if frames > 1 and g is not None else g for _, frames, g in self._items()]

    def t_factors(self, tokens_per_second: float | None) -> list[float]:
        """Per span, the spacing of its time positions: a video's seconds per grid step x the
        model's tokens_per_second (Qwen2.5-VL); 1 for images, frames of their own and where the
        model has none (as vLLM)."""
        seconds, out, last, second = iter(self.video_seconds), [], None, 1.0
        for (m, frames, _), item in zip(self._items(), self.span_items):
            if m == "video" and item != last:
                second = next(seconds)
            last = item
            scaled = m == "video" and frames == 1 and tokens_per_second is not None
            out.append(second * tokens_per_second if scaled else 1.0)
        return out

    def per_item(self, values: Sequence) -> list[list]:
        """Per-span values grouped by item, in prompt order."""
        out: dict[int, list] = {}
        for item, v in zip(self.span_items, values):
            out.setdefault(item, []).append(v)
        return list(out.values())


def build_prompt_text(processor, num_images: int, prompt: str, num_videos: int = 0) -> str:
    """The chat prompt: the images, then the videos, then the question."""
    content = ([{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
               + [{"type": "text", "text": prompt}])
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def prepare_input(processor, images: Sequence, prompt: str, videos: Sequence = ()) -> PreparedInput:
    """videos: (frames (T, H, W, 3), metadata) as vLLM takes them (vllm_sgl.images.synthetic_clip);
    processed as vLLM's Qwen processors do (the metadata goes to the processor, frames as given)."""
    text = build_prompt_text(processor, len(images), prompt, len(videos))
    extra = {}
    if videos:
        from transformers.video_utils import VideoMetadata

        extra = dict(videos=[v for v, _ in videos], do_sample_frames=False,
                     video_metadata=[VideoMetadata(**{k: x for k, x in m.items() if k != "do_sample_frames"})
                                     for _, m in videos])
    enc = processor(text=[text], images=list(images) or None, return_tensors="pt", **extra)
    ids = enc["input_ids"][0]
    media = [processor.image_token_id]  # InternVL's frames are image tokens too: it has no video token id
    if videos and getattr(processor, "video_token_id", None) is not None:
        media.append(processor.video_token_id)
    spans = visual_spans(ids, media)
    # The images come first (build_prompt_text), one span each; then each video: one span, or one
    # per frame where its frames are runs of their own (Qwen3-VL's temporal patches after their
    # timestamps, InternVL's frames after "FrameI:", marked as image tokens there).
    frames = [1] * len(videos)
    if len(spans) - len(images) > len(videos):
        grid = enc.get("video_grid_thw")
        frames = grid[:, 0].tolist() if grid is not None else [len(v) for v, _ in videos]
    modalities = ["image"] * len(images) + [m for f in frames for m in ["video"] * f]
    items = list(range(len(images))) + [len(images) + i for i, f in enumerate(frames) for _ in range(f)]
    if len(modalities) != len(spans):
        raise ValueError(f"{len(spans)} visual spans in the prompt for {len(images)} images and videos of "
                         f"{frames} frames")
    mm_types = enc.get("mm_token_type_ids")
    mm_types = mm_types[0] if mm_types is not None else (ids == processor.image_token_id).to(torch.int32)
    seconds = enc.get("second_per_grid_ts")
    return PreparedInput(
        input_ids=ids,
        mm_token_type_ids=mm_types,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        visual_spans=spans,
        pixel_values_videos=enc.get("pixel_values_videos"),
        video_grid_thw=enc.get("video_grid_thw"),
        video_seconds=[float(x) for x in seconds.tolist()] if seconds is not None else [1.0] * len(videos),
        span_modalities=modalities,
        span_items=items,
    )


# ----------------------------------------------------------------------------------------------
# The explicit forward


def image_features(out) -> list[torch.Tensor]:
    """Per image, (N_i, hidden * (1 + deepstack levels)): the merged visual tokens of transformers'
    `get_image_features` output, then each deepstack level's rows of that image (Qwen3-VL).
    transformers 5.17 returns each level as one tensor over all images, 5.18 splits it per image
    like `pooler_output`: both are accepted (vLLM 0.32 allows either)."""
    feats = list(out.pooler_output)
    counts = [f.shape[0] for f in feats]
    levels = [lv.split(counts) if torch.is_tensor(lv) else lv for lv in getattr(out, "deepstack_features", None) or []]
    return [torch.cat([f, *(lv[i] for lv in levels)], dim=1) for i, f in enumerate(feats)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def layer_qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A decoder layer's post-RoPE q and k, and v, for rows h (n, hidden): each (n, heads, D)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n, hd = h.shape[0], attn.head_dim
    q = attn.q_proj(x).view(n, -1, hd)
    k = attn.k_proj(x).view(n, -1, hd)
    v = attn.v_proj(x).view(n, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    return q, k, v


@dataclass
class LayerCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # post-RoPE, each (n, Hkv, D)
    values: list[torch.Tensor] = field(default_factory=list)
    seq: list[torch.Tensor] = field(default_factory=list)  # sequence index of each key

    def extend(self, k, v, seq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.keys.append(k)
        self.values.append(v)
        self.seq.append(seq)
        if len(self.keys) > 1:  # keep one tensor so the next step concatenates once
            self.keys, self.values, self.seq = (
                [torch.cat(self.keys)],
                [torch.cat(self.values)],
                [torch.cat(self.seq)],
            )
        return self.keys[0], self.values[0], self.seq[0]


# observer(layer, probs (H, rows, keys), q (rows, H, D), row_seq (rows,), key_seq (keys,), keys)
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ExplicitVLM:
    """A Qwen-VL-family checkpoint with its language model's forward written out: explicit
    attention probabilities for the reference, or SDPA (no attention maps) for the engine's guide;
    both let an observer see post-RoPE queries and keys.

    Deepstack (Qwen3-VL): a prompt's embedding rows carry, after the hidden size, one slice per
    deepstack level (vLLM's layout; zero on text rows), added to the row's hidden state after
    language-model layer `level`. A row that is pruned takes its deepstack slices with it, so the
    kept visual tokens, and only they, receive their own deepstack features."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig

        from vllm_sgl.families import family_for_config

        config = AutoConfig.from_pretrained(model_dir)
        self.family = family_for_config(config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = config
        self.model = self.family.hf_model_cls.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.lm = self.model.model.language_model
        self.text_config = self.lm.config
        self.num_layers = len(self.lm.layers)
        self.hidden = int(self.text_config.hidden_size)
        self.mrope = self.family.mrope  # else 1D RoPE: the (3, n) positions' rows are equal
        self.deepstack_levels = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else self.text_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # -- inputs --------------------------------------------------------------------------------

    @torch.no_grad()
    def input_embeddings(self, prep: PreparedInput) -> torch.Tensor:
        """(L, hidden * (1 + deepstack levels)): token or visual embeddings, then deepstack slices."""
        embeds = self._pad(self.lm.embed_tokens(prep.input_ids.to(self.device)))
        if prep.visual_spans:
            if not self.mrope:  # InternVL: (tiles, 256, hidden), images' tiles in order
                out = self.model.model.get_image_features(prep.pixel_values.to(self.device, self.dtype))
                flat = out.pooler_output.flatten(0, 1)
                out.pooler_output = flat.split([n for _, n in prep.visual_spans])
                feats = image_features(out)
            else:
                feats = self._media_features(prep)
            for (start, n), f in zip(prep.visual_spans, feats):
                assert f.shape[0] == n, (f.shape, n)
                embeds[start : start + n] = f.to(embeds.dtype)
        return embeds

    def _media_features(self, prep: PreparedInput) -> list[torch.Tensor]:
        """Per span in prompt order: transformers' image and video features (a video's frames
        through the same tower, on its (t, h, w) grid)."""
        by = {}
        if prep.image_grid_thw is not None:
            out = self.model.model.get_image_features(prep.pixel_values.to(self.device, self.dtype),
                                                      prep.image_grid_thw.to(self.device))
            by["image"] = iter(image_features(out))
        if prep.video_grid_thw is not None:
            out = self.model.model.get_video_features(prep.pixel_values_videos.to(self.device, self.dtype),
                                                      prep.video_grid_thw.to(self.device))
            videos = image_features(out)
            frames = [len(spans) for spans in prep.per_item(prep.span_modalities) if spans[0] == "video"]
            # a video whose frames are spans of their own: its rows split per frame (frame-major)
            by["video"] = iter([part for v, t in zip(videos, frames) for part in v.chunk(t)])
        return [next(by[m]) for m in prep.span_modalities]

    def _pad(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with zero deepstack slices (text rows receive nothing)."""
        if not self.deepstack_levels:
            return token_embeds
        return torch.cat([token_embeds, token_embeds.new_zeros(token_embeds.shape[0], self.hidden * self.deepstack_levels)], 1)

    def layouts(self, prep: PreparedInput) -> list[tuple[int, int]]:
        """Each image's token layout (width, plane) for the spatial keep rule."""
        if not prep.visual_spans:
            return []
        if self.mrope:
            merge = int(self.config.vision_config.spatial_merge_size)
            return [grid_layout(g, merge) for g in prep.grids]
        return [tile_layout(int(self.config.image_seq_length))] * len(prep.visual_spans)

    @torch.no_grad()
    def positions(self, prep: PreparedInput) -> torch.Tensor:
        """(3, L) M-RoPE positions of the unpruned prompt (1D RoPE: three equal rows)."""
        if not prep.visual_spans or not self.mrope:
            return torch.arange(prep.input_ids.numel(), device=self.device).expand(3, -1).clone()
        if prep.video_grid_thw is not None:
            # vLLM's rule (the target is served by vLLM): text after a video continues one past the
            # video's largest position. transformers 5.18 continues at max(h, w) past its start,
            # which differs when a clip's time positions outrun its height and width.
            merge = int(self.config.vision_config.spatial_merge_size)
            tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", None)
            return mrope_positions(prep.input_ids.numel(), prep.visual_spans, prep.grids, merge,
                                   prep.t_factors(tokens_per_second)).to(self.device)
        pos, _ = self.model.model.get_rope_index(
            prep.input_ids[None].to(self.device),
            mm_token_type_ids=prep.mm_token_type_ids[None].to(self.device),
            image_grid_thw=prep.image_grid_thw.to(self.device),
        )
        return pos[:, 0]

    # -- forward -------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        seq: torch.Tensor,
        caches: list[LayerCache],
        drop_at: int | None = None,
        keep_rows: torch.Tensor | None = None,
        observer: Observer | None = None,
        explicit: bool = True,
    ) -> torch.Tensor:
        """Runs rows h (n, H) at M-RoPE positions pos (3, n) with sequence indices seq (n,).
        If keep_rows is given, rows outside it are dropped before layer drop_at (so layers >= drop_at
        never see them). explicit=False uses SDPA and gives the observer probs=None.
        Returns the logits of the rows that reach the last layer."""
        deep = None
        if self.deepstack_levels:
            deep = h[:, self.hidden :].view(h.shape[0], self.deepstack_levels, self.hidden)
            h = h[:, : self.hidden]
        cos, sin = self.lm.rotary_emb(h[None], pos[:, None, :] if self.mrope else pos[:1])
        cos, sin = cos[0], sin[0]
        for li, layer in enumerate(self.lm.layers):
            if keep_rows is not None and li == drop_at:
                h, cos, sin, seq = h[keep_rows], cos[keep_rows], sin[keep_rows], seq[keep_rows]
                deep = deep[keep_rows] if deep is not None else None
            attn = layer.self_attn
            n = h.shape[0]
            q, k, v = layer_qkv(layer, h, cos, sin)
            keys, values, key_seq = caches[li].extend(k, v, seq)
            group = q.shape[1] // keys.shape[1]
            visible = key_seq[None, :] <= seq[:, None]  # causal in sequence order, pruned or not
            if explicit:
                scores = torch.einsum("qhd,khd->hqk", q.float(), keys.repeat_interleave(group, 1).float())
                scores = (scores * attn.scaling).masked_fill(~visible[None], float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                out = torch.einsum("hqk,khd->qhd", probs, values.repeat_interleave(group, 1).float())
            else:
                probs = None
                # Rows that see exactly themselves and the rows before them (a fresh prompt; seq is
                # ascending) are plain causal: SDPA's causal kernel instead of a dense mask, which
                # sends it down its materialising path (2x slower at 1k tokens on CPU).
                causal = keys.shape[0] == n and torch.equal(key_seq, seq)
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                    attn_mask=None if causal else visible, is_causal=causal, scale=attn.scaling, enable_gqa=True,
                )[0].transpose(0, 1)
            if observer is not None:
                observer(li, probs, q, seq, key_seq, keys)
            h = h + attn.o_proj(out.reshape(n, -1).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h)[None])[0]  # MoE blocks want a batch dim
            if deep is not None and li < self.deepstack_levels:
                h = h + deep[:, li].to(h.dtype)
        return self.model.lm_head(self.lm.norm(h)).float()

    def _embed_token(self, token: int) -> torch.Tensor:
        return self._pad(self.lm.embed_tokens(torch.tensor([token], device=self.device)))

    @torch.no_grad()
    def greedy(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        max_new_tokens: int,
        keep_rows: torch.Tensor | None = None,
        drop_at: int = 0,
        observer: Observer | None = None,
        explicit: bool = True,
    ) -> tuple[list[int], list[float], list[LayerCache]]:
        """Greedy answer (including the end-of-turn token if reached) and each step's top-1
        probability. Decoding continues at max(unpruned positions) + 1."""
        caches = [LayerCache() for _ in range(self.num_layers)]
        seq = torch.arange(embeds.shape[0], device=self.device)
        logits = self.forward(embeds, positions, seq, caches, drop_at, keep_rows, observer, explicit)[-1]
        next_pos = int(positions.max()) + 1
        next_seq = embeds.shape[0]
        tokens: list[int] = []
        top1: list[float] = []
        while True:
            p = torch.softmax(logits, dim=-1)
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            top1.append(float(p[tok]))
            if tok in self.eos_ids or len(tokens) >= max_new_tokens:
                return tokens, top1, caches
            pos = torch.full((3, 1), next_pos, dtype=torch.long, device=self.device)
            logits = self.forward(
                self._embed_token(tok), pos, torch.tensor([next_seq], device=self.device), caches,
                observer=observer, explicit=explicit,
            )[-1]
            next_pos += 1
            next_seq += 1

    @torch.no_grad()
    def answer_probs(
        self, embeds: torch.Tensor, positions: torch.Tensor, keep_rows: torch.Tensor, answer: list[int]
    ) -> list[float]:
        """Teacher-forced probability of each answer token given the prompt pruned at the input."""
        L = embeds.shape[0]
        next_pos = int(positions.max()) + 1
        ans = answer[:-1]
        h = torch.cat([embeds[keep_rows]] + [self._embed_token(t) for t in ans])
        m = len(ans)
        pos = torch.cat([positions[:, keep_rows], (next_pos + torch.arange(m)).expand(3, -1)], dim=1)
        seq = torch.cat([torch.arange(L)[keep_rows], L + torch.arange(m)])
        logits = self.forward(h, pos, seq, [LayerCache() for _ in range(self.num_layers)])
        probs = torch.softmax(logits[-len(answer) :], dim=-1)
        return [float(probs[i, t]) for i, t in enumerate(answer)]


# ----------------------------------------------------------------------------------------------
# Importance


class ImportanceObserver:
    """Accumulates, per image, the probability that rows strictly after the image pay to each of
    its visual keys, summed over layers, heads and rows (fp32). `layers`: only those layers (the
    quality benchmark's single-layer and FastV-style rankings); the method sums all of them."""

    def __init__(self, spans: list[tuple[int, int]], layers: set[int] | None = None):
        self.spans = spans
        self.layers = layers
        self.importance = [torch.zeros(n, dtype=torch.float32) for _, n in spans]

    def __call__(self, layer, probs, q, row_seq, key_seq, keys) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        for i, (start, n) in enumerate(self.spans):
            rows = row_seq > start + n - 1
            if not bool(rows.any()):
                continue
            cols = (key_seq >= start) & (key_seq < start + n)
            contrib = probs[:, rows][:, :, cols].sum(dim=(0, 1)).cpu()
            self.importance[i].index_add_(0, (key_seq[cols] - start).cpu(), contrib.float())


class QKCapture:
    """Captures the post-RoPE queries of importance rows and every key, per layer, in the kernel's
    dense varlen layout (one request), so the kernel definition and Triton kernel can recompute
    importance from exactly what the guide's attention saw."""

    def __init__(self, spans: list[tuple[int, int]], num_layers: int):
        self.first_end = min((s + n for s, n in spans), default=None)
        self.q: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.row_seq: list[torch.Tensor] = []
        self.keys: list[torch.Tensor | None] = [None] * num_layers

    def __call__(self, layer, probs, q, row_seq, key_seq, keys) -> None:
        if self.first_end is None:
            return
        rows = row_seq >= self.first_end
        self.q[layer].append(q[rows].float())
        if layer == 0:
            self.row_seq.append(row_seq[rows])
        self.keys[layer] = keys.float()  # the cache grows; the last call holds every key


class Observers:
    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def __call__(self, *args) -> None:
        for o in self.observers:
            o(*args)


# ----------------------------------------------------------------------------------------------
# The whole method


@dataclass
class ReferenceResult:
    num_visual_tokens: list[int]
    visual_span: list[list[int]]  # [start, end) in the prompt, per image
    importance: list[list[float]]
    keep_indices: list[list[int]]
    prompt_len: int
    target_prompt_len: int  # text tokens + kept visual tokens
    guide_answer_ids: list[int]
    guide_finished: bool
    confidence: float
    consistency: float
    exit_score: float
    exit: bool
    target_pruned_answer_ids: list[int]
    target_full_answer_ids: list[int]
    settings: dict

    def to_json(self) -> dict:
        return asdict(self)


class SGLReference:
    """Guide + target, loaded once, answering many prompts."""

    def __init__(self, guide_dir: str | Path, target_dir: str | Path):
        from transformers import AutoProcessor

        from vllm_sgl.pair import check_pair

        check_pair(guide_dir, target_dir)
        self.processor = AutoProcessor.from_pretrained(target_dir)
        self.guide = ExplicitVLM(guide_dir)
        self.target = ExplicitVLM(target_dir)

    def prepare(self, images: Sequence, prompt: str, videos: Sequence = ()) -> PreparedInput:
        return prepare_input(self.processor, images, prompt, videos)

    def guide_pass(self, prep: PreparedInput, max_new_tokens: int, capture: QKCapture | None = None):
        """The guide's greedy answer, per-step top-1 probabilities, and per-image importance."""
        embeds = self.guide.input_embeddings(prep)
        positions = self.guide.positions(prep)
        imp = ImportanceObserver(prep.visual_spans)
        answer, top1, _ = self.guide.greedy(embeds, positions, max_new_tokens, observer=Observers(imp, capture))
        return embeds, positions, answer, top1, imp.importance

    def run(
        self,
        images: Sequence,
        prompt: str,
        settings: SGLSettings = SGLSettings(),
        importance_fn: Callable[[PreparedInput, QKCapture], list[torch.Tensor]] | None = None,
        videos: Sequence = (),
    ) -> ReferenceResult:
        """videos: (frames, metadata) each (vllm_sgl.images.synthetic_clip), after the images in
        the prompt; a video's N tokens are ranked and kept like an image's: one keep set of
        keep_count(N, r) over all its frames, or, where its frames are spans of their own (Qwen3-VL,
        InternVL: Family.frame_spans), keep_count(N / frames, r) per frame; results are per item."""
        settings.validate()
        prep = self.prepare(images, prompt, videos)
        spans = prep.visual_spans
        L = prep.input_ids.numel()
        capture = QKCapture(spans, self.guide.num_layers) if importance_fn is not None else None

        g_embeds, g_pos, answer, top1, importance = self.guide_pass(prep, settings.max_new_tokens, capture)
        if importance_fn is not None:
            importance = importance_fn(prep, capture)
        layouts = self.guide.layouts(prep)
        keep = [keep_set(imp, settings.keep_ratio, settings.importance, lay) for imp, lay in zip(importance, layouts)]
        finished = answer[-1] in self.guide.eos_ids

        # SEE: confidence over the guide's own steps, consistency with its top-rc tokens only.
        conf = confidence(top1)
        cons_keep = self._keep_rows(L, spans, [keep_set(imp, settings.consistency_ratio) for imp in importance])
        cons_probs = self.guide.answer_probs(g_embeds, g_pos, cons_keep, answer)
        consistency = math.prod(cons_probs)
        score = FUSES[settings.fuse](conf, consistency)

        # SGP: the target with only the kept tokens (dropped at layer floor(rho * depth)).
        t_embeds = self.target.input_embeddings(prep)
        t_pos = self.target.positions(prep)
        keep_rows = self._keep_rows(L, spans, keep)
        drop_at = math.floor(settings.prune_layer * self.target.num_layers)
        pruned, _, _ = self.target.greedy(t_embeds, t_pos, settings.max_new_tokens, keep_rows, drop_at)
        full, _, _ = self.target.greedy(t_embeds, t_pos, settings.max_new_tokens)

        # Per item: a video whose frames are spans of their own gets one keep set over its N tokens
        # (each frame's indices offset by the tokens of the frames before it).
        sizes = prep.per_item([n for _, n in spans])
        offsets = [int(sum(ns[:j])) for ns in sizes for j in range(len(ns))]
        return ReferenceResult(
            num_visual_tokens=[sum(ns) for ns in sizes],
            visual_span=[[ss[0][0], ss[-1][0] + ss[-1][1]] for ss in prep.per_item(spans)],
            importance=[torch.cat(imps).tolist() for imps in prep.per_item(importance)],
            keep_indices=[torch.cat(ks).tolist() for ks in prep.per_item([k + o for k, o in zip(keep, offsets)])],
            prompt_len=L,
            target_prompt_len=int(keep_rows.sum()),
            guide_answer_ids=answer,
            guide_finished=finished,
            confidence=conf,
            consistency=consistency,
            exit_score=score,
            exit=bool(finished and score >= settings.exit_threshold),
            target_pruned_answer_ids=pruned,
            target_full_answer_ids=full,
            settings=asdict(settings),
        )

    @staticmethod
    def _keep_rows(L: int, spans: list[tuple[int, int]], keep: list[torch.Tensor]) -> torch.Tensor:
        rows = torch.ones(L, dtype=torch.bool)
        for (start, n), k in zip(spans, keep):
            rows[start : start + n] = False
            rows[start + k] = True
        return rows
