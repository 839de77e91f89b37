"""The VLM families SGL supports: one entry per family, the only place that names family classes.

Adding a family means adding a `Family` here (and, for the engine, its vLLM model class in
`vllm_sgl/model.py`). Everything else asks this module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str  # what users pass to --family
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]; also the transformers model class
    config_cls: str
    processor_cls: str
    vision_config_cls: str
    text_config_cls: str

    def _transformers(self, name: str) -> Any:
        return getattr(importlib.import_module("transformers"), name)

    @property
    def hf_model_cls(self) -> Any:
        return self._transformers(self.architecture)

    @property
    def hf_config_cls(self) -> Any:
        return self._transformers(self.config_cls)

    @property
    def hf_processor_cls(self) -> Any:
        return self._transformers(self.processor_cls)

    def tiny_vision_config(
        self, *, out_hidden: int, depth: int, width: int, heads: int, global_blocks: int = 1
    ) -> dict:
        """Vision tower of a tiny checkpoint; patch/merge sizes are the real models' so the
        image tokenization (grid, placeholder count) is exactly the real family's.
        global_blocks: Qwen2.5-VL's trailing full-attention blocks (the others are windowed)."""
        common = dict(
            depth=depth,
            num_heads=heads,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        if self.name == "qwen2_vl":
            return dict(common, embed_dim=width, hidden_size=out_hidden, mlp_ratio=2,
                        hidden_act="quick_gelu")
        # Qwen2.5-VL: windowed attention (112 px windows = 4x4 merged tokens), last blocks global.
        return dict(common, hidden_size=width, intermediate_size=2 * width, out_hidden_size=out_hidden,
                    hidden_act="silu", window_size=112,
                    fullatt_block_indexes=list(range(depth - global_blocks, depth)),
                    tokens_per_second=2)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2_vl",
            model_type="qwen2_vl",
            architecture="Qwen2VLForConditionalGeneration",
            config_cls="Qwen2VLConfig",
            processor_cls="Qwen2VLProcessor",
            vision_config_cls="Qwen2VLVisionConfig",
            text_config_cls="Qwen2VLTextConfig",
        ),
        Family(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            architecture="Qwen2_5_VLForConditionalGeneration",
            config_cls="Qwen2_5_VLConfig",
            processor_cls="Qwen2_5_VLProcessor",
            vision_config_cls="Qwen2_5_VLVisionConfig",
            text_config_cls="Qwen2_5_VLTextConfig",
        ),
    )
}


def family_for_config(config: Any) -> Family:
    """The family of a loaded (transformers) config, or a ValueError listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    archs = getattr(config, "architectures", None) or []
    for family in FAMILIES.values():
        if family.architecture in archs:
            return family
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
    raise ValueError(
        f"SGL does not support model_type={model_type!r} (architectures={archs}); supported: {supported}"
    )
