"""The guide's language model as plain functions over its weights, shared by the packed prefill and
the decode step.

Each layer's q/k/v projections and the MLP's gate/up projections are fused into one matrix each
(the transformers modules keep views into them, so no weight is stored twice): fewer, larger
matmuls, and fewer ops for the decode step to launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_sgl.guide.rope import TextRope, apply_rope

_ACTS = {"silu": F.silu, "gelu": F.gelu}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm as torch's fused op (the same result in fp32 as transformers' six ops)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln1_eps: float
    qkv: torch.Tensor  # (Dq + 2 Dkv, hidden)
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    ln2: torch.Tensor
    ln2_eps: float
    gate_up: torch.Tensor | None  # (2 I, hidden)
    down: torch.Tensor | None
    qk_norm: torch.Tensor | None = None  # (Hq + Hkv, D): per-head q/k RMSNorm scales (Qwen3)
    qk_norm_eps: float = 0.0
    moe: torch.nn.Module | None = None  # a mixture-of-experts block, run as the transformers module


def _fuse(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linear modules; the modules keep views into it."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if all(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.detach() for m in modules])
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


class TextModel:
    """Geometry and weights of a Qwen2/Qwen3-family decoder (the language model of Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL dense or MoE)."""

    def __init__(self, hf_model, text_config, interleaved_mrope: bool = False, deepstack_levels: int = 0):
        lm = hf_model.model.language_model
        self.embed = lm.embed_tokens.weight
        self.final_norm, self.final_eps = lm.norm.weight, float(lm.norm.variance_epsilon)
        self.lm_head = hf_model.lm_head.weight
        self.num_layers = len(lm.layers)
        attn = lm.layers[0].self_attn
        self.heads = int(text_config.num_attention_heads)
        self.kv_heads = int(text_config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self.act = _ACTS[text_config.hidden_act]
        self.hidden = int(text_config.hidden_size)
        # Qwen3-VL: after layer i < deepstack_levels, visual rows add their level-i deepstack slice
        self.deepstack_levels = int(deepstack_levels)
        self.layers: list[LayerWeights] = []
        self.has_moe = False
        for layer in lm.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([a.q_proj, a.k_proj, a.v_proj])
            dense = hasattr(mlp, "gate_proj")
            gate_up = _fuse([mlp.gate_proj, mlp.up_proj])[0] if dense else None
            self.has_moe |= not dense
            qk_norm, qk_eps = None, 0.0
            if hasattr(a, "q_norm"):
                qk_norm = torch.cat([a.q_norm.weight.detach().expand(self.heads, -1),
                                     a.k_norm.weight.detach().expand(self.kv_heads, -1)])
                qk_eps = float(a.q_norm.variance_epsilon)
            self.layers.append(LayerWeights(
                ln1=layer.input_layernorm.weight, ln1_eps=float(layer.input_layernorm.variance_epsilon),
                qkv=qkv, qkv_bias=qkv_bias, o=a.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight, ln2_eps=float(layer.post_attention_layernorm.variance_epsilon),
                gate_up=gate_up, down=mlp.down_proj.weight if dense else None,
                qk_norm=qk_norm, qk_norm_eps=qk_eps, moe=None if dense else mlp,
            ))
        rot = lm.rotary_emb
        section = getattr(rot, "mrope_section", None) or (text_config.rope_parameters or {}).get("mrope_section")
        if not section:  # plain 1D RoPE (InternVL's Qwen2): every channel rotates with the first row
            section = [rot.inv_freq.numel(), 0, 0]
        self.rope = TextRope(rot.inv_freq, list(section), float(getattr(rot, "attention_scaling", 1.0)),
                             interleaved=interleaved_mrope)

    def qkv(self, w: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rows h (n, hidden) at RoPE tables cos, sin (n, D) -> post-RoPE q (n, Hq, D), k and v
        (n, Hkv, D); q and k are rotated in one call."""
        x = F.linear(rms_norm(h, w.ln1, w.ln1_eps), w.qkv, w.qkv_bias)
        n, d = h.shape[0], self.head_dim
        qk = x[:, : (self.heads + self.kv_heads) * d].view(n, -1, d)
        if w.qk_norm is not None:  # Qwen3: each head's q and k RMS-normalised, then scaled
            qk = F.rms_norm(qk, (d,), None, w.qk_norm_eps) * w.qk_norm
        qk = apply_rope(qk, cos, sin)
        v = x[:, (self.heads + self.kv_heads) * d :].view(n, self.kv_heads, d)
        return qk[:, : self.heads], qk[:, self.heads :], v

    def finish_layer(self, w: LayerWeights, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual after attention (attn_out (n, Hq, D)) and the MLP."""
        h = h + F.linear(attn_out.reshape(h.shape[0], -1).to(h.dtype), w.o)
        x = rms_norm(h, w.ln2, w.ln2_eps)
        if w.moe is not None:  # routing is data dependent: the transformers block itself
            return h + w.moe(x[None])[0]
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
        return h + F.linear(self.act(gate) * up, w.down)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.final_norm, self.final_eps), self.lm_head).float()
