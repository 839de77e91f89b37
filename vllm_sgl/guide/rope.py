"""Rotary position tables of the guide, computed from the checkpoint's own frequencies (the
inv_freq buffers transformers built), so they hold whatever RoPE parameters the checkpoint has.

- Language model, M-RoPE: each position is a (t, h, w) triple; frequency channel j of the head
  rotates with the component its section assigns (Qwen2/2.5-VL: contiguous sections, e.g.
  [16, 24, 24] of head_dim / 2; Qwen3-VL: interleaved, channel j rotates with h when j % 3 == 1 and
  with w when j % 3 == 2, within 3x their sections [24, 20, 20], with t otherwise). Text tokens have t = h = w, where this is plain 1D RoPE: the
  decode step uses `rope_1d`.
- Vision tower: axial 2D RoPE over (h, w) patch coordinates, in float32.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, heads, D), cos and sin (n, D) -> x * cos + rotate_half(x) * sin, in three ops (no
    concatenation): both halves of cos and sin hold the same frequencies."""
    half = x.shape[-1] // 2
    s = sin[:, None, :half]
    out = x * cos[:, None]
    out[..., :half].addcmul_(x[..., half:], s, value=-1)
    out[..., half:].addcmul_(x[..., :half], s)
    return out


class TextRope:
    def __init__(self, inv_freq: torch.Tensor, mrope_section: list[int], attention_scaling: float = 1.0,
                 interleaved: bool = False):
        self.inv_freq = inv_freq.float()  # (D/2,)
        half = self.inv_freq.numel()
        if sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} does not cover head_dim / 2 = {half}")
        # which of (t, h, w) rotates frequency channel j
        if interleaved:
            j = torch.arange(half)
            axis = torch.zeros(half, dtype=torch.long)
            for dim in (1, 2):
                axis[(j % 3 == dim) & (j < 3 * mrope_section[dim])] = dim
            self.axis = axis.to(inv_freq.device)
        else:
            self.axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)]).to(inv_freq.device)
        self.scaling = attention_scaling

    def mrope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, n) -> cos, sin (n, D)."""
        freqs = positions.float()[:, :, None] * self.inv_freq  # (3, n, D/2)
        freqs = freqs.gather(0, self.axis.expand(1, positions.shape[1], -1)).squeeze(0)
        return self._cos_sin(freqs, dtype)

    def rope_1d(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (n,) of text tokens -> cos, sin (n, D)."""
        return self._cos_sin(positions.float()[:, None] * self.inv_freq, dtype)

    def _cos_sin(self, freqs: torch.Tensor, dtype: torch.dtype):
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def vision_cos_sin(inv_freq: torch.Tensor, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hw (P, 2) patch (h, w) coordinates -> float32 cos, sin (P, D_vision)."""
    freqs = torch.cat([hw[:, 0, None].float() * inv_freq.float(), hw[:, 1, None].float() * inv_freq.float()], -1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
