"""Tiny random guide/target checkpoint pairs, built locally (no weights can be downloaded here).

Each checkpoint is complete (config, safetensors, byte-level BPE tokenizer with the family's
special tokens and chat template, image/video processor) and loads with transformers' Auto classes
and with vLLM. Guide and target share the processor and the vision patch/merge sizes, so an image
gives both the same visual tokens at the same positions; the target's language model is deeper
and wider. Random weights give near-uniform attention, so the query/key projections are scaled
up until importance rankings have clear margins (see `measure_tie_rate`).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_sgl.families import FAMILIES, Family

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (images and videos as placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL: the tokenizer attributes its processor reads, and its chat template (an image is one
# <IMG_CONTEXT> the processor expands into <img> + 256 x tiles <IMG_CONTEXT> + </img>).
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n") \
    .replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
# ImageNet statistics, as the InternVL checkpoints normalise
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

_WORDS = (
    "what is in the image describe picture photo color red green blue yellow black white "
    "how many people cars dogs cats trees sky road house window door left right top bottom "
    "center small large big little there are is a an of on at with and or not yes no one two "
    "three four five six seven eight nine ten this that these those where which who why when "
    "answer question short long word sentence count objects shape circle square line text sign "
    "the man woman child animal bird water mountain city street table chair book cup bottle"
).split()


@dataclass(frozen=True)
class LMSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class TinyPairSpec:
    family: str = "qwen2_5_vl"
    seed: int = 0
    guide: LMSize = LMSize(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)
    target: LMSize = LMSize(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1024)
    vision_width: int = 128
    vision_depth: int = 2
    vision_heads: int = 2
    # Qwen2.5-VL towers: how many trailing blocks attend globally (real towers: 4 of 32).
    vision_global_blocks: int = 1
    bpe_vocab: int = 512
    # Std of the attention logits q.k/sqrt(d). Measured (measure_tie_rate, 60 images): std 3 gave
    # k-th/(k+1)-th relative gaps below 1e-4 in 3% of prompts, std 16 in none (median gap 1.1%).
    qk_logit_std: float = 16.0
    # Fraction of decode states whose argmax is end-of-turn, so guide answers usually finish.
    eos_rate: float = 0.12
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    # "shapes": the trained pair of the shapes task (vllm_sgl/tasks): its tokenizer learns the
    # task's words and its weights come from the repo instead of a random draw.
    task: str = ""


# Sizes for throughput measurements: the target costs >= 8x the guide per token. The vision
# towers attend within windows only: at width 128 one global block over 4096 patches costs about
# ten times its parameters' work, which made vision ~10% of the target's cost per request, where a
# real tower (width 1280, 4 of 32 blocks global) is a few percent of a 72B target's.
BENCH_SPEC = TinyPairSpec(
    guide=LMSize(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512),
    target=LMSize(hidden=1024, layers=6, heads=16, kv_heads=4, intermediate=2816),
    vision_global_blocks=0,
)


# Bench pairs whose target/guide language-model work per token is that of the pairs users run:
# ~24x (like Qwen2.5-VL 3B guiding 72B) and ~10x (3B guiding 32B). Same guide and vision towers
# as BENCH_SPEC; the ratios are read from the checkpoints by benchmarks/throughput.py ("ideal").
# The trained pair of the shapes task, weights from vllm_sgl/tasks/weights (vllm_sgl/tasks/train.py):
# the default target and a 2-layer guide (a question's word reaches the answer position in one
# layer, the object it names is found in the next), 8x cheaper per token and, as in the paper's
# regime, clearly the weaker model (test split: guide 0.51, target 0.68).
SHAPES_SPEC = TinyPairSpec(task="shapes", guide=LMSize(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512))

BENCH_PAIRS = {
    "bench": BENCH_SPEC,
    "24x": TinyPairSpec(
        guide=BENCH_SPEC.guide,
        target=LMSize(hidden=768, layers=4, heads=12, kv_heads=4, intermediate=2304),
        vision_global_blocks=0,
    ),
    "10x": TinyPairSpec(
        guide=BENCH_SPEC.guide,
        target=LMSize(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536),
        vision_global_blocks=0,
    ),
}


def _log(msg: str) -> None:
    print(f"[make-tiny-pair] {msg}", file=sys.stderr, flush=True)


def build_tokenizer(spec: TinyPairSpec):
    """A byte-level BPE trained on a fixed word list (deterministic), wrapped as Qwen2Tokenizer
    (InternVL: with its image tokens and their tokenizer attributes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1234)
    words = _WORDS
    if spec.task == "shapes":  # every word of the task one token, so answers are short
        from vllm_sgl.tasks.shapes import vocabulary

        words = vocabulary()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    internvl = spec.family == "internvl"
    extra = {}
    if internvl:
        tok.add_special_tokens(list(INTERNVL_TOKENS.values()))
        extra = dict(extra_special_tokens=INTERNVL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=INTERNVL_CHAT_TEMPLATE if internvl else CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        **extra,
    )
    return fast


def _text_config(family: Family, size: LMSize, vocab: int, ids: dict[str, int]) -> dict:
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    if family.interleaved_mrope:  # Qwen3-VL: 24:20:20 of 64 channels, interleaved t, h, w
        h = half * 5 // 16
        mrope_section = [half - 2 * h, h, h]
    else:  # M-RoPE splits head_dim/2 rotary frequencies over (t, h, w) as the real models do (16:24:24)
        t = half // 4
        mrope_section = [t, (half - t) // 2, half - t - (half - t) // 2]
    extra: dict = {}
    if family.qk_norm:
        extra.update(head_dim=head_dim, attention_bias=False)
    if family.moe:  # every layer sparse, as Qwen3-VL-30B-A3B; experts an eighth of the dense MLP wide
        extra.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=max(16, size.intermediate // 8),
                     decoder_sparse_step=1, mlp_only_layers=[],
                     norm_topk_prob=True)  # in the real checkpoints; vLLM reads it, transformers always normalises
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section}
    if not family.mrope:
        del rope["mrope_section"]
        extra["model_type"] = "qwen2"  # InternVL's language model: a plain Qwen2 decoder
    if family.interleaved_mrope:
        rope["mrope_interleaved"] = True
    return dict(
        extra,
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _sharpen(model, size: LMSize, spec: TinyPairSpec, eos_ids: list[int], generator) -> None:
    """Scale q/k projections (or, with per-head q/k norms, their scales) so attention is peaky, and
    give end-of-turn a larger lm_head row."""
    import torch

    lm = model.model.language_model
    head_dim = size.hidden // size.heads
    # RMSNorm output has unit RMS; q.k/sqrt(d) has std ~ std_w^2 * hidden * sqrt(head_dim).
    std_w = (spec.qk_logit_std / (size.hidden * head_dim**0.5)) ** 0.5
    with torch.no_grad():
        for layer in lm.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                # q and k have unit RMS per head after their norms: q.k/sqrt(d) has std ~ g_q * g_k.
                # Random signs per channel so the norms do not favour one direction.
                for norm in (attn.q_norm, attn.k_norm):
                    sign = torch.randint(0, 2, norm.weight.shape, generator=generator) * 2 - 1
                    norm.weight.copy_(sign * spec.qk_logit_std**0.5)
                continue
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.normal_(0.0, std_w, generator=generator)
                proj.bias.normal_(0.0, 0.5 * std_w * size.hidden**0.5, generator=generator)
        head = model.lm_head.weight
        head.normal_(0.0, 0.1, generator=generator)
        # A row k times longer wins argmax on a state-independent share of inputs; eos_rate tunes it.
        vocab = head.shape[0]
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - 1 / vocab)  # expected max of the other logits, in std units
        z_eos = NormalDist().inv_cdf(1 - spec.eos_rate)
        scale = max(1.0, z / max(z_eos, 1e-3))
        for eos in eos_ids:
            head[eos] *= scale


def build_config(family: Family, spec: TinyPairSpec, size: LMSize, vocab: int, ids: dict):
    """The transformers config of one checkpoint of the pair."""
    cfg_cls = family.hf_config_cls
    text = _text_config(family, size, vocab, ids)
    vision = family.tiny_vision_config(
        out_hidden=size.hidden, depth=spec.vision_depth, width=spec.vision_width, heads=spec.vision_heads,
        global_blocks=spec.vision_global_blocks,
    )
    if family.name == "internvl":
        config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                         image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)
    else:
        config = cfg_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
    config.architectures = [family.architecture]
    config.dtype = "float32"
    return config


def _build_model(family: Family, spec: TinyPairSpec, size: LMSize, vocab: int, ids: dict, seed: int):
    import torch

    config = build_config(family, spec, size, vocab, ids)
    torch.manual_seed(seed)
    model = family.hf_model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers' init differs across versions; redraw every weight from our own generator
        # so a seed gives the same checkpoint everywhere.
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # the only 1-D weights are norm scales; biases start at 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                # 3-D: stacked experts (experts, out, in)
                fan_in = p.shape[-1] if p.dim() == 3 else p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    _sharpen(model, size, spec, [ids["<|im_end|>"], ids["<|endoftext|>"]], gen)
    return model


def build_processor(family: Family, tokenizer, spec: TinyPairSpec):
    import transformers
    from transformers import Qwen2VLImageProcessor

    if family.name == "internvl":  # 448 px tiles (up to 6 and a thumbnail), crop_to_patches on
        image_processor = transformers.GotOcr2ImageProcessor(
            size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=6,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return family.hf_processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                                       # frames as the published checkpoints take them: 448 px, ImageNet's normalisation
                                       video_processor=transformers.InternVLVideoProcessor(
                                           size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN,
                                           image_std=IMAGENET_STD),
                                       image_seq_length=256, chat_template=INTERNVL_CHAT_TEMPLATE)

    # The pixel budgets are in 28 px merged units; a 16 px-patch family gets the same token budget.
    scale = (family.patch_size / 14) ** 2
    pixels = dict(min_pixels=int(spec.min_pixels * scale), max_pixels=int(spec.max_pixels * scale))
    geometry = dict(patch_size=family.patch_size, merge_size=2, temporal_patch_size=2)
    video_processor = getattr(transformers, family.video_processor_cls)(**geometry, **pixels)
    # Images normalised as videos are, as in the published checkpoints (Qwen3-VL: 0.5, Qwen2/2.5-VL:
    # CLIP's): vLLM normalises both on the device with the image processor's values.
    image_processor = Qwen2VLImageProcessor(**geometry, **pixels, image_mean=video_processor.image_mean,
                                            image_std=video_processor.image_std)
    return family.hf_processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _experts_to_checkpoint_layout(path: Path, text_config: dict) -> None:
    """Stacked expert weights as the published Qwen3-VL-MoE checkpoints hold them, (experts, in, out):
    transformers transposes them when it loads (its conversion mapping) and vLLM reads that layout,
    but a model built from a config saves its in-memory (experts, out, in) layout unchanged. Only a
    tensor still in the in-memory layout is transposed (should transformers start converting)."""
    from safetensors.torch import load_file, save_file

    hidden, inter = text_config["hidden_size"], text_config["moe_intermediate_size"]
    in_memory = {"mlp.experts.gate_up_proj": (2 * inter, hidden), "mlp.experts.down_proj": (hidden, inter)}
    weights = load_file(str(path))
    for name in weights:
        for suffix, shape in in_memory.items():
            if name.endswith(suffix) and tuple(weights[name].shape[1:]) == shape:
                weights[name] = weights[name].transpose(1, 2).contiguous()
    save_file(weights, str(path), metadata={"format": "pt"})


def guide_family(family: Family) -> Family:
    """The guide's family in a tiny pair: the dense model of the target's lineage, as users pair
    them (Qwen3-VL 4B guiding 30B-A3B); the family itself when it is dense."""
    if not family.moe:
        return family
    return next(f for f in FAMILIES.values() if f.lineage == family.lineage and not f.moe)


@dataclass
class PairParts:
    """What both checkpoints of a pair share, and each one's config: built the same way for a random
    draw, for training (vllm_sgl/tasks/train.py) and for the trained pair's files."""

    family: Family
    tokenizer: object
    processor: object
    ids: dict
    vocab: int

    def config(self, spec: TinyPairSpec, role: str):
        fam = guide_family(self.family) if role == "guide" else self.family
        return build_config(fam, spec, spec.guide if role == "guide" else spec.target, self.vocab, self.ids)


def pair_parts(spec: TinyPairSpec) -> PairParts:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; accepted: {', '.join(FAMILIES)}")
    family = FAMILIES[spec.family]
    tokenizer = build_tokenizer(spec)
    extra = list(INTERNVL_TOKENS.values()) if spec.family == "internvl" else []
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + extra}
    vocab = (len(tokenizer) + 63) // 64 * 64
    return PairParts(family, tokenizer, build_processor(family, tokenizer, spec), ids, vocab)


def save_checkpoint(d: Path, model, parts: PairParts, moe: bool = False) -> None:
    """A complete checkpoint directory: config, safetensors, tokenizer, processor, generation config."""
    from transformers import GenerationConfig

    model.save_pretrained(d, safe_serialization=True)
    if moe:
        _experts_to_checkpoint_layout(d / "model.safetensors", model.config.text_config.to_dict())
    parts.processor.save_pretrained(d)
    ids = parts.ids
    GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
    ).save_pretrained(d)


def _trained_model(parts: PairParts, spec: TinyPairSpec, role: str):
    """A checkpoint of a trained pair: the config built as for training, the repo's weights."""
    import torch
    from safetensors.torch import load_file

    from vllm_sgl.tasks import trained_weights

    config = parts.config(spec, role)
    fam = guide_family(parts.family) if role == "guide" else parts.family
    model = fam.hf_model_cls(config).to(torch.float32).eval()
    weights = {k: v.to(torch.float32) for k, v in load_file(str(trained_weights(spec.task, role))).items()}
    model.load_state_dict(weights, strict=True)
    return model


def make_tiny_pair(out_dir: str | os.PathLike, spec: TinyPairSpec = TinyPairSpec()) -> tuple[Path, Path]:
    """Write OUT/guide and OUT/target; returns their paths. Deterministic for a given spec."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log(f"1/4 tokenizer (byte-level BPE, {spec.bpe_vocab} + {len(SPECIAL_TOKENS)} special tokens)")
    parts = pair_parts(spec)
    paths = []
    with torch.device("cpu"):
        for step, (role, size, seed) in enumerate(
            (("guide", spec.guide, spec.seed * 2 + 11), ("target", spec.target, spec.seed * 2 + 12)), start=2
        ):
            fam = guide_family(parts.family) if role == "guide" else parts.family
            if spec.task:
                _log(f"{step}/4 {role}: {fam.name}, {size.layers} layers x {size.hidden} hidden, "
                     f"trained on the {spec.task} task")
                model = _trained_model(parts, spec, role)
            else:
                _log(f"{step}/4 {role}: {fam.name}, {size.layers} layers x {size.hidden} hidden, seed {seed}")
                model = _build_model(fam, spec, size, parts.vocab, parts.ids, seed)
            d = out / role
            save_checkpoint(d, model, parts, moe=fam.moe)
            paths.append(d)
    (out / "tiny_pair.json").write_text(json.dumps(_marker(spec), indent=2) + "\n")
    _log(f"4/4 written {out}/guide and {out}/target")
    return paths[0], paths[1]


# Bumped when a pair built from the same spec comes out different (3: Qwen3-VL images normalised
# as its videos; InternVL's frames 448 px, normalised as its images), so cached pairs are rebuilt.
BUILDER_REVISION = 3


def _marker(spec: TinyPairSpec) -> dict:
    """What a written pair was made from: the spec, and for a trained pair its weights' digests (a
    retrained pair in the repo replaces a cached one)."""
    marker = dict(asdict(spec), builder=BUILDER_REVISION)
    if spec.task:
        import hashlib

        from vllm_sgl.tasks import trained_weights

        marker["weights"] = {role: hashlib.sha256(trained_weights(spec.task, role).read_bytes()).hexdigest()[:16]
                             for role in ("guide", "target")}
    return marker


def ensure_tiny_pair(out_dir: str | os.PathLike, spec: TinyPairSpec = TinyPairSpec()) -> tuple[Path, Path]:
    """make_tiny_pair, skipped when OUT already holds a pair built from the same spec."""
    out = Path(out_dir)
    marker = out / "tiny_pair.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(_marker(spec))):
        if (out / "guide" / "model.safetensors").exists() and (out / "target" / "model.safetensors").exists():
            return out / "guide", out / "target"
    return make_tiny_pair(out, spec)


def default_pair_dir(name: str = "tiny-qwen2_5_vl") -> Path:
    root = Path(os.environ.get("VLLM_SGL_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    return root / name


def measure_tie_rate(
    guide_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    samples: int = 100,
    keep_ratio: float = 0.25,
    rel_gap: float = 1e-4,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """How often the k-th/(k+1)-th importance gap is below `rel_gap` (relative), over synthetic
    images and questions: the figure that says whether keep-set comparisons can flake."""
    from vllm_sgl.images import synthetic_image, synthetic_question
    from vllm_sgl.reference import SGLReference, keep_count

    ref = SGLReference(guide_dir, target_dir)
    close, finished, gaps = 0, 0, []
    for i in range(samples):
        prep = ref.prepare([synthetic_image(seed * 100003 + i)], synthetic_question(seed * 7919 + i))
        _, _, answer, _, importance = ref.guide_pass(prep, max_new_tokens)
        finished += answer[-1] in ref.guide.eos_ids
        imp = importance[0]
        k = keep_count(imp.numel(), keep_ratio)
        if k >= imp.numel():
            continue
        s = torch_sorted_desc(imp)
        gap = float((s[k - 1] - s[k]) / s[k - 1])
        gaps.append(gap)
        close += gap < rel_gap
        if (i + 1) % 10 == 0:
            _log(f"tie rate: {i + 1}/{samples} samples")
    return {
        "samples": len(gaps),
        "below_rel_gap": close,
        "tie_rate": close / max(1, len(gaps)),
        "rel_gap": rel_gap,
        "min_gap": min(gaps) if gaps else None,
        "median_gap": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "guide_finished_rate": finished / samples,
    }


def torch_sorted_desc(t):
    import torch

    return torch.sort(t.to(torch.float64), descending=True).values
