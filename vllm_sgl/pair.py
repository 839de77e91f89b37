"""A guide/target pair: the check that both tokenize images identically (SGL_METHOD.md, Actors).

The guide's importance indexes the target's visual tokens, so the same image must give both
models the same number of visual tokens at the same prompt positions with the same M-RoPE grid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class PairError(ValueError):
    """A guide/target pair SGL cannot use; the message names the differing field."""


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise PairError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise PairError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise PairError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _image_processor_fields(model_dir: Path, kind: str = "image") -> dict[str, Any]:
    """The image (or video: kind "video") processor settings that decide the visual token grid."""
    # a video processor's own file, else (as transformers builds it) the image processor's
    names = ("processor_config.json", "preprocessor_config.json") if kind == "image" else \
        ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json")
    for name in names:
        p = model_dir / name
        if p.exists():
            data = _load_json(p)
            if kind == "video" and name == "processor_config.json" and "video_processor" not in data:
                continue
            data = data.get(f"{kind}_processor", data)
            size = data.get("size") or {}
            return {
                "patch_size": data.get("patch_size"),
                "merge_size": data.get("merge_size"),
                "temporal_patch_size": data.get("temporal_patch_size"),
                "min_pixels": data.get("min_pixels", size.get("shortest_edge")),
                "max_pixels": data.get("max_pixels", size.get("longest_edge")),
                # the engine normalises pixels once, with the target's settings, for both models
                "image_mean": data.get("image_mean"),
                "image_std": data.get("image_std"),
                "rescale_factor": data.get("rescale_factor"),
                # InternVL's tiling: tile size, tile count bounds, thumbnail
                "size": data.get("size"),
                "crop_to_patches": data.get("crop_to_patches"),
                "min_patches": data.get("min_patches"),
                "max_patches": data.get("max_patches"),
            }
    return {}


def _vision_fields(config: dict) -> dict[str, Any]:
    from vllm_sgl.families import family_for_model_type

    vision = config.get("vision_config") or {}
    family = family_for_model_type(config.get("model_type"))
    return {
        # one lineage tokenizes and positions images one way (a dense guide may serve an MoE target)
        "family": family.lineage if family else config.get("model_type"),
        "vision_config.patch_size": vision.get("patch_size", family.patch_size if family else 14),
        "vision_config.spatial_merge_size": vision.get("spatial_merge_size", 2),
        "vision_config.temporal_patch_size": vision.get("temporal_patch_size", 2),
        "image_token_id": config.get("image_token_id"),
        "vision_start_token_id": config.get("vision_start_token_id"),
        "vision_end_token_id": config.get("vision_end_token_id"),
        # InternVL: tokens per tile
        "vision_config.image_size": vision.get("image_size"),
        "downsample_ratio": config.get("downsample_ratio"),
        "image_seq_length": config.get("image_seq_length"),
    }


def resolve_model_dir(name_or_path: str | os.PathLike, role: str) -> Path:
    """A local checkpoint directory, or a PairError saying what is missing."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PairError(f"{role} checkpoint {str(path)!r} has no config.json")
        return path
    try:  # a hub name: resolve through the local cache (no download in this environment)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=not _hub_allowed()))
    except Exception as e:  # noqa: BLE001 - any failure here means "not found"
        raise PairError(
            f"{role} checkpoint {str(name_or_path)!r} not found (not a directory, and not in the "
            f"Hugging Face cache: {type(e).__name__})"
        ) from None


def _hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")


def check_pair(guide_dir: str | os.PathLike, target_dir: str | os.PathLike) -> None:
    """Raise PairError naming the first field where guide and target tokenize images or videos differently."""
    from vllm_sgl.families import FAMILIES

    guide, target = Path(guide_dir), Path(target_dir)
    g_cfg, t_cfg = _load_json(guide / "config.json"), _load_json(target / "config.json")
    supported = {f.model_type for f in FAMILIES.values()}
    for role, cfg in (("guide", g_cfg), ("target", t_cfg)):
        if cfg.get("model_type") not in supported:
            raise PairError(
                f"{role} model_type {cfg.get('model_type')!r} is not supported; "
                f"supported: {', '.join(sorted(supported))}"
            )
    fields_g, fields_t = _vision_fields(g_cfg), _vision_fields(t_cfg)
    for kind in ("image", "video"):  # the guide reads the target's processed pixels, videos' too
        fields_g.update({f"{kind}_processor.{k}": v for k, v in _image_processor_fields(guide, kind).items()})
        fields_t.update({f"{kind}_processor.{k}": v for k, v in _image_processor_fields(target, kind).items()})
    for key in fields_t:
        if fields_g.get(key) != fields_t.get(key):
            raise PairError(
                f"guide and target tokenize images or videos differently: {key} is {fields_g.get(key)!r} in the "
                f"guide ({guide}) but {fields_t.get(key)!r} in the target ({target})"
            )
