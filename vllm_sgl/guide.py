"""The guide inside the engine's worker: full prompt in, greedy answer, importance, keep sets out.

It runs the same written-out forward as the reference (ExplicitVLM) but with SDPA, so no
attention map is ever materialised; the post-RoPE queries of the importance rows and the keys are
captured and reduced by the importance kernel (fused Triton on CUDA, its PyTorch definition
elsewhere) in one call for all requests of the step. The step's requests are encoded and
prefilled one by one and decoded together (one batch row each).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_sgl.capture import capture_to_varlen, merge_varlen
from vllm_sgl.reference import ExplicitVLM, LayerCache, PreparedInput, QKCapture, layer_qkv, top_k_keep


@dataclass
class GuideRequest:
    request_id: str
    prompt_ids: list[int]  # the full prompt: every image with all N of its visual tokens
    pixel_values: torch.Tensor | None  # all images of the request, concatenated patches
    image_grid_thw: torch.Tensor | None  # (num_images, 3)
    keep_counts: list[int]  # k per image, in prompt order (the target's placeholder counts)


@dataclass
class GuideResult:
    request_id: str
    answer_ids: list[int]
    finished: bool
    confidence: float
    importance: list[torch.Tensor] = field(default_factory=list)
    keep_indices: list[torch.Tensor] = field(default_factory=list)
    num_visual_tokens: list[int] = field(default_factory=list)
    step_seconds: float = 0.0  # wall time of the guide call this request was batched in


def patch_embed_as_matmul(patch_embed) -> None:
    """The vision tower's patch embedding is a Conv3d whose kernel and stride are one whole patch,
    i.e. a matmul with the flattened patch (the layout vLLM ships pixels in). On CPU the conv costs
    about five times the matmul (0.052 s per 4096-patch image, one thread)."""
    conv = patch_embed.proj
    weight = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    bias = None if conv.bias is None else conv.bias.detach()

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype), weight, bias)

    patch_embed.forward = forward


class Guide:
    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device,
        dtype: torch.dtype,
        max_tokens: int,
        importance_backend: str = "auto",
    ):
        self.vlm = ExplicitVLM(model_dir, device=device, dtype=dtype)
        patch_embed_as_matmul(self.vlm.model.model.visual.patch_embed)
        self.config = self.vlm.model.config
        self.max_tokens = max_tokens
        self.importance_backend = importance_backend
        self.merge = self.config.vision_config.spatial_merge_size

    def _prepare(self, req: GuideRequest) -> PreparedInput:
        ids = torch.tensor(req.prompt_ids, dtype=torch.long)
        image_token = self.config.image_token_id
        is_img = ids == image_token
        spans: list[tuple[int, int]] = []
        starts = torch.nonzero(is_img & ~torch.cat([torch.tensor([False]), is_img[:-1]])).flatten().tolist()
        for s in starts:
            e = s
            while e < len(ids) and bool(is_img[e]):
                e += 1
            spans.append((s, e - s))
        return PreparedInput(
            input_ids=ids,
            mm_token_type_ids=is_img.to(torch.int32),
            pixel_values=req.pixel_values,
            image_grid_thw=req.image_grid_thw,
            visual_spans=spans,
        )

    @torch.inference_mode()
    def run(self, requests: list[GuideRequest]) -> list[GuideResult]:
        start = time.perf_counter()
        preps = []
        for req in requests:
            prep = self._prepare(req)
            if len(prep.visual_spans) != len(req.keep_counts):
                raise ValueError(
                    f"request {req.request_id}: {len(prep.visual_spans)} image spans in the prompt "
                    f"but {len(req.keep_counts)} images"
                )
            preps.append(prep)
        # The vision encoder runs per request: batching images measured slower on CPU (one
        # 32k-patch batch: 0.095 s/image against 0.064 s one by one, bench pair).
        embeds = [self.vlm.input_embeddings(p) for p in preps]
        captures = [QKCapture(p.visual_spans, self.vlm.num_layers) for p in preps]
        # Prefill request by request (lengths differ; each is a full-width forward already),
        # then decode all requests together.
        prefilled = []
        for prep, emb, capture in zip(preps, embeds, captures):
            positions = self.vlm.positions(prep)
            caches = [LayerCache() for _ in range(self.vlm.num_layers)]
            seq = torch.arange(emb.shape[0], device=self.vlm.device)
            logits = self.vlm.forward(emb, positions, seq, caches, observer=capture, explicit=False)[-1]
            prefilled.append((logits, caches, int(positions.max()) + 1))
        answers, top1s = self._decode(prefilled, captures)

        results: list[GuideResult] = []
        for req, prep, answer, top1 in zip(requests, preps, answers, top1s):
            confidence = math.exp(sum(math.log(max(p, 1e-45)) for p in top1) / len(top1))
            results.append(
                GuideResult(
                    request_id=req.request_id,
                    answer_ids=answer,
                    finished=answer[-1] in self.vlm.eos_ids,
                    confidence=confidence,
                    num_visual_tokens=[n for _, n in prep.visual_spans],
                )
            )

        # One importance reduction for the whole step's requests.
        from vllm_sgl.kernels import visual_importance

        merged = merge_varlen([capture_to_varlen(p, c) for p, c in zip(preps, captures)])
        flat = visual_importance(**merged, backend=self.importance_backend).float().cpu()
        sizes = [n for r in results for n in r.num_visual_tokens]
        per_image = list(torch.split(flat, sizes))
        i = 0
        for req, res in zip(requests, results):
            for k in req.keep_counts:
                res.importance.append(per_image[i])
                res.keep_indices.append(top_k_keep(per_image[i], k))
                i += 1
        elapsed = time.perf_counter() - start
        for res in results:
            res.step_seconds = elapsed
        return results

    def _decode(self, prefilled, captures) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy decoding of all requests at once, token for token what ExplicitVLM.greedy does
        for each alone: one batch row per request, its keys in a padded per-layer cache, SDPA
        with a per-row length mask. A finished row keeps running (its output is ignored and its
        cache length stops growing) so the batch never reshapes."""
        vlm, lm = self.vlm, self.vlm.lm
        dev = vlm.device
        B = len(prefilled)
        logits = torch.stack([lg for lg, _, _ in prefilled])
        lens = torch.tensor([caches[0].keys[0].shape[0] for _, caches, _ in prefilled], device=dev)
        next_pos = torch.tensor([p for _, _, p in prefilled], device=dev)
        cap = int(lens.max()) + self.max_tokens
        # Padded caches (B, Hkv, cap, D) per layer, filled from the prefill caches.
        K, V = [], []
        for li in range(vlm.num_layers):
            k0 = prefilled[0][1][li].keys[0]
            Kl = k0.new_zeros(B, k0.shape[1], cap, k0.shape[2])
            Vl = torch.zeros_like(Kl)
            for b, (_, caches, _) in enumerate(prefilled):
                n = int(lens[b])
                Kl[b, :, :n] = caches[li].keys[0].transpose(0, 1)
                Vl[b, :, :n] = caches[li].values[0].transpose(0, 1)
            K.append(Kl)
            V.append(Vl)
        del prefilled

        answers: list[list[int]] = [[] for _ in range(B)]
        top1s: list[list[float]] = [[] for _ in range(B)]
        done = [False] * B
        rows = torch.arange(B, device=dev)
        slots = torch.arange(cap, device=dev)
        while True:
            probs = torch.softmax(logits, dim=-1)
            toks = torch.argmax(logits, dim=-1)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(toks[b])
                answers[b].append(tok)
                top1s[b].append(float(probs[b, tok]))
                done[b] = tok in vlm.eos_ids or len(answers[b]) >= self.max_tokens
            active = [b for b in range(B) if not done[b]]
            if not active:
                return answers, top1s
            h = lm.embed_tokens(toks)
            cos, sin = lm.rotary_emb(h[None], next_pos.expand(3, -1)[:, None, :])
            cos, sin = cos[0], sin[0]
            visible = slots[None, :] <= lens[:, None]  # (B, cap): the row's keys and its own
            for li, layer in enumerate(lm.layers):
                attn = layer.self_attn
                q, k, v = layer_qkv(layer, h, cos, sin)
                K[li][rows, :, lens] = k
                V[li][rows, :, lens] = v
                out = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None, :], K[li], V[li], attn_mask=visible[:, None, None, :],
                    scale=attn.scaling, enable_gqa=True,
                )[:, :, 0, :]
                for b in active:
                    n = int(lens[b]) + 1
                    captures[b](
                        li, None, q[b : b + 1], lens[b : b + 1], slots[:n], K[li][b, :, :n].transpose(0, 1)
                    )
                h = h + attn.o_proj(out.reshape(B, -1).to(h.dtype))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = vlm.model.lm_head(lm.norm(h)).float()
            step = torch.zeros(B, dtype=lens.dtype, device=dev)
            step[active] = 1
            lens += step
            next_pos += step
