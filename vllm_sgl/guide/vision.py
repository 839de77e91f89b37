"""The guide's vision tower, every image of a step in one packed patch sequence.

Same weights and result as the transformers tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), written for a
batch:
- the patch embedding is one matmul (its Conv3d has kernel = stride = one patch);
- per image grid, the patch positions, rotary tables, (Qwen2.5-VL) window order and (Qwen3-VL) the
  taps that resample the learned position grid are computed once and cached; a step concatenates
  them;
- every block attends with one variable-length attention call over the step's windows (or whole
  images in full-attention blocks) instead of a Python loop per window (vllm_sgl.guide.attention);
- Qwen3-VL's deepstack mergers read the blocks they follow; their features are appended to each
  merged token's row (hidden * (1 + levels) wide, vLLM's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sgl.guide.attention import Segments, varlen_attention
from vllm_sgl.guide.rope import apply_rope, vision_cos_sin


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """A tower norm: Qwen2.5-VL's RMSNorm through torch's fused op, anything else (Qwen2-VL's
    LayerNorm) as the module itself."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        return module(x)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), module.weight, eps)


@dataclass
class _GridLayout:
    """One image grid, in the order the tower runs it (window order for Qwen2.5-VL)."""

    group_order: torch.Tensor  # (G,) merge groups in run order
    window_lengths: list[int]  # patches per window, in run order (one window = the image if unwindowed)
    frame_lengths: list[int]  # patches per frame (full-attention segments)
    cos: torch.Tensor  # (P, D) float32, run order
    sin: torch.Tensor
    # Qwen3-VL: per patch (run order), the learned position grid's bilinear taps and weights
    pos_taps: torch.Tensor | None = None  # (P, 4) long
    pos_weights: torch.Tensor | None = None  # (P, 4) float32


class VisionTower:
    def __init__(self, visual, vision_config, device: torch.device, dtype: torch.dtype):
        self.visual = visual
        self.device, self.dtype = device, dtype
        self.merge = int(vision_config.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.patch = int(vision_config.patch_size)
        self.window = getattr(vision_config, "window_size", None)  # Qwen2.5-VL
        full = getattr(vision_config, "fullatt_block_indexes", None)
        depth = len(visual.blocks)
        self.full_blocks = set(full) if (self.window and full is not None) else set(range(depth))
        self.heads = int(vision_config.num_heads)
        self.head_dim = visual.blocks[0].attn.qkv.out_features // 3 // self.heads
        self.scale = self.head_dim**-0.5
        conv = visual.patch_embed.proj
        self.patch_weight = conv.weight.detach().reshape(conv.weight.shape[0], -1)
        self.patch_bias = None if conv.bias is None else conv.bias.detach()
        self.inv_freq = visual.rotary_pos_emb.inv_freq.to(device)
        # Qwen3-VL: a learned (side x side) position grid resampled to each image, and deepstack
        # mergers after some blocks
        self.pos_embed = getattr(visual, "pos_embed", None)
        self.deepstack = list(getattr(visual, "deepstack_visual_indexes", None) or [])
        self._layouts: dict[tuple[int, int, int], _GridLayout] = {}

    @property
    def patch_dim(self) -> int:
        """Values per input patch (channels x temporal x patch x patch)."""
        return self.patch_weight.shape[1]

    def segment_lengths(self, grid: tuple[int, int, int], block: int) -> list[int]:
        """Patches per attention segment of one image in one block (for cost models)."""
        lay = self.layout(grid)
        return lay.frame_lengths if block in self.full_blocks else lay.window_lengths

    # -- per-grid layout (host work, cached) ----------------------------------------------------

    def layout(self, grid: tuple[int, int, int]) -> _GridLayout:
        if grid not in self._layouts:
            if len(self._layouts) >= 1024:  # many image sizes: forget the oldest
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[grid] = self._build_layout(*grid)
        return self._layouts[grid]

    def _build_layout(self, t: int, h: int, w: int) -> _GridLayout:
        m = self.merge
        gh, gw = h // m, w // m
        # patch (h, w) coordinates in the processor's order: merge block by merge block
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(gh, m, gw, m).transpose(1, 2).flatten()
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(gh, m, gw, m).transpose(1, 2).flatten()
        hw = torch.stack([hpos, wpos], -1).repeat(t, 1)
        if self.window:
            order, windows = self._window_order(t, gh, gw)
        else:
            order, windows = torch.arange(t * gh * gw), [h * w] * t
        patch_order = (order[:, None] * self.unit + torch.arange(self.unit)).flatten()
        cos, sin = vision_cos_sin(self.inv_freq, hw[patch_order].to(self.device))
        lay = _GridLayout(order, windows, [h * w] * t, cos, sin)
        if self.pos_embed is not None:
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            taps, weights = get_vision_interpolation_indices_and_weights(
                torch.tensor([[t, h, w]]), int(self.visual.num_grid_per_side), mode=self.visual.interpolation_mode,
                align_corners=self.visual.interpolation_align_corners, spatial_merge_size=m)
            lay.pos_taps, lay.pos_weights = taps[patch_order].to(self.device), weights[patch_order].to(self.device)
        return lay

    def _window_order(self, t: int, gh: int, gw: int) -> tuple[torch.Tensor, list[int]]:
        """Merge groups window by window (row-major windows of `window` pixels, row-major groups
        inside), as transformers' get_vision_window_index, and each window's patch count."""
        ws = self.window // self.merge // self.patch
        order, lengths = [], []
        for f in range(t):
            for wy in range(0, gh, ws):
                for wx in range(0, gw, ws):
                    ys = torch.arange(wy, min(wy + ws, gh))
                    xs = torch.arange(wx, min(wx + ws, gw))
                    order.append((f * gh * gw + ys[:, None] * gw + xs[None, :]).flatten())
                    lengths.append(order[-1].numel() * self.unit)
        return torch.cat(order), lengths

    # -- the forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values (P, C*T*p*p) of every image, grids (t, h, w) per image -> (sum N, hidden) of
        merged visual tokens, image after image in grid order."""
        layouts = [self.layout(tuple(int(x) for x in g)) for g in grids]
        group_order, windows, frames, cos, sin = [], [], [], [], []
        offset = 0
        for lay in layouts:
            group_order.append(lay.group_order + offset)
            offset += lay.group_order.numel()
            windows += lay.window_lengths
            frames += lay.frame_lengths
            cos.append(lay.cos)
            sin.append(lay.sin)
        group_order = torch.cat(group_order).to(self.device)
        patch_order = (group_order[:, None] * self.unit + torch.arange(self.unit, device=self.device)).flatten()
        cos, sin = torch.cat(cos), torch.cat(sin)
        window_seg = Segments.build(windows, self.device)
        frame_seg = window_seg if windows == frames else Segments.build(frames, self.device)

        x = pixel_values.to(self.device, self.dtype)
        h = torch.nn.functional.linear(x, self.patch_weight, self.patch_bias)[patch_order]
        if self.pos_embed is not None:  # as transformers: a weighted sum of the grid's taps
            taps = torch.cat([lay.pos_taps for lay in layouts])
            weights = torch.cat([lay.pos_weights for lay in layouts])
            h = h + (self.pos_embed(taps) * weights[:, :, None]).sum(1).to(h.dtype)
        n = h.shape[0]
        deep = []
        for i, blk in enumerate(self.visual.blocks):
            qkv = blk.attn.qkv(_norm(blk.norm1, h)).view(n, 3, self.heads, self.head_dim)
            # q and k rotated together, in fp32 (as transformers does)
            qk = apply_rope(qkv[:, :2].reshape(n, 2 * self.heads, self.head_dim).float(), cos, sin).to(h.dtype)
            seg = frame_seg if i in self.full_blocks else window_seg
            out = varlen_attention(qk[:, : self.heads], qk[:, self.heads :], qkv[:, 2], seg, causal=False,
                                   scale=self.scale)
            h = h + blk.attn.proj(out.reshape(n, -1))
            h = h + blk.mlp(_norm(blk.norm2, h))
            if i in self.deepstack:
                deep.append(self.visual.deepstack_merger_list[self.deepstack.index(i)](h))
        merged = self.visual.merger(h)  # (groups, hidden), groups in run order
        if deep:
            merged = torch.cat([merged, *deep], dim=1)
        return merged[torch.argsort(group_order)]



class TileTower:
    """InternVL's vision: fixed-size tiles (all of a pass's images' tiles as one batch, the tower's
    own batched attention), CLS dropped, pixel shuffle and projector as transformers does them.
    Returns (sum N, hidden): every tile's image_seq_length tokens, tile after tile."""

    def __init__(self, vlm, device: torch.device, dtype: torch.dtype):
        self.vlm = vlm  # transformers' InternVLModel
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grids) -> torch.Tensor:
        out = self.vlm.get_image_features(pixel_values.to(self.device, self.dtype))
        return out.pooler_output.flatten(0, 1)
