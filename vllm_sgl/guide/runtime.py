"""The guide runtime: for all of an engine step's guide requests together, the guide's greedy
answers, importance and keep sets (../shared/SGL_METHOD.md, SGP steps 1-3).

Written for speed and with no vLLM import, so it can be timed on a machine with torch alone
(benchmarks/bench_guide.py). Per call:
1. vision: every image of every request in one packed patch sequence (vllm_sgl.guide.vision);
2. prefill: all prompts packed into one token stream, causal within each prompt, one forward;
   keys and values go straight into the KV workspace, the post-RoPE queries of the importance
   rows (the prompt after each request's first image) into the query workspace;
3. decode: static shapes (batch and KV capacity padded to buckets), one step function run eagerly
   or replayed as a CUDA graph (vllm_sgl.guide.decode); the host checks "all done" every few steps;
4. importance: the fused kernel reads the captured queries and the keys where they lie (the KV
   workspace seen as a paged cache with one block per request), top-k on the device, then one
   device-to-host copy of the whole call's results.
The definition it must equal is vllm_sgl.reference (explicit attention, one request); see
tests/test_guide_runtime.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vllm_sgl.guide.attention import Segments, varlen_attention
from vllm_sgl.guide.decode import DecodeState, StepRunner, pick
from vllm_sgl.guide.text import TextModel
from vllm_sgl.guide.vision import TileTower, VisionTower
from vllm_sgl.families import family_for_config
from vllm_sgl.kernels import keep_set, resolve_backend, sdpp_scratch_elems, visual_importance_paged
from vllm_sgl.pruning import (confidence, grid_layout, keep_count, mrope_positions, tile_layout, visual_spans,
                              visual_token_count)

logger = logging.getLogger("vllm_sgl")

SYNC_EVERY = 4  # decode steps between the host's "all done?" checks
# Most patches (vision) or prompt tokens (prefill) in one packed pass on CUDA: enough rows to fill
# an H100's matmuls, while the pass's activations stay bounded whatever guide_max_batch is (for
# Qwen2.5-VL's tower, 32768 patches of MLP activations are ~0.7 GB in bf16: an estimate, 32768 x
# 3420 x 2 bytes x 3 live tensors; gpu_check.py measures the peak of a whole call).
CUDA_PASS_TOKENS = 32768


@dataclass
class GuideRequest:
    request_id: str
    # The request's images and videos ("images" below: a video is an image with t > 1 on its grid,
    # its tokens one run of video tokens) in prompt order.
    prompt_ids: list[int]  # the full prompt: every image with all N of its visual tokens
    pixel_values: torch.Tensor | None  # all images of the request, concatenated patches
    image_grid_thw: torch.Tensor | None  # (num_images, 3); None for tiled families (InternVL)
    keep_counts: list[int]  # k per image, in prompt order (the target's placeholder counts)
    see: bool = False  # the request may exit early: run the consistency pass for it
    image_tiles: list[int] | None = None  # InternVL: tiles per image (pixel_values: every tile)
    importance: str = "sgl"  # the keep rule of its images (IMPORTANCES; docs/importance.md)
    # per image, the time positions' spacing (Qwen2.5-VL videos: seconds per grid step x
    # tokens_per_second, vLLM's t_factor); None: 1 for all
    t_factors: list[float] | None = None


@dataclass
class GuideResult:
    request_id: str
    answer_ids: list[int]
    finished: bool  # the answer ended with end-of-sequence within the budget
    confidence: float
    # SEE: product of the answer tokens' probabilities when the guide re-reads prompt + answer with
    # only its top consistency_ratio visual tokens (None: not asked for, see=False)
    consistency: float | None = None
    importance: list[torch.Tensor] = field(default_factory=list)  # per image, float32 (N,)
    keep_indices: list[torch.Tensor] = field(default_factory=list)  # per image, ascending
    importance_rule: str = "sgl"  # the keep rule that chose them (GuideRequest.importance)
    num_visual_tokens: list[int] = field(default_factory=list)
    step_seconds: float = 0.0  # wall time of the guide call this request was batched in
    rank: int = 0  # in an engine split across ranks, the rank that ran it (vllm_sgl.engine.parallel)


def _bucket(n: int, floor: int) -> int:
    """n rounded up to 1, 1.5 x a power of two (>= floor): few distinct shapes, < 50% padding."""
    b = floor
    while True:
        if n <= b:
            return b
        if n <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


def _batch_bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def decode_buckets(max_batch: int, slots: int) -> list[tuple[int, int]]:
    """Every (batch, capacity) bucket (_batch_bucket, _bucket) of at most max_batch requests whose
    padded batch x capacity fits `slots` KV slots: what Guide._shape can give a call that fits."""
    out, b = [], 1
    while b <= _batch_bucket(max_batch):
        c = 256
        while b * c <= slots:
            out.append((b, c))
            c = _bucket(c + 1, 256)
        b *= 2
    return out


@dataclass
class _Prepared:
    req: GuideRequest
    spans: list[tuple[int, int]]
    grids: list[tuple[int, int, int]]
    positions: torch.Tensor  # (3, L)

    @property
    def length(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def first_end(self) -> int:
        """Sequence index of the first importance row: the token after the first image."""
        return self.spans[0][0] + self.spans[0][1] if self.spans else self.length


class GuideWorkspaceError(RuntimeError):
    """A call that does not fit a fixed workspace (an engine's): the engine's admission (one request
    at most kv_tokens guide tokens, a step's requests at most kv_tokens together) rules it out."""


def workspace_geometry(kv_tokens: int, max_batch: int, max_tokens: int) -> tuple[int, int]:
    """(KV slots, query rows) of the workspace for steps of at most `kv_tokens` guide prompt tokens
    and `max_batch` requests: KV twice the tokens and answers (padding of batch and capacity
    buckets: one request's bucket is at most 1.5 x its need); a query row for every prompt token
    after a request's first image (a second image's tokens included) plus its answer rows."""
    return 2 * (kv_tokens + max_batch * max_tokens), kv_tokens + max_batch * max_tokens


class Guide:
    def __init__(self, hf_model, config, device: str | torch.device, dtype: torch.dtype, max_tokens: int,
                 importance_backend: str = "auto", max_batch: int = 32, kv_tokens: int = 8192,
                 cuda_graphs: bool = True, stop_at_eos: bool = True, pass_tokens: int | None = -1,
                 consistency_ratio: float = 0.05, fixed_workspace: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.config = config
        self.max_tokens = int(max_tokens)
        self.max_batch = int(max_batch)
        self.importance_backend = importance_backend
        self.consistency_ratio = float(consistency_ratio)
        # Most patches / prompt tokens in one packed forward pass (None: all of a call's at once);
        # default: CUDA_PASS_TOKENS on CUDA, 4096 elsewhere.
        if pass_tokens == -1:
            pass_tokens = CUDA_PASS_TOKENS if self.device.type == "cuda" else 4096
        self.pass_tokens = pass_tokens
        self.kv_tokens = int(kv_tokens)
        self.image_token_id = int(config.image_token_id)
        family = family_for_config(config)
        # the tokens of an image's or video's visual span (InternVL's video frames are images here)
        video = getattr(config, "video_token_id", None)
        self.media_token_ids = [self.image_token_id] + ([int(video)] if video is not None else [])
        self.mrope = family.mrope
        levels = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])
        if family.mrope:
            self.merge = int(config.vision_config.spatial_merge_size)
            self.vision = VisionTower(hf_model.model.visual, config.vision_config, self.device, dtype)
        else:  # tiles of a fixed size, each image_seq_length tokens
            self.merge = 1
            self.tile_tokens = int(config.image_seq_length)
            self.vision = TileTower(hf_model.model, self.device, dtype)
        self.text = TextModel(hf_model, config.text_config, interleaved_mrope=family.interleaved_mrope,
                              deepstack_levels=levels)
        gen = getattr(hf_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else config.text_config.eos_token_id
        # stop_at_eos=False: every answer runs max_tokens steps (benchmarks force the answer length)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if stop_at_eos else set()
        self._hf_model = hf_model  # owns the weights the tower and text model use
        # an MoE block's routing (data-dependent shapes) cannot be captured in a CUDA graph
        self.steps = StepRunner(self.text, use_graphs=cuda_graphs and not self.text.has_moe)
        self._kv: torch.Tensor | None = None  # (layers, 2, slots, Hkv, D)
        self._queries: torch.Tensor | None = None  # (layers, rows, Hq, D)
        self._keep_scratch: torch.Tensor | None = None  # the "sgl-sdpp" keep rule's, fp32
        self._states: dict[tuple[int, int], DecodeState] = {}
        self.timings: dict[str, float] = {}
        # The workspace for steps of at most max_batch requests and kv_tokens prompt tokens, allocated
        # now so the engine's memory profiling (the guide loads inside load_model) counts it. A call
        # is split into calls that fit it (_chunks). fixed_workspace (an engine): a request that does
        # not fit alone is an error, never a larger workspace (memory the profile never saw, and
        # every captured decode graph dropped and captured again inside a serving step); otherwise
        # (benchmarks, studies) the workspace grows.
        self.fixed_workspace = fixed_workspace
        self.reserve(*workspace_geometry(self.kv_tokens, self.max_batch, self.max_tokens))

    @classmethod
    def load(cls, model_dir: str | Path, device, dtype, max_tokens: int, **kw) -> "Guide":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        model = family_for_config(config).hf_model_cls.from_pretrained(model_dir, dtype=dtype)
        return cls(model.to(device).eval(), config, device, dtype, max_tokens, **kw)

    # -- workspace ------------------------------------------------------------------------------

    def reserve(self, kv_slots: int, query_rows: int) -> None:
        """Grows the KV and query workspaces to at least these sizes (never shrinks)."""
        t = self.text
        grows = (self._kv is not None and self._kv.shape[2] < kv_slots) or \
            (self._queries is not None and self._queries.shape[1] < query_rows)
        if grows and self.fixed_workspace:
            raise GuideWorkspaceError(
                f"a guide call needs {kv_slots} KV slots and {query_rows} query rows; the workspace holds "
                f"{self._kv.shape[2]} and {self._queries.shape[1]} (sized for {self.kv_tokens} guide tokens per step)")
        if self._kv is None or self._kv.shape[2] < kv_slots:
            self._kv = None
            self._kv = torch.zeros(t.num_layers, 2, kv_slots, t.kv_heads, t.head_dim, dtype=self.dtype,
                                   device=self.device)
            # a call that fits the KV slots has fewer visual tokens: its keep rule fits (1 KiB a slot)
            self._keep_scratch = None
            self._keep_scratch = torch.zeros(sdpp_scratch_elems([kv_slots], [kv_slots - 1]), dtype=torch.float32,
                                             device=self.device)
            self._states.clear()
            self.steps.clear()
        if self._queries is None or self._queries.shape[1] < query_rows:
            self._queries = None
            self._queries = torch.zeros(t.num_layers, query_rows, t.heads, t.head_dim, dtype=self.dtype,
                                        device=self.device)
            self._states.clear()
            self.steps.clear()

    def workspace_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self._kv, self._queries, self._keep_scratch)
                   if x is not None)

    def _state(self, batch: int, cap: int) -> DecodeState:
        key = (batch, cap)
        if key not in self._states:
            if len(self._states) >= 64 and not self._graphs:  # eager shapes vary: forget old ones
                self._states.clear()
            self._states[key] = DecodeState.allocate(self._kv, self._queries, batch, cap, self.max_tokens,
                                                     sorted(self.eos_ids))
        return self._states[key]

    # -- warm-up at load ------------------------------------------------------------------------

    def buckets(self) -> list[tuple[int, int]]:
        """Every (batch, capacity) decode bucket a call within the workspace can use (graphs only)."""
        return decode_buckets(self.max_batch, self._kv.shape[2]) if self._graphs else []

    def synthetic_requests(self, batch: int, tokens: int, see: bool = True) -> list[GuideRequest]:
        """batch requests of about `tokens` guide tokens each, nearly all visual (one image), with
        random pixels on the guide's device: the largest call the engine's budgets allow."""
        g = torch.Generator().manual_seed(0)
        text_id = 0 if self.image_token_id != 0 else 1
        visual = max(1, tokens - 16)
        reqs = []
        for b in range(batch):
            if self.mrope:
                side = max(1, int(visual**0.5))
                n, grid = side * side, [1, side * self.merge, side * self.merge]
                pixels = torch.randn(n * self.merge**2, self.vision.patch_dim, generator=g)
                extra = dict(image_grid_thw=torch.tensor([grid]))
            else:
                tiles = max(1, visual // self.tile_tokens)
                n, size = tiles * self.tile_tokens, self.config.vision_config.image_size
                size = size if isinstance(size, (list, tuple)) else (size, size)
                pixels = torch.randn(tiles, 3, *size, generator=g)
                extra = dict(image_grid_thw=None, image_tiles=[tiles])
            reqs.append(GuideRequest(
                request_id=f"warm-up-{b}", prompt_ids=[text_id] * 8 + [self.image_token_id] * n + [text_id] * 8,
                pixel_values=pixels.to(self.device, self.dtype), keep_counts=[max(1, n // 10)], see=see, **extra))
        return reqs

    def largest_call(self, measure: bool = False) -> int:
        """Runs the largest call the workspace was sized for (guide_max_batch requests sharing
        kv_tokens prompt tokens, SEE's consistency pass included). measure (CUDA): resets the
        allocator's peak first and returns the call's peak above what was allocated before (bytes;
        0 otherwise). Never measure inside vLLM's profile_run: its memory profile reads the peak
        since its own start, and a reset there would erase the target's encoder and forward peaks."""
        reqs = self.synthetic_requests(self.max_batch, max(32, self.kv_tokens // self.max_batch))
        measure = measure and self.device.type == "cuda"
        if measure:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        self.run(reqs)
        if not measure:
            return 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def warm_up(self) -> dict:
        """Everything a serving step must not do for the first time, done at load: the Triton
        importance kernels compiled for this guide's geometry, every decode bucket's CUDA graph
        captured (each capture synchronises and empties the allocator's cache), and one largest
        call run. Returns what it did: seconds, graphs captured, the call's peak bytes."""
        t0 = time.perf_counter()
        t = self.text
        if resolve_backend(self.importance_backend, self.device) == "triton" and self.device.type == "cuda":
            from vllm_sgl.kernels import importance_triton

            importance_triton.warm_up(t.num_layers, t.heads, t.kv_heads, t.head_dim, self.dtype, self.device)
        buckets = self.buckets()
        with torch.inference_mode():
            for batch, cap in buckets:
                st = self._state(batch, cap)
                st.done.fill_(True)  # scratch rows: slot 0 and the first capture rows
                self.steps.capture(st)
        peak = self.largest_call(measure=True)  # at load, before vLLM's memory profile starts
        self.steps.warmed = True
        return dict(seconds=time.perf_counter() - t0, graphs=len(buckets), peak_bytes=peak,
                    workspace_bytes=self.workspace_bytes())

    # -- the call -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, requests: list[GuideRequest], timed: bool = False) -> list[GuideResult]:
        """Greedy answers, importance and keep sets of all requests. timed: record per-phase wall
        times in self.timings (synchronising the device between phases)."""
        start = time.perf_counter()
        self.timings = dict.fromkeys(("vision", "prefill", "decode", "importance", "consistency"), 0.0)
        preps = [self._prepare(r) for r in requests]
        results: dict[int, GuideResult] = {}
        for chunk in self._chunks(preps):
            for i, res in zip(chunk, self._run_chunk([preps[i] for i in chunk], timed)):
                results[i] = res
        elapsed = time.perf_counter() - start
        out = [results[i] for i in range(len(preps))]
        for res in out:
            res.step_seconds = elapsed
        return out

    def _prepare(self, req: GuideRequest) -> _Prepared:
        if not self.mrope:
            return self._prepare_tiled(req)
        spans = visual_spans(req.prompt_ids, self.media_token_ids)
        grids = [tuple(int(x) for x in g) for g in (req.image_grid_thw.tolist() if req.image_grid_thw is not None else [])]
        factors = req.t_factors if req.t_factors is not None else [1.0] * len(grids)
        if not (len(spans) == len(grids) == len(req.keep_counts) == len(factors)):
            raise ValueError(f"request {req.request_id}: {len(spans)} image spans in the prompt, {len(grids)} image "
                             f"grids and {len(req.keep_counts)} keep counts")
        for (_, n), g, k in zip(spans, grids, req.keep_counts):
            if n != visual_token_count(g, self.merge) or not 1 <= k <= n:
                raise ValueError(f"request {req.request_id}: an image span of {n} tokens, grid {list(g)}, keep {k}")
        return _Prepared(req, spans, grids, mrope_positions(len(req.prompt_ids), spans, grids, self.merge, factors))

    def _prepare_tiled(self, req: GuideRequest) -> _Prepared:
        """A 1D-RoPE family with tiled images (InternVL): positions are the prompt's indices."""
        spans = visual_spans(req.prompt_ids, self.image_token_id)
        tiles = list(req.image_tiles or [])
        if not (len(spans) == len(tiles) == len(req.keep_counts)):
            raise ValueError(f"request {req.request_id}: {len(spans)} image spans in the prompt, {len(tiles)} tile "
                             f"counts and {len(req.keep_counts)} keep counts")
        for (_, n), t, k in zip(spans, tiles, req.keep_counts):
            if n != t * self.tile_tokens or not 1 <= k <= n:
                raise ValueError(f"request {req.request_id}: an image span of {n} tokens, {t} tiles, keep {k}")
        L = len(req.prompt_ids)
        return _Prepared(req, spans, [(t,) for t in tiles], torch.arange(L).expand(3, L).clone())

    def _layout(self, grid: tuple[int, ...]) -> tuple[int, int]:
        """An image's token layout (width, plane): its merged grid (Qwen), or its tiles (InternVL)."""
        return grid_layout(grid, self.merge) if self.mrope else tile_layout(self.tile_tokens)

    @property
    def _graphs(self) -> bool:
        return self.steps.use_graphs and self.device.type == "cuda"

    def _need(self, p: _Prepared) -> int:
        return p.length + self.max_tokens

    def _shape(self, n_requests: int, need: int) -> tuple[int, int]:
        """(batch, capacity) of a decode: buckets when the step is replayed as a CUDA graph (a
        graph per bucket), else the batch itself and the capacity rounded to 64 (no padding work)."""
        if self._graphs:
            return _batch_bucket(n_requests), _bucket(need, 256)
        return n_requests, -(-need // 64) * 64

    def _rows(self, p: _Prepared) -> int:
        """Query rows of a request: its prompt after its first image, then its decode rows."""
        return p.length - p.first_end + self.max_tokens - 1

    def _chunks(self, preps: list[_Prepared]) -> list[list[int]]:
        """Consecutive requests per call such that the padded batch x capacity fits the KV workspace,
        their query rows the query workspace, and the batch is at most max_batch; a request too
        large alone grows the workspace (or, fixed, fails: reserve)."""
        slots, rows_cap = self._kv.shape[2], self._queries.shape[1] - self.max_tokens
        chunks, cur, need, rows = [], [], 0, 0
        for i, p in enumerate(preps):
            n, r = max(need, self._need(p)), rows + self._rows(p)
            if cur and (len(cur) == self.max_batch or math.prod(self._shape(len(cur) + 1, n)) > slots
                        or r > rows_cap):
                chunks.append(cur)
                cur, n, r = [], self._need(p), self._rows(p)
            cur.append(i)
            need, rows = n, r
        if cur:
            chunks.append(cur)
        return chunks

    def _passes(self, items: list, size) -> list[list]:
        """Consecutive groups of items of at most pass_tokens (by `size`), at least one item each:
        everything at once on a GPU; on a CPU smaller passes keep the working set in cache (a
        packed pass of 32 images measured ~20% slower per image than one image at a time here)."""
        if self.pass_tokens is None:
            return [items]
        parts, cur, n = [], [], 0
        for item in items:
            if cur and n + size(item) > self.pass_tokens:
                parts.append(cur)
                cur, n = [], 0
            cur.append(item)
            n += size(item)
        return parts + [cur] if cur else parts

    def _prefill(self, st: DecodeState, preps: list[_Prepared], b0: int, feats: torch.Tensor | None,
                 r0: np.ndarray, cap: int) -> torch.Tensor:
        """Prefills requests b0.. of the batch as one packed causal forward: K/V into their cache
        slots, the importance rows' queries into their capture rows. Returns their last logits."""
        dev, t = self.device, self.text
        lengths = [p.length for p in preps]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = torch.tensor([tok for p in preps for tok in p.req.prompt_ids], device=dev)
        h = F.embedding(ids, t.embed)
        if feats is not None:  # image rows in request then prompt order, as the features are
            img_rows = torch.cat([offsets[b] + torch.arange(s, s + n) for b, p in enumerate(preps) for s, n in p.spans])
            img_rows = img_rows.to(dev)
            h[img_rows] = feats[:, : t.hidden].to(h.dtype)
        cos, sin = t.rope.mrope(torch.cat([p.positions for p in preps], 1).to(dev), h.dtype)
        seg = Segments.build(lengths, dev)
        slots = torch.cat([(b0 + b) * cap + torch.arange(n) for b, n in enumerate(lengths)]).to(dev)
        cap_src = torch.cat([offsets[b] + torch.arange(p.first_end, p.length) for b, p in enumerate(preps)]).to(dev)
        cap_dst = torch.cat([r0[b] + torch.arange(p.length - p.first_end) for b, p in enumerate(preps)]).to(dev)
        for li, w in enumerate(t.layers):
            q, k, v = t.qkv(w, h, cos, sin)
            st.keys[li].view(-1, t.kv_heads, t.head_dim).index_copy_(0, slots, k)
            st.values[li].view(-1, t.kv_heads, t.head_dim).index_copy_(0, slots, v)
            st.queries[li].index_copy_(0, cap_dst, q[cap_src])
            h = t.finish_layer(w, h, varlen_attention(q, k, v, seg, causal=True, scale=t.scale))
            if feats is not None and li < t.deepstack_levels:
                h.index_add_(0, img_rows, feats[:, t.hidden * (li + 1) : t.hidden * (li + 2)].to(h.dtype))
        return t.logits(h[torch.as_tensor(offsets[1:] - 1, device=dev)])

    def _consistency(self, preps: list[_Prepared], see: list[int], feats: torch.Tensor, imp: torch.Tensor,
                     st: DecodeState, answer_len: list[int]) -> torch.Tensor:
        """SEE's consistency pass (../shared/SGL_METHOD.md): for each request in `see`, the guide
        re-reads its prompt with only the top max(1, floor(ratio * N)) visual tokens of its own
        ranking (original positions) followed by its answer, all such requests as one packed causal
        forward. Returns the probability of each answer token, request after request."""
        dev, t = self.device, self.text
        # the consistency keep sets of every image, on the device
        n_img = [n for p in preps for _, n in p.spans]
        k_img = [keep_count(n, self.consistency_ratio) for n in n_img]
        keep_c, _ = keep_set(imp, np.concatenate([[0], np.cumsum(n_img)]), backend=self.importance_backend,
                             counts=k_img)
        img0 = np.concatenate([[0], np.cumsum([len(p.spans) for p in preps])])  # first image of each request
        kept_at = np.concatenate([[0], np.cumsum(k_img)])
        feat_at = np.concatenate([[0], np.cumsum(n_img)])
        pieces, positions, lengths, targets = [], [], [], []
        width = feats.shape[1]  # hidden, then the deepstack slices (zero on text rows)

        def embed(tokens: torch.Tensor) -> torch.Tensor:
            e = F.embedding(tokens, t.embed)
            return e if width == t.hidden else torch.cat([e, e.new_zeros(e.shape[0], width - t.hidden)], 1)

        for b in see:
            p = preps[b]
            ids = torch.as_tensor(p.req.prompt_ids, device=dev)
            h0 = embed(ids)
            rows, cursor = [], 0
            for i, (start, n) in enumerate(p.spans):
                img = int(img0[b]) + i
                h0[start : start + n] = feats[feat_at[img] : feat_at[img] + n].to(h0.dtype)
                rows += [torch.arange(cursor, start, device=dev), start + keep_c[kept_at[img] : kept_at[img + 1]]]
                cursor = start + n
            rows.append(torch.arange(cursor, p.length, device=dev))
            rows = torch.cat(rows)
            m = answer_len[b]
            answer = st.out_tokens[b, :m]
            pieces += [h0[rows], embed(answer[:-1])]
            next_pos = int(p.positions.max()) + 1
            positions += [p.positions.to(dev)[:, rows], (next_pos + torch.arange(m - 1, device=dev)).expand(3, -1)]
            lengths.append(rows.numel() + m - 1)
            targets.append(answer)
        h = torch.cat(pieces)
        deep, h = h[:, t.hidden :], h[:, : t.hidden].contiguous()
        cos, sin = t.rope.mrope(torch.cat(positions, 1), h.dtype)
        seg = Segments.build(lengths, dev)
        for li, w in enumerate(t.layers):
            q, k, v = t.qkv(w, h, cos, sin)
            h = t.finish_layer(w, h, varlen_attention(q, k, v, seg, causal=True, scale=t.scale))
            if li < t.deepstack_levels:  # the kept visual rows' own slices; zero elsewhere
                h = h + deep[:, t.hidden * li : t.hidden * (li + 1)]
        # the row before each answer token predicts it: the prompt's last row, then a_1 .. a_{m-1}
        ends = np.cumsum(lengths)
        pred = torch.cat([torch.arange(e - answer_len[b], e, device=dev) for b, e in zip(see, ends)])
        probs = torch.softmax(t.logits(h[pred]), dim=-1)
        return probs.gather(1, torch.cat(targets)[:, None])[:, 0]

    def _sync(self, timed: bool, phase: str, t0: float) -> float:
        if timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.timings[phase] += now - t0
            return now
        return t0

    def _run_chunk(self, preps: list[_Prepared], timed: bool) -> list[GuideResult]:
        dev, t = self.device, self.text
        B = len(preps)
        batch, cap = self._shape(B, max(self._need(p) for p in preps))
        # Query workspace rows: each request's prefill rows then its decode rows; padding rows share
        # one scratch region at the end.
        lengths = [p.length for p in preps]
        n_pre = [p.length - p.first_end for p in preps]
        region = [n + self.max_tokens - 1 for n in n_pre]
        r0 = np.concatenate([[0], np.cumsum(region)]).astype(np.int64)
        rows_real = int(r0[-1])
        self.reserve(batch * cap, rows_real + self.max_tokens)
        st = self._state(batch, cap)
        t0 = self._sync(timed, "vision", time.perf_counter())

        # 1. vision: all images of all requests (in passes of at most pass_tokens patches)
        images = [(p.req.pixel_values, p.grids) for p in preps if p.spans]
        feats = None
        if images:
            feats = torch.cat([self.vision(torch.cat([px for px, _ in part]), [g for _, gs in part for g in gs])
                               for part in self._passes(images, lambda im: im[0].shape[0])])
        t0 = self._sync(timed, "vision", t0)

        # 2. packed prefill (in passes of at most pass_tokens prompt tokens)
        logits = torch.zeros(batch, t.lm_head.shape[0], dtype=torch.float32, device=dev)
        b0, f0 = 0, 0
        for part in self._passes(preps, lambda p: p.length):
            n_feats = sum(n for p in part for _, n in p.spans)
            logits[b0 : b0 + len(part)] = self._prefill(
                st, part, b0, feats[f0 : f0 + n_feats] if n_feats else None, r0[b0 : b0 + len(part)], cap)
            b0, f0 = b0 + len(part), f0 + n_feats
        t0 = self._sync(timed, "prefill", t0)

        # 3. decode
        real = torch.arange(batch) < B
        st.lens.copy_(torch.tensor(lengths + [0] * (batch - B)))
        st.pos.copy_(torch.tensor([int(p.positions.max()) + 1 for p in preps] + [0] * (batch - B)))
        st.done.copy_(~real)
        st.qrow0.copy_(torch.tensor([int(r0[b]) + n_pre[b] for b in range(B)] + [rows_real] * (batch - B)))
        st.step.zero_()
        st.out_tokens.zero_()
        st.out_probs.fill_(1.0)
        pick(st, logits, st.step, real.to(dev))
        for s in range(self.max_tokens - 1):
            if s % SYNC_EVERY == 0 and bool(st.done.all()):
                break
            self.steps(st)
        lens = st.lens[:B].tolist()
        answer_len = [n - p.length + 1 for n, p in zip(lens, preps)]
        t0 = self._sync(timed, "decode", t0)

        # 4. importance from the captured queries and the keys in place, keep sets on the device
        row_pos = np.zeros(rows_real, dtype=np.int64)
        for b, p in enumerate(preps):
            row_pos[r0[b] : r0[b] + n_pre[b]] = np.arange(p.first_end, p.length)
            dec = answer_len[b] - 1  # the fed answer tokens a_1 .. a_{m-1}
            row_pos[r0[b] + n_pre[b] : r0[b] + n_pre[b] + dec] = p.length + np.arange(dec)
        spans = [(b, s, n) for b, p in enumerate(preps) for s, n in p.spans]
        imp = keep_idx = torch.zeros(0, device=dev)
        if spans:
            key_cache = self._kv[:, 0, : batch * cap].unflatten(1, (batch, cap))[:, :B]
            imp = visual_importance_paged(
                st.queries[:, :rows_real], key_cache, torch.arange(B, dtype=torch.int32)[:, None], lens, r0, row_pos,
                [b for b, _, _ in spans], [s for _, s, _ in spans], [n for _, _, n in spans],
                sm_scale=t.scale, backend=self.importance_backend,
            )
            cu_image = np.concatenate([[0], np.cumsum([n for _, _, n in spans])])
            keep_idx, _ = keep_set(imp, cu_image, backend=self.importance_backend,
                                   counts=[k for p in preps for k in p.req.keep_counts],
                                   rules=[p.req.importance for p in preps for _ in p.spans],
                                   layouts=[self._layout(g) for p in preps for g in p.grids], scratch=self._keep_scratch)
        t0 = self._sync(timed, "importance", t0)

        # 5. SEE: the consistency pass of the requests that may exit
        see = [b for b, p in enumerate(preps) if p.req.see and p.spans]
        cons = self._consistency(preps, see, feats, imp, st, answer_len) if see else torch.zeros(0, device=dev)
        M = self.max_tokens
        host = torch.cat([st.out_tokens[:B].flatten().double(), st.out_probs[:B].flatten().double(),
                          imp.double(), keep_idx.double(), cons.double()]).cpu()  # the one copy of the results
        self._sync(timed, "consistency", t0)

        tokens = host[: B * M].long().view(B, M)
        probs = host[B * M : 2 * B * M].view(B, M)
        flat_imp = host[2 * B * M : 2 * B * M + imp.numel()].float()
        flat_keep = host[2 * B * M + imp.numel() : 2 * B * M + imp.numel() + keep_idx.numel()].long()
        flat_cons = host[2 * B * M + imp.numel() + keep_idx.numel() :].tolist()
        consistency, c_off = {}, 0
        for b in see:
            consistency[b] = math.prod(flat_cons[c_off : c_off + answer_len[b]])
            c_off += answer_len[b]
        results, i_off, k_off = [], 0, 0
        for b, p in enumerate(preps):
            m = answer_len[b]
            answer = tokens[b, :m].tolist()
            res = GuideResult(request_id=p.req.request_id, answer_ids=answer, finished=answer[-1] in self.eos_ids,
                              confidence=confidence(probs[b, :m].tolist()), consistency=consistency.get(b),
                              num_visual_tokens=[n for _, n in p.spans], importance_rule=p.req.importance)
            for (_, n), k in zip(p.spans, p.req.keep_counts):
                res.importance.append(flat_imp[i_off : i_off + n])
                res.keep_indices.append(flat_keep[k_off : k_off + k])
                i_off, k_off = i_off + n, k_off + k
            results.append(res)
        return results
