"""Importance from captured guide queries and keys, through the kernel's definition or the fused
Triton kernel (the `torch` / `triton` importance backends of `vllm-sgl reference`)."""

from __future__ import annotations

import torch

from vllm_sgl.reference import PreparedInput, QKCapture


def capture_to_varlen(prep: PreparedInput, capture: QKCapture) -> dict:
    """One request in the kernel's dense varlen layout."""
    queries = torch.stack([torch.cat(per_layer) for per_layer in capture.q])  # (layers, R, Hq, D)
    keys = torch.stack(capture.keys)  # (layers, T, Hkv, D)
    row_pos = torch.cat(capture.row_seq).to(torch.int32)
    spans = prep.visual_spans
    return dict(
        queries=queries,
        keys=keys,
        cu_rows=torch.tensor([0, queries.shape[1]], dtype=torch.int32),
        row_pos=row_pos,
        cu_keys=torch.tensor([0, keys.shape[1]], dtype=torch.int32),
        image_req=torch.zeros(len(spans), dtype=torch.int32),
        image_start=torch.tensor([s for s, _ in spans], dtype=torch.int32),
        image_len=torch.tensor([n for _, n in spans], dtype=torch.int32),
    )


def importance_from_capture(prep: PreparedInput, capture: QKCapture, backend: str) -> list[torch.Tensor]:
    """Per-image importance recomputed from the captured post-RoPE q/k with `backend`."""
    from vllm_sgl.kernels import visual_importance

    if not prep.visual_spans:
        return []
    args = capture_to_varlen(prep, capture)
    flat = visual_importance(**args, backend=backend)
    return list(torch.split(flat.float().cpu(), [n for _, n in prep.visual_spans]))


def merge_varlen(batches: list[dict]) -> dict:
    """Concatenate single-request varlen layouts into one batch (offsets shifted)."""
    queries = torch.cat([b["queries"] for b in batches], dim=1)
    keys = torch.cat([b["keys"] for b in batches], dim=1)
    rows = [b["queries"].shape[1] for b in batches]
    lens = [b["keys"].shape[1] for b in batches]
    cu = lambda sizes: torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    image_req = torch.cat(
        [torch.full_like(b["image_req"], i) for i, b in enumerate(batches)]
    ) if batches else torch.zeros(0, dtype=torch.int32)
    return dict(
        queries=queries,
        keys=keys,
        cu_rows=cu(rows),
        row_pos=torch.cat([b["row_pos"] for b in batches]),
        cu_keys=cu(lens),
        image_req=image_req,
        image_start=torch.cat([b["image_start"] for b in batches]),
        image_len=torch.cat([b["image_len"] for b in batches]),
    )
