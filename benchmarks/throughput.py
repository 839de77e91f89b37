#!/usr/bin/env python
"""Throughput: vanilla vLLM against SGL (`--model-impl sgl`) on the same target and workload.

    python benchmarks/throughput.py                         # bench tiny pair, offline, ratios 0.5,0.25,0.1
    python benchmarks/throughput.py --num-requests 32 --visual-tokens 1024 --output-len 16
    python benchmarks/throughput.py --smoke                 # test tiny pair, 4 requests, ratio 0.25
    python benchmarks/throughput.py --online http://127.0.0.1:8000 http://127.0.0.1:8001 --ratios 0.25 \\
        --request-rate 4                                    # running servers: vanilla first, then SGL

Workload: `--num-requests` prompts, each `--images-per-request` synthetic images of exactly
`--visual-tokens` N visual tokens (image size (w, h) = (b * 28, a * 28) with a * b = N, a the largest
factor <= sqrt(N); checked against the target's image processor) and a short question; every
request decodes exactly `--output-len` tokens (greedy, ignore_eos) so all configurations do the same
decode work. The images and questions are the same for every configuration.

Offline (default): one LLM engine at a time (vanilla, then SGL at each keep ratio), shut down
between; each gets a small warm-up batch first, then LLM.generate over all requests is timed.
Online (`--online VANILLA_URL SGL_URL...`): the same requests as chat completions (base64 PNG
data URLs, streamed) against running servers, at `--request-rate` requests/s (Poisson; inf = all at
once) with at most `--max-concurrency` in flight; the SGL URLs are labelled with `--ratios` in order.

Columns: requests/s and output tokens/s over the timed run; time to first token (offline:
RequestOutput.metrics.first_token_latency, from arrival, so it includes queueing behind the whole
batch; online: from sending to the first streamed token); target prompt tokens (SGL: text + kept
visual tokens); KV blocks = sum over requests of ceil(prompt_len / block_size) (block size from the
engine config; online: --block-size); speed-up = requests/s over vanilla's; CPU s/req = user +
system CPU seconds of the benchmark process and its children (vLLM's engine processes) per request
during the timed run (offline only), and CPU speed-up its ratio to vanilla's: on a machine shared with
other work this is steadier than wall time. With --repeats K every configuration runs K times,
interleaved, and reports its median-time run (all runs' requests/s are in the CSV).

Ideal speed-up: compute ~ parameters touched per token x tokens (matmul work; attention's
quadratic term and the sampler are ignored), with parameter counts read from the checkpoints'
safetensors headers:
    vanilla = V_t + B_t * (P_full + O) + H_t * O
    sgl     = V_t + V_g + B_g * (P_full + A) + H_g * A + B_t * (P_kept + O) + H_t * O
    ideal   = sum(vanilla) / sum(sgl)
B = language-model body params (decoder layers + final norm), H = lm_head params (applied to
generated tokens only; a prompt's last row is ignored), V = vision encoder work per image =
(patch embedding + blocks) params x patches + merger params x N. P_full / P_kept = prompt tokens
with all / the kept visual tokens, O = output tokens, A = the guide's answer tokens (offline: read
from the engine trace; online: --guide-max-tokens, an upper bound). "ideal LM" drops the V terms
(the vision encoders run in both configurations; SGL runs the guide's too). "ideal+attn" adds the
attention multiply-adds the parameter count misses, which grow with the square of the prompt:
    LM:     2 * layers * heads * head_dim * (L (L + 1) / 2 + sum_{i=1..O} (L + i))   per request
            (L = P_full for vanilla and the guide, P_kept for the SGL target; O = A for the guide)
    vision: 2 * width * patches * (full_blocks * patches + window_blocks * window_patches)  per image
"% ideal" = measured speed-up / ideal (the parameter-count ideal, LMs + vision encoders).

Early exit (offline): `--see-threshold T1,T2,...` adds one configuration per threshold, SGL at the
last --ratios entry with `see_threshold` T ("sgl@R+see@T"): a request whose guide answer scores
>= T is answered by the guide and the target does no work for it. SEE only answers requests whose
end the target decides, so with --see-threshold every configuration of the run decodes up to
--output-len tokens without ignore_eos (output lengths then differ between configurations; the
ideal uses each request's own). Exit rate = exited / requests (engine trace). The ideal of a SEE
configuration costs an exited request its guide only (V_g + B_g (P_full + A) + H_g A, plus the
consistency pass B_g (P_full - N + kc + A) with kc = max(1, floor(0.05 N))) and every other
request as SGL; "vs SGP" = its requests/s over the plain SGL configuration at the same ratio.
`--downscale` adds, per ratio, the alternative users have today: vanilla with each image
downscaled (mm_processor_kwargs max_pixels) so the target sees about as many visual tokens as SGL
keeps ("vanilla-small@R"); its ideal is vanilla's cost over its own.

Video (offline): `--video-frames F` makes each request one clip of F frames (synthetic scenes) of
the image size instead of images; N = F / 2 temporal patches x `--visual-tokens` tokens per video
(InternVL: F x 256). Configurations: vanilla, vLLM's EVS at each ratio where vLLM has it (Qwen2.5-VL,
Qwen3-VL: "evs@R": video_pruning_rate 1 - R, vanilla vLLM dropping the tokens that repeat the
previous frame; it keeps at least a whole first frame) and SGL at each ratio: the target keeps about
R x N tokens in both. EVS's ideal costs the target's encoder on
all N (EVS prunes its output) and the language model on what EVS keeps; the vision encoder's
attention is per frame.

    python benchmarks/throughput.py --video-frames 16 --visual-tokens 256 --ratios 0.5,0.25 \
        --num-requests 16 --out-dir out/throughput-video

Outputs: a table on stdout, OUT_DIR/throughput.csv, OUT_DIR/throughput.png, OUT_DIR/throughput.json.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCH, MERGE = 14, 2
CELL = PATCH * MERGE

FIELDS = [
    "config", "mode", "keep_ratio", "requests", "elapsed_s", "req_per_s", "out_tok_per_s", "ttft_mean_s",
    "ttft_p90_s", "prompt_tokens", "kv_blocks", "block_size", "guide_prompt_tokens", "guide_answer_tokens",
    "speedup", "ideal_speedup", "ideal_speedup_lm", "ideal_speedup_attn", "pct_of_ideal", "cpu_s_per_req",
    "cpu_speedup", "req_per_s_all_runs", "engine_start_s", "visual_tokens", "output_len", "target", "guide",
    "see_threshold", "exit_rate", "speedup_vs_sgp",
]


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="bench", help="tiny bench pair when --target/--guide are not given: "
                   "bench (target LM ~51x the guide's work per token), 24x (like 3B -> 72B), 10x (like 3B -> 32B)")
    p.add_argument("--family", default="qwen2_5_vl", help="the tiny pair's family when --target/--guide are not "
                   "given: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe (MoE target, dense guide)")
    p.add_argument("--target", help="target checkpoint (default: the bench tiny pair's target)")
    p.add_argument("--guide", help="guide checkpoint (default: the bench tiny pair's guide)")
    p.add_argument("--ratios", default="0.5,0.25,0.1", help="SGL keep ratios, comma-separated")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--visual-tokens", type=int, default=1024, help="N visual tokens per image")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--video-frames", type=int, default=0,
                   help="offline: each request one video of this many frames (even) instead of images; "
                        "--visual-tokens is then per temporal patch (two frames; InternVL: 256 per frame, fixed)")
    p.add_argument("--output-len", type=int, default=16, help="tokens decoded per request (ignore_eos)")
    p.add_argument("--guide-max-tokens", type=int, help="the guide's answer budget (default: --output-len)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory-bytes", type=int, help="default: enough for every request at once")
    p.add_argument("--max-num-seqs", type=int, help="engine max_num_seqs (default: vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=int, help="engine max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per engine (not timed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every configuration this many times, interleaved (vanilla, SGL..., vanilla, ...); "
                        "each configuration reports its median-time run (load on a shared machine drifts)")
    p.add_argument("--see-threshold", default="",
                   help="offline: early-exit thresholds, comma-separated: one SGL+SEE configuration each, at the "
                        "last --ratios entry (turns ignore_eos off for the whole run)")
    p.add_argument("--downscale", action="store_true",
                   help="offline: add vanilla with images downscaled to about SGL's kept tokens, per ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="engines without torch.compile or CUDA graphs: a faster start, not the configuration users time (the tests' smoke runs)")
    p.add_argument("--online", nargs="+", metavar="URL",
                   help="running servers: the vanilla one first, then one SGL server per --ratios entry")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="online: requests/s (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=64, help="online: requests in flight at most")
    p.add_argument("--block-size", type=int, default=16, help="online: the servers' KV block size")
    p.add_argument("--out-dir", default=str(REPO / "out" / "throughput"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="quick check of every code path: test tiny pair, 4 requests, ratio 0.25, N=64, 4 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.ratios, args.visual_tokens, args.output_len = 4, "0.25", 64, 4
        args.warmup = 0
        args.kv_cache_memory_bytes = args.kv_cache_memory_bytes or 64 * 2**20
    try:
        args.ratio_list = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not args.ratio_list or not all(0.0 < r <= 1.0 for r in args.ratio_list):
        p.error(f"keep ratios must be in (0, 1], got {args.ratios!r}")
    if args.online and len(args.online) != 1 + len(args.ratio_list):
        p.error(f"--online takes the vanilla URL then one SGL URL per ratio ({len(args.ratio_list)}), "
                f"got {len(args.online)} URLs")
    for name in ("num_requests", "visual_tokens", "images_per_request", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.guide_max_tokens = args.guide_max_tokens or args.output_len
    try:
        args.see_list = [float(t) for t in args.see_threshold.split(",") if t.strip()]
    except ValueError:
        p.error(f"--see-threshold must be comma-separated numbers, got {args.see_threshold!r}")
    if not all(0.0 <= t <= 1.0 for t in args.see_list):
        p.error(f"--see-threshold values must be in [0, 1], got {args.see_threshold!r}")
    if args.online and (args.see_list or args.downscale or args.video_frames):
        p.error("--see-threshold, --downscale and --video-frames are offline configurations")
    if args.video_frames:
        if args.video_frames % 2 or args.video_frames < 2:
            p.error(f"--video-frames must be an even number >= 2 (frames pair into temporal patches), got {args.video_frames}")
        if args.downscale or args.images_per_request != 1:
            p.error("--video-frames takes one video per request: no --downscale, --images-per-request 1")
    return args


@dataclass(frozen=True)
class Config:
    """One engine configuration of the run."""

    name: str
    ratio: float | None = None  # SGL keep ratio; None: vanilla
    see: float | None = None  # SEE threshold
    downscale: float | None = None  # vanilla with images downscaled to about this ratio's kept tokens
    evs: float | None = None  # vanilla with vLLM's EVS at this video_pruning_rate
    tensor_parallel: int = 1  # ranks (bench_parallel.py; on the CPU one core each)


def configurations(args) -> list[Config]:
    out = [Config("vanilla")] + [Config(f"sgl@{r:g}", ratio=r) for r in args.ratio_list]
    out += [Config(f"sgl@{args.ratio_list[-1]:g}+see@{t:g}", ratio=args.ratio_list[-1], see=t) for t in args.see_list]
    if args.downscale:
        out += [Config(f"vanilla-small@{r:g}", downscale=r) for r in args.ratio_list]
    if args.video_frames and _evs_family(args.target):
        out += [Config(f"evs@{r:g}", evs=round(1.0 - r, 6)) for r in args.ratio_list]
    return out


# The families whose vLLM models implement EVS (video_pruning_rate); vLLM ignores it on the others.
EVS_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _evs_family(target) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target).model_type in EVS_MODEL_TYPES


def default_pair(smoke: bool, pair: str = "bench", family: str = "qwen2_5_vl") -> tuple[Path, Path]:
    import dataclasses

    from vllm_sgl.families import FAMILIES
    from vllm_sgl.tiny import BENCH_PAIRS, TinyPairSpec, default_pair_dir, ensure_tiny_pair

    if family not in FAMILIES:
        raise SystemExit(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")

    if smoke:
        return ensure_tiny_pair(default_pair_dir(f"tiny-{family}"), TinyPairSpec(family=family))
    if pair not in BENCH_PAIRS:
        raise SystemExit(f"--pair must be one of {', '.join(BENCH_PAIRS)}, got {pair!r}")
    name = f"tiny-bench-{family}" if pair == "bench" else f"tiny-bench-{pair}-{family}"
    return ensure_tiny_pair(default_pair_dir(name), dataclasses.replace(BENCH_PAIRS[pair], family=family))


# ----------------------------------------------------------------------------------------------
# Workload


def image_size_for(n_tokens: int, cell: int = CELL) -> tuple[int, int]:
    """(width, height) in pixels of an image of exactly n_tokens merged visual tokens: the most
    square a x b = n_tokens grid of cells (patch x merge pixels: 28 for Qwen2/2.5-VL, 32 for
    Qwen3-VL; a <= b rows x columns)."""
    a = max(d for d in range(1, math.isqrt(n_tokens) + 1) if n_tokens % d == 0)
    return (n_tokens // a) * cell, a * cell


@dataclass
class Request:
    question: str
    image_seeds: list[int]
    prompt: str  # the target's chat template applied (as the server would)


@dataclass
class Workload:
    requests: list[Request]
    warmup: list[Request]
    image_size: tuple[int, int]
    visual_tokens: int
    patches_per_image: int
    cell: int = CELL  # pixels per merged visual token side
    video_frames: int = 0  # frames per video (0: image requests)
    _images: dict = field(default_factory=dict, repr=False)

    # The blocks a visual item's patches attend within: an image is one, a Qwen video's frame pairs
    # (temporal patches) or an InternVL video's frames one each
    vision_blocks: int = 1

    def images(self, req: Request):
        from vllm_sgl.images import synthetic_clip, synthetic_image

        out = []
        for s in req.image_seeds:
            if s not in self._images:
                self._images[s] = (synthetic_clip(s, self.video_frames, self.image_size) if self.video_frames
                                   else synthetic_image(s, self.image_size))
            out.append(self._images[s])
        return out

    def mm_data(self, req: Request) -> dict:
        return {"video" if self.video_frames else "image": self.images(req)}


def build_workload(args, target: Path) -> Workload:
    from transformers import AutoProcessor

    from vllm_sgl.images import synthetic_clip, synthetic_image, synthetic_question
    from vllm_sgl.reference import build_prompt_text

    processor = AutoProcessor.from_pretrained(target)
    merge = int(getattr(processor.image_processor, "merge_size", MERGE))
    cell = int(getattr(processor.image_processor, "patch_size", PATCH)) * merge
    tiled = getattr(processor.image_processor, "crop_to_patches", None) is not None  # InternVL
    blocks = 1
    if tiled:  # s x s tiles of 448 px plus a thumbnail, 256 tokens each: N = 256 (s^2 + 1)
        side = max(1, math.isqrt(max(1, args.visual_tokens // 256 - 1)))
        size = (448 * side, 448 * side)
        pixels = processor.image_processor(images=[synthetic_image(0, size)], return_tensors="pt")["pixel_values"]
        n = pixels.shape[0] * int(processor.image_seq_length)
        patches = pixels.shape[0] * (448 // PATCH) ** 2
    else:
        size = image_size_for(args.visual_tokens, cell)
        grid = processor.image_processor(images=[synthetic_image(0, size)], return_tensors="pt")["image_grid_thw"][0]
        n = int(grid.prod()) // (merge * merge)
        patches = int(grid.prod())
    if args.video_frames and not tiled:  # the same frames as one clip: t = F / 2 temporal patches
        from vllm_sgl.reference import prepare_input

        grid = prepare_input(processor, [], "what", [synthetic_clip(0, args.video_frames, size)]).video_grid_thw[0]
        if int(grid[0]) * n != int(grid.prod()) // (merge * merge):
            raise SystemExit(f"a {args.video_frames}-frame clip of {size[0]}x{size[1]} px gives grid {grid.tolist()}, "
                             f"not {args.video_frames // 2} x {n} tokens; choose another --visual-tokens")
        n, patches, blocks = int(grid.prod()) // (merge * merge), int(grid.prod()), int(grid[0])
    elif args.video_frames:  # InternVL: each frame one 448 px tile of image_seq_length tokens
        n = args.video_frames * int(processor.image_seq_length)
        patches, blocks = args.video_frames * (448 // PATCH) ** 2, args.video_frames
    elif n != args.visual_tokens:
        raise SystemExit(
            f"a {size[0]}x{size[1]} image gives {n} visual tokens with {target}'s image processor, not "
            f"{args.visual_tokens} (its min/max pixels bound the image size); choose another --visual-tokens"
        )
    rng = random.Random(args.seed)

    def make(i: int, base: int) -> Request:
        q = synthetic_question(base + i)
        seeds = [base + i * args.images_per_request + j for j in range(args.images_per_request)]
        if args.video_frames:
            return Request(q, seeds, build_prompt_text(processor, 0, q, len(seeds)))
        return Request(q, seeds, build_prompt_text(processor, len(seeds), q))

    reqs = [make(i, 10_000 + rng.randrange(10**6)) for i in range(args.num_requests)]
    warm = [make(i, 90_000_000 + i) for i in range(args.warmup)]
    return Workload(reqs, warm, size, n, patches, cell, args.video_frames, vision_blocks=blocks)


# ----------------------------------------------------------------------------------------------
# Cost model


@dataclass
class ModelCost:
    """What the cost model needs of one checkpoint: parameter counts (safetensors headers) and the
    attention shapes (config)."""

    body: int  # decoder layers + final norm
    head: int  # lm_head
    vision_per_patch: int  # patch embedding + vision blocks
    vision_per_token: int  # merger (one per merged visual token)
    layers: int = 0
    q_dim: int = 0  # attention heads x head_dim
    vision_width: int = 0
    vision_full_blocks: int = 0
    vision_window_blocks: int = 0
    vision_window_patches: int = 0

    def lm_attention(self, prompt: int, decoded: int) -> float:
        """Causal attention multiply-adds (Q K^T and P V) over a prompt then `decoded` new rows."""
        rows = prompt * (prompt + 1) / 2 + sum(prompt + i for i in range(1, decoded + 1))
        return 2.0 * self.layers * self.q_dim * rows

    def vision_attention(self, patches: int) -> float:
        window = min(self.vision_window_patches or patches, patches)
        return 2.0 * self.vision_width * patches * (self.vision_full_blocks * patches + self.vision_window_blocks * window)


def model_cost(model_dir: str | Path) -> ModelCost:
    from safetensors import safe_open
    from transformers import AutoConfig

    body = head = vp = vt = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {model_dir}: cannot count parameters for the ideal speed-up")
    cfg = AutoConfig.from_pretrained(model_dir)
    text = getattr(cfg, "text_config", cfg)
    # MoE: a token runs num_experts_per_tok of num_experts experts (the active parameters)
    active = getattr(text, "num_experts_per_tok", 1) / getattr(text, "num_experts", 1)
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = math.prod(st.get_slice(name).get_shape())
                if "visual." in name or "vision_tower." in name or "multi_modal_projector." in name:
                    if "pos_embed" in name:
                        continue  # Qwen3-VL's learned position grid: a lookup
                    if "merger" in name or "projector" in name:  # per merged token (deepstack, InternVL's too)
                        vt += n
                    else:
                        vp += n
                elif "lm_head" in name:
                    head += n
                elif "embed_tokens" in name:
                    continue  # a lookup, not a matmul
                elif ".mlp.experts." in name:
                    body += round(n * active)
                else:
                    body += n
    vis = getattr(cfg, "vision_config", None)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cost = ModelCost(body, head, vp, vt, layers=text.num_hidden_layers, q_dim=text.num_attention_heads * head_dim)
    if vis is not None:
        depth = int(getattr(vis, "depth", 0))
        depth = depth or int(getattr(vis, "num_hidden_layers", 0))  # InternViT
        full = getattr(vis, "fullatt_block_indexes", None)  # Qwen2.5-VL: windowed except these
        cost.vision_width = int(getattr(vis, "hidden_size", None) if full is not None else
                                getattr(vis, "embed_dim", None) or getattr(vis, "hidden_size", 0))
        if getattr(vis, "image_size", None) is not None:  # InternViT: attention within each tile
            cost.vision_window_blocks = depth
            cost.vision_window_patches = (int(vis.image_size[0]) // int(vis.patch_size[0])) ** 2
        elif full is None:  # Qwen2-VL: every block attends over the whole image
            cost.vision_full_blocks = depth
        else:
            cost.vision_full_blocks = len(full)
            cost.vision_window_blocks = depth - len(full)
            cost.vision_window_patches = (int(vis.window_size) // int(vis.patch_size)) ** 2
    return cost


def ideal_speedups(vanilla: "RunResult", run: "RunResult", t: ModelCost, g: ModelCost, work: Workload):
    """Ideal speed-ups of `run` over `vanilla` (same requests, same order): (params: LMs + vision
    encoders, params: LMs only, params + attention). Each request costs what its configuration
    makes it compute: vanilla, SGL, a SEE exit (the guide and its consistency pass only) or
    vanilla on a downscaled image."""
    images = len(work.requests[0].image_seeds)
    n_full = work.visual_tokens

    def vision(p: ModelCost, n: int) -> tuple[float, float]:  # (params, attention), n visual tokens/image
        patches = n * work.patches_per_image // work.visual_tokens
        # a video's patches attend within their temporal patch (frame pair): t blocks of patches / t
        attention = work.vision_blocks * p.vision_attention(patches // work.vision_blocks)
        return images * (p.vision_per_patch * patches + p.vision_per_token * n), images * attention

    def lm(p: ModelCost, prompt: int, out: int) -> tuple[float, float]:
        return p.body * (prompt + out) + p.head * out, p.lm_attention(prompt, out)

    def cost(prompt: int, out: int, i: int, r: "RunResult") -> tuple[float, float, float]:
        """(all params, LM params, params + attention) of request i under run r."""
        parts = []  # (lm params, vision params, attention)
        if r.keep_ratio is None:  # vanilla, maybe on a downscaled image of n visual tokens
            # (EVS: the encoder runs on all N, the language model on what EVS keeps)
            n = n_full if r.evs is not None else n_full - (vanilla.prompt_lens[i] - prompt) // images
            (lp, la), (vp, va) = lm(t, prompt, out), vision(t, n)
            parts.append((lp, vp, la + va))
        else:
            ans = r.guide_answer_lens[i] if r.guide_answer_lens else 0
            p_full = vanilla.prompt_lens[i]
            (glp, gla), (gvp, gva) = lm(g, p_full, ans), vision(g, n_full)
            parts.append((glp, gvp, gla + gva))
            if r.exits and r.exits[i]:  # SEE: the guide's consistency pass, no target work
                kc = max(1, int(0.05 * n_full))
                clp, cla = lm(g, p_full - images * (n_full - kc), ans)
                parts.append((clp, 0.0, cla))
            else:
                (tlp, tla), (tvp, tva) = lm(t, prompt, out), vision(t, n_full)
                parts.append((tlp, tvp, tla + tva))
        lp = sum(x for x, _, _ in parts)
        vp = sum(y for _, y, _ in parts)
        return lp + vp, lp, lp + vp + sum(z for _, _, z in parts)

    van = [cost(p, o, i, vanilla) for i, (p, o) in enumerate(zip(vanilla.prompt_lens, vanilla.output_lens))]
    mine = [cost(p, o, i, run) for i, (p, o) in enumerate(zip(run.prompt_lens, run.output_lens))]
    return tuple(sum(v[j] for v in van) / sum(m[j] for m in mine) for j in range(3))


# ----------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunResult:
    config: str
    mode: str
    keep_ratio: float | None
    elapsed_s: float
    prompt_lens: list[int]
    output_lens: list[int]
    ttft_s: list[float]
    block_size: int
    guide_answer_lens: list[int] = field(default_factory=list)
    engine_start_s: float | None = None
    cpu_s: float | None = None  # CPU time of this process and its children (the engine) during the run
    exits: list[bool] = field(default_factory=list)  # per request: answered by the guide (SEE)
    evs: float | None = None  # vLLM's EVS video_pruning_rate (vanilla otherwise)
    guide_steps: list[float] = field(default_factory=list)  # wall seconds of each guide step (trace)
    see: float | None = None
    downscale: float | None = None

    @property
    def requests(self) -> int:
        return len(self.prompt_lens)

    def row(self) -> dict:
        ttft = sorted(self.ttft_s)
        return {
            "config": self.config,
            "mode": self.mode,
            "keep_ratio": self.keep_ratio if self.keep_ratio is not None else "",
            "requests": self.requests,
            "elapsed_s": round(self.elapsed_s, 3),
            "req_per_s": self.requests / self.elapsed_s,
            "out_tok_per_s": sum(self.output_lens) / self.elapsed_s,
            "ttft_mean_s": statistics.fmean(ttft) if ttft else "",
            "ttft_p90_s": ttft[min(len(ttft) - 1, math.ceil(0.9 * len(ttft)) - 1)] if ttft else "",
            "prompt_tokens": sum(self.prompt_lens),
            "kv_blocks": sum(math.ceil(n / self.block_size) for n in self.prompt_lens),
            "block_size": self.block_size,
            "guide_prompt_tokens": "",
            "guide_answer_tokens": sum(self.guide_answer_lens) if self.guide_answer_lens else "",
            "engine_start_s": round(self.engine_start_s, 1) if self.engine_start_s is not None else "",
            "cpu_s_per_req": self.cpu_s / self.requests if self.cpu_s is not None else "",
        }


def _engine_kwargs(args, work: Workload) -> dict:
    images = args.images_per_request
    max_model_len = images * work.visual_tokens + 256 + args.output_len
    kw = dict(
        dtype=args.dtype,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": 0, "video": 1} if work.video_frames else {"image": images},
        seed=args.seed,
        disable_log_stats=False,  # RequestOutput.metrics (time to first token)
    )
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    kw["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes or _kv_bytes_for_all(args, work)
    return kw


def _kv_bytes_for_all(args, work: Workload) -> int:
    """KV cache for every request of the run at full length at once (vanilla's worst case)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.target)
    text = getattr(cfg, "text_config", cfg)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    elem = 2 if args.dtype in ("bfloat16", "float16", "half") else 4
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * elem
    tokens = (args.num_requests + args.warmup) * (args.images_per_request * work.visual_tokens + 256 + args.output_len)
    return max(64 * 2**20, int(per_token * tokens * 1.25))


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and all its children (vLLM's engine processes)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the engine process exits with us anyway
        pass
    del llm
    gc.collect()


def _trace_field(trace_path: Path, request_ids: list[str], key: str, default):
    """The trace's `key` per request (trace lines carry the ids the user sees)."""
    by_id = {}
    if trace_path.exists():
        for raw in trace_path.read_text().splitlines():
            if raw.strip():
                line = json.loads(raw)
                by_id[line["request_id"]] = line.get(key, default)
    return [by_id.get(rid, default) for rid in request_ids]


def _trace_answer_lens(trace_path: Path, request_ids: list[str]) -> list[int]:
    return [len(ids or []) for ids in _trace_field(trace_path, request_ids, "guide_answer_ids", [])]


def run_offline(args, work: Workload, cfg: Config) -> RunResult:
    from vllm import LLM, SamplingParams

    name, ratio = cfg.name, cfg.ratio
    kw = _engine_kwargs(args, work)
    trace = None
    if ratio is not None:
        trace = Path(tempfile.mkdtemp(prefix="sgl-bench-")) / "trace.jsonl"
        sgl = {"guide_model": str(args.guide), "keep_ratio": ratio, "guide_max_tokens": args.guide_max_tokens,
               "trace_path": str(trace)}
        if cfg.see is not None:
            sgl["see_threshold"] = cfg.see
        kw.update(model_impl="sgl", additional_config={"sgl": sgl})
    if cfg.downscale is not None:  # at most k cells (28 or 32 px square): about k visual tokens
        from vllm_sgl.pruning import keep_count

        k = keep_count(work.visual_tokens, cfg.downscale)
        kw["mm_processor_kwargs"] = {"max_pixels": k * work.cell**2, "min_pixels": work.cell**2}
    if cfg.evs is not None:
        kw["video_pruning_rate"] = cfg.evs
    if cfg.tensor_parallel > 1:
        kw["tensor_parallel_size"] = cfg.tensor_parallel
    if getattr(args, "one_core_per_rank", False):  # the engine's processes inherit it
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(cfg.tensor_parallel))
    log(f"{name}: starting engine ({args.target})")
    t0 = time.perf_counter()
    llm = LLM(model=str(args.target), **kw)
    start_s = time.perf_counter() - t0
    try:
        block_size = int(llm.llm_engine.vllm_config.cache_config.block_size)
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=not args.see_list)

        def prompts(reqs):
            return [{"prompt": r.prompt, "multi_modal_data": work.mm_data(r)} for r in reqs]

        if work.warmup:
            log(f"{name}: warm-up, {len(work.warmup)} requests")
            llm.generate(prompts(work.warmup), sp, use_tqdm=False)
        batch = prompts(work.requests)
        log(f"{name}: {len(batch)} requests")
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=True)
        elapsed, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    finally:
        _close(llm)
    ttft = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None
            and getattr(o.metrics, "first_token_latency", 0)]
    res = RunResult(
        config=name, mode="offline", keep_ratio=ratio, elapsed_s=elapsed,
        prompt_lens=[len(o.prompt_token_ids) for o in outs],
        output_lens=[len(o.outputs[0].token_ids) for o in outs],
        ttft_s=ttft, block_size=block_size, engine_start_s=start_s,
        cpu_s=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None, see=cfg.see,
        downscale=cfg.downscale, evs=cfg.evs,
    )
    if trace is not None:
        res.guide_answer_lens = _trace_answer_lens(trace, [o.request_id for o in outs])
        res.exits = _trace_field(trace, [o.request_id for o in outs], "see_exit", False)
        # Requests of one guide step share its wall time: one value per step.
        res.guide_steps = sorted({s for s in _trace_field(trace, [o.request_id for o in outs],
                                                         "guide_step_seconds", None) if s})
    log(f"{name}: {res.requests / elapsed:.2f} requests/s ({elapsed:.1f} s)")
    return res


def run_online(args, work: Workload, url: str, ratio: float | None) -> RunResult:
    import asyncio
    import base64
    import io

    import openai

    name = "vanilla" if ratio is None else f"sgl@{ratio:g}"
    urls = {}

    def data_url(img) -> str:
        key = id(img)
        if key not in urls:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            urls[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return urls[key]

    def messages(r: Request):
        content = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in work.images(r)]
        return [{"role": "user", "content": content + [{"type": "text", "text": r.question}]}]

    async def main():
        client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=3600)
        async with client:
            model = (await client.models.list()).data[0].id
            sem = asyncio.Semaphore(args.max_concurrency)

            async def one(r: Request):
                async with sem:
                    sent = time.perf_counter()
                    first, prompt_tokens, n_out = None, 0, 0
                    stream = await client.chat.completions.create(
                        model=model, messages=messages(r), temperature=0, max_tokens=args.output_len, stream=True,
                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                    )
                    async with stream:
                        async for chunk in stream:
                            if first is None and any(c.delta.content for c in chunk.choices):
                                first = time.perf_counter() - sent
                            if chunk.usage is not None:
                                prompt_tokens, n_out = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                    return prompt_tokens, n_out, first

            for r in work.warmup:
                await one(r)
            rng = random.Random(args.seed)
            tasks, done = [], 0
            t0 = time.perf_counter()

            async def tracked(r):
                nonlocal done
                out = await one(r)
                done += 1
                if done % max(1, len(work.requests) // 10) == 0 or done == len(work.requests):
                    log(f"{name}: {done}/{len(work.requests)} done")
                return out

            for r in work.requests:
                tasks.append(asyncio.create_task(tracked(r)))
                if math.isfinite(args.request_rate):
                    await asyncio.sleep(rng.expovariate(args.request_rate))
            results = await asyncio.gather(*tasks)
            return results, time.perf_counter() - t0

    log(f"{name}: {len(work.requests)} requests to {url}")
    results, elapsed = asyncio.run(main())
    res = RunResult(
        config=name, mode="online", keep_ratio=ratio, elapsed_s=elapsed,
        prompt_lens=[p for p, _, _ in results], output_lens=[n for _, n, _ in results],
        ttft_s=[f for _, _, f in results if f is not None], block_size=args.block_size,
    )
    if ratio is not None:
        res.guide_answer_lens = [args.guide_max_tokens] * res.requests  # unknown online: the budget
    log(f"{name}: {res.requests / elapsed:.2f} requests/s ({elapsed:.1f} s)")
    return res


# ----------------------------------------------------------------------------------------------
# Report


def finish_rows(runs: list[list[RunResult]], args, work: Workload) -> list[dict]:
    """One row per configuration (runs[i]: its repeats), from its median-time run."""
    t, g = model_cost(args.target), model_cost(args.guide)
    results, all_rates = [], []
    for reps in runs:
        median = statistics.median_low([r.elapsed_s for r in reps])
        results.append(next(r for r in reps if r.elapsed_s == median))
        all_rates.append(" ".join(f"{r.requests / r.elapsed_s:.4g}" for r in reps))
    vanilla = results[0]
    base = vanilla.row()
    rows = []
    for r, rates in zip(results, all_rates):
        row = r.row()
        row["req_per_s_all_runs"] = rates
        row["speedup"] = row["req_per_s"] / base["req_per_s"]
        if row["cpu_s_per_req"] != "" and base["cpu_s_per_req"]:
            row["cpu_speedup"] = base["cpu_s_per_req"] / row["cpu_s_per_req"]
        if r is vanilla:
            row["ideal_speedup"] = row["ideal_speedup_lm"] = row["ideal_speedup_attn"] = 1.0
        else:
            row["ideal_speedup"], row["ideal_speedup_lm"], row["ideal_speedup_attn"] = ideal_speedups(
                vanilla, r, t, g, work)
        if r.keep_ratio is not None:
            row["guide_prompt_tokens"] = sum(vanilla.prompt_lens)
        if r.see is not None:
            sgp = next(x.row() for x in results if x.keep_ratio == r.keep_ratio and x.see is None)
            row.update(see_threshold=r.see, exit_rate=sum(r.exits) / max(1, len(r.exits)),
                       speedup_vs_sgp=row["req_per_s"] / sgp["req_per_s"])
        row["pct_of_ideal"] = 100.0 * row["speedup"] / row["ideal_speedup"]
        row.update(visual_tokens=work.visual_tokens, output_len=args.output_len, target=str(args.target),
                   guide=str(args.guide) if r.keep_ratio is not None else "")
        if r.downscale is not None:
            row["keep_ratio"] = r.downscale
        if r.evs is not None:
            row["keep_ratio"] = round(1.0 - r.evs, 6)
        rows.append(row)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v == "" or v is None else format(v, spec)


def print_table(rows: list[dict], args, work: Workload) -> None:
    t, g = model_cost(args.target), model_cost(args.guide)
    item = f"video of {work.video_frames} frames" if work.video_frames else f"{args.images_per_request} image(s)"
    print(f"\n{rows[0]['mode']}: {rows[0]['requests']} requests x {item} of "
          f"{work.visual_tokens} visual tokens ({work.image_size[0]}x{work.image_size[1]} px), "
          f"{args.output_len} output tokens, dtype {args.dtype}")
    print(f"target {args.target}: {t.body / 1e6:.1f}M body + {t.head / 1e6:.2f}M head params/token; "
          f"guide {args.guide}: {g.body / 1e6:.2f}M + {g.head / 1e6:.2f}M "
          f"(target/guide per token: {(t.body + t.head) / (g.body + g.head):.1f}x)")
    print(f"KV block size {rows[0]['block_size']}; repeats {args.repeats} (median-time run shown)")
    head = (f"{'config':<18} {'req/s':>7} {'out tok/s':>9} {'TTFT mean':>9} {'TTFT p90':>8} {'prompt tok':>10} "
            f"{'KV blocks':>9} {'speed-up':>8} {'ideal':>6} {'% ideal':>7} {'ideal LM':>8} {'ideal+attn':>10} "
            f"{'CPU s/req':>9} {'CPU speed-up':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cpu_speedup = r.get("cpu_speedup", "")
        print(f"{r['config']:<18} {r['req_per_s']:>7.3f} {r['out_tok_per_s']:>9.2f} {_fmt(r['ttft_mean_s'], '>8.2f')}s "
              f"{_fmt(r['ttft_p90_s'], '>7.2f')}s {r['prompt_tokens']:>10d} {r['kv_blocks']:>9d} "
              f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x {r['pct_of_ideal']:>6.0f}% "
              f"{r['ideal_speedup_lm']:>7.2f}x {r['ideal_speedup_attn']:>9.2f}x "
              f"{_fmt(r['cpu_s_per_req'], '>9.2f')} {_fmt(cpu_speedup, '>11.2f')}x")
    for r in rows:
        if r.get("exit_rate", "") != "":
            print(f"{r['config']}: exit rate {100 * r['exit_rate']:.0f}%, {r['speedup_vs_sgp']:.2f}x SGL at the same "
                  f"keep ratio without SEE, {r['speedup']:.2f}x vanilla (ideal {r['ideal_speedup']:.2f}x)")
    print("ideal = sum vanilla cost / sum SGL cost, cost ~ params/token x tokens (LMs and vision encoders of the "
          "target and the guide); ideal LM: language models only; ideal+attn: plus attention multiply-adds; "
          "% ideal = speed-up / ideal (formulas: the module docstring)")


def pyplot():
    """matplotlib's pyplot drawing to files, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return None
    return plt


def write_outputs(rows: list[dict], args, work: Workload) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    meta = {k: v for k, v in vars(args).items() if k != "ratio_list"}
    meta.update(image_size=list(work.image_size), rows=rows, command=" ".join([sys.executable, *sys.argv]))
    (out / "throughput.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log(f"wrote {out / 'throughput.csv'} and {out / 'throughput.json'}")
    plt = None if args.no_plot else pyplot()
    if plt is None:
        return
    sgl = [r for r in rows if r["config"] != "vanilla"]
    labels = [r["config"].replace("sgl@", "r=").replace("vanilla-small@", "small r=") for r in sgl]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    x = range(len(sgl))
    ax1.bar([i - 0.2 for i in x], [r["speedup"] for r in sgl], 0.4, label="measured")
    ax1.bar([i + 0.2 for i in x], [r["ideal_speedup"] for r in sgl], 0.4, label="ideal", alpha=0.6)
    ax1.scatter(list(x), [r["ideal_speedup_lm"] for r in sgl], marker="_", s=400, color="k", label="ideal (LM only)")
    ax1.scatter(list(x), [r["ideal_speedup_attn"] for r in sgl], marker="x", s=60, color="C3", label="ideal + attention")
    ax1.axhline(1.0, color="grey", lw=1, ls="--")
    ax1.set_xticks(list(x), labels, rotation=25, ha="right")
    ax1.set_ylabel("requests/s / vanilla's")
    ax1.set_title("SGL throughput speed-up")
    ax1.legend()
    cfgs = [r["config"] for r in rows]
    ttft = [r["ttft_mean_s"] if r["ttft_mean_s"] != "" else 0.0 for r in rows]
    ax2.bar(cfgs, ttft, color=["grey"] + ["C0"] * len(sgl))
    ax2.tick_params(axis="x", labelrotation=25)
    ax2.set_ylabel("mean time to first token (s)")
    ax2.set_title(f"{rows[0]['mode']}, N={work.visual_tokens}, {args.output_len} out tokens")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    log(f"wrote {out / 'throughput.png'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.target and args.guide):
        guide, target = default_pair(args.smoke, args.pair, args.family)
        args.target, args.guide = args.target or str(target), args.guide or str(guide)
    args.target, args.guide = str(args.target), str(args.guide)
    work = build_workload(args, Path(args.target))
    log(f"workload: {args.num_requests} requests, {work.visual_tokens} visual tokens per image "
        f"({work.image_size[0]}x{work.image_size[1]}), {args.output_len} output tokens; "
        f"configs: {', '.join(c.name for c in configurations(args))}")
    configs = configurations(args)
    runs: list[list[RunResult]] = [[] for _ in configs]
    for rep in range(args.repeats):
        for i, cfg in enumerate(configs):
            log(f"run {rep * len(configs) + i + 1}/{args.repeats * len(configs)}")
            if args.online:
                runs[i].append(run_online(args, work, args.online[i], cfg.ratio))
            else:
                runs[i].append(run_offline(args, work, cfg))
    rows = finish_rows(runs, args, work)
    print_table(rows, args, work)
    write_outputs(rows, args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
