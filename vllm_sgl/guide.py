"""The guide inside the engine's worker: full prompt in, greedy answer, importance, keep sets out.

It runs the same written-out forward as the reference (ExplicitVLM) but with SDPA, so no
attention map is ever materialised; the post-RoPE queries of the importance rows and the keys are
captured and reduced by the importance kernel (fused Triton on CUDA, its PyTorch definition
elsewhere) in one call for all requests of the step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_sgl.capture import capture_to_varlen, merge_varlen
from vllm_sgl.reference import ExplicitVLM, PreparedInput, QKCapture, top_k_keep


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
        results: list[GuideResult] = []
        batches: list[dict] = []
        for req in requests:
            prep = self._prepare(req)
            if len(prep.visual_spans) != len(req.keep_counts):
                raise ValueError(
                    f"request {req.request_id}: {len(prep.visual_spans)} image spans in the prompt "
                    f"but {len(req.keep_counts)} images"
                )
            embeds = self.vlm.input_embeddings(prep)
            positions = self.vlm.positions(prep)
            capture = QKCapture(prep.visual_spans, self.vlm.num_layers)
            answer, top1, _ = self.vlm.greedy(
                embeds, positions, self.max_tokens, observer=capture, explicit=False
            )
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
            batches.append(capture_to_varlen(prep, capture))

        # One importance reduction for the whole step's requests.
        from vllm_sgl.kernels import visual_importance

        merged = merge_varlen(batches)
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
