"""The VLM families SGL supports: one entry per family, the only place that names family classes.

Adding a family means adding a `Family` here (and, for the engine, its vLLM wrapper class in
`vllm_sgl/engine/model.py`). Everything else asks this module.
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
    # Guide and target must be of one lineage (same image tokenization, same position scheme);
    # a dense guide may serve an MoE target of its lineage (Qwen3-VL 4B guiding 235B-A22B).
    lineage: str = ""
    patch_size: int = 14
    video_processor_cls: str = "Qwen2VLVideoProcessor"
    # Qwen3-VL: M-RoPE frequency channels cycle t, h, w instead of contiguous sections.
    interleaved_mrope: bool = False
    # Qwen3-VL: RMSNorm on each head's q and k before RoPE.
    qk_norm: bool = False
    moe: bool = False  # the language model's MLPs are mixtures of experts
    # False: plain 1D RoPE (InternVL); every kept token keeps its unpruned position all the same
    mrope: bool = True
    # How a video is pruned (every family's are). False: a video is one run of tokens on its
    # (t, h, w) grid (Qwen2/2.5-VL), one keep set of keep_count(N, r) over all its frames. True: each
    # frame is its own run after its text (Qwen3-VL's timestamps: an image of grid (1, h, w) per
    # temporal patch; InternVL's "FrameI:": one 448 px tile per frame), an image to the guide and to
    # positions, with its own keep_count(N / frames, r) tokens: the text between frames fixes each
    # frame's slot.
    frame_spans: bool = False

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
        if self.name == "internvl":
            # InternViT: 448 px tiles of 14 px patches, pixel shuffle 0.5 -> 256 tokens per tile
            return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                        intermediate_size=2 * width, image_size=[448, 448], patch_size=[14, 14])
        if self.name in ("qwen3_vl", "qwen3_vl_moe"):
            # 16 px patches; a learned 2D position grid (resampled per image) besides the rotary
            # one; deepstack mergers after the first blocks.
            return dict(common, patch_size=16, hidden_size=width, intermediate_size=2 * width,
                        out_hidden_size=out_hidden, hidden_act="gelu_pytorch_tanh",
                        num_position_embeddings=256, deepstack_visual_indexes=list(range(min(2, depth))))
        if self.name == "qwen2_vl":
            return dict(common, embed_dim=width, hidden_size=out_hidden, mlp_ratio=2,
                        hidden_act="quick_gelu")
        # Qwen2.5-VL: windowed attention (112 px windows = 4x4 merged tokens), last blocks global.
        return dict(common, hidden_size=width, intermediate_size=2 * width, out_hidden_size=out_hidden,
                    hidden_act="silu", window_size=112,
                    fullatt_block_indexes=list(range(depth - global_blocks, depth)),
                    tokens_per_second=2)


# What Qwen3-VL dense and MoE share (one lineage: a dense guide serves an MoE target). Their
# deepstack features (intermediate vision blocks' outputs added to the first language-model layers'
# visual rows) are read from the config (vision_config.deepstack_visual_indexes) where needed.
_QWEN3_VL = dict(lineage="qwen3_vl", patch_size=16, video_processor_cls="Qwen3VLVideoProcessor",
                 interleaved_mrope=True, qk_norm=True, frame_spans=True)

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
            lineage="qwen2_vl",
        ),
        Family(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            architecture="Qwen2_5_VLForConditionalGeneration",
            config_cls="Qwen2_5_VLConfig",
            processor_cls="Qwen2_5_VLProcessor",
            vision_config_cls="Qwen2_5_VLVisionConfig",
            text_config_cls="Qwen2_5_VLTextConfig",
            lineage="qwen2_5_vl",
        ),
        Family(
            name="qwen3_vl",
            model_type="qwen3_vl",
            architecture="Qwen3VLForConditionalGeneration",
            config_cls="Qwen3VLConfig",
            processor_cls="Qwen3VLProcessor",
            vision_config_cls="Qwen3VLVisionConfig",
            text_config_cls="Qwen3VLTextConfig",
            **_QWEN3_VL,
        ),
        Family(
            name="qwen3_vl_moe",
            model_type="qwen3_vl_moe",
            architecture="Qwen3VLMoeForConditionalGeneration",
            config_cls="Qwen3VLMoeConfig",
            processor_cls="Qwen3VLProcessor",
            vision_config_cls="Qwen3VLMoeVisionConfig",
            text_config_cls="Qwen3VLMoeTextConfig",
            moe=True,
            **_QWEN3_VL,
        ),
        Family(
            name="internvl",
            model_type="internvl",
            architecture="InternVLForConditionalGeneration",
            config_cls="InternVLConfig",
            processor_cls="InternVLProcessor",
            vision_config_cls="InternVLVisionConfig",
            text_config_cls="Qwen2Config",
            lineage="internvl",
            video_processor_cls="InternVLVideoProcessor",
            mrope=False,
            frame_spans=True,
        ),
    )
}


def family_for_model_type(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


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
