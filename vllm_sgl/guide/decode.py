"""The guide's greedy decode with static shapes: one step function over preallocated buffers, the
same code eager on the CPU and captured as a CUDA graph per (batch, capacity) bucket on CUDA.

A step reads and writes only device tensors: the token each row feeds, its key count (`lens`),
its next position, a done flag and the step number. It writes the fed token's key and value into
the row's cache slot, its post-RoPE query into the row's region of the capture buffer (the
importance rows), and the next token (greedy argmax) and its probability into the output buffers.
Nothing in a step asks the host anything, so the host can run ahead; the decode loop checks
"all done" only every few steps.

Rows that are done (or are batch padding) keep running with unchanged `lens`: their writes land
on a slot past their last key and on capture rows the importance step ignores.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vllm_sgl.guide.text import TextModel

logger = logging.getLogger("vllm_sgl")


@dataclass
class DecodeState:
    """The static buffers of one (batch, capacity) bucket. Their addresses never change, so a
    captured graph replays on whatever the host copies into them."""

    keys: list[torch.Tensor]  # per layer (B, cap, Hkv, D), views into the guide's KV workspace
    values: list[torch.Tensor]
    queries: torch.Tensor  # (layers, R, Hq, D) capture buffer (the guide's query workspace)
    tokens: torch.Tensor  # (B,) long: the token each row feeds this step
    lens: torch.Tensor  # (B,) long: keys already in the row's cache = the fed token's slot
    pos: torch.Tensor  # (B,) long: the fed token's position
    done: torch.Tensor  # (B,) bool
    qrow0: torch.Tensor  # (B,) long: the row's first decode row in the capture buffer
    step: torch.Tensor  # () long: decode step number (0: feeding the first answer token)
    out_tokens: torch.Tensor  # (B, max_tokens) long
    out_probs: torch.Tensor  # (B, max_tokens) float32
    eos: torch.Tensor  # (E,) long
    rows: torch.Tensor  # (B,) arange
    slots: torch.Tensor  # (cap,) arange
    max_tokens: int

    @classmethod
    def allocate(cls, kv: torch.Tensor, queries: torch.Tensor, batch: int, cap: int, max_tokens: int,
                 eos: list[int]) -> "DecodeState":
        """kv: the guide's KV workspace (layers, 2, slots, Hkv, D); the bucket uses its first batch * cap slots."""
        layers, _, _, hkv, d = kv.shape
        dev = kv.device
        view = kv[:, :, : batch * cap].unflatten(2, (batch, cap))  # (layers, 2, B, cap, Hkv, D)
        long = dict(dtype=torch.long, device=dev)
        return cls(
            keys=[view[i, 0] for i in range(layers)], values=[view[i, 1] for i in range(layers)],
            queries=queries,
            tokens=torch.zeros(batch, **long), lens=torch.zeros(batch, **long), pos=torch.zeros(batch, **long),
            done=torch.ones(batch, dtype=torch.bool, device=dev), qrow0=torch.zeros(batch, **long),
            step=torch.zeros((), **long),
            out_tokens=torch.zeros(batch, max_tokens, **long),
            out_probs=torch.ones(batch, max_tokens, dtype=torch.float32, device=dev),
            eos=torch.tensor(sorted(eos), **long), rows=torch.arange(batch, device=dev),
            slots=torch.arange(cap, device=dev), max_tokens=max_tokens,
        )

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def cap(self) -> int:
        return self.slots.shape[0]

    def mutable(self) -> list[torch.Tensor]:
        return [self.tokens, self.lens, self.pos, self.done, self.step, self.out_tokens, self.out_probs]


def pick(st: DecodeState, logits: torch.Tensor, col: torch.Tensor, fed: torch.Tensor) -> None:
    """Greedy choice from logits (B, V) for the rows that fed a real token (`fed`), written at
    output column `col` (a device scalar); rows whose choice ends their answer become done."""
    tok = logits.argmax(-1)
    p = torch.softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
    st.out_tokens.index_copy_(1, col.view(1), torch.where(fed, tok, torch.zeros_like(tok)).view(-1, 1))
    st.out_probs.index_copy_(1, col.view(1), torch.where(fed, p, torch.ones_like(p)).view(-1, 1))
    ends = (tok[:, None] == st.eos[None, :]).any(-1) | (col + 1 >= st.max_tokens)
    st.done.logical_or_(fed & ends)
    st.tokens.copy_(tok)


def decode_step(text: TextModel, st: DecodeState) -> None:
    """Feeds each row's token, captures its queries, picks the next token. Device work only."""
    fed = ~st.done
    h = F.embedding(st.tokens, text.embed)
    cos, sin = text.rope.rope_1d(st.pos, h.dtype)
    # Additive mask, built once per step in the attention's dtype: (B, 1, 1, cap), 0 on the row's keys.
    visible = st.slots[None, :] <= st.lens[:, None]
    mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill_(~visible, float("-inf"))
    mask = mask[:, None, None, :]
    qrow = st.qrow0 + st.step
    for li, w in enumerate(text.layers):
        q, k, v = text.qkv(w, h, cos, sin)
        st.keys[li].index_put_((st.rows, st.lens), k)
        st.values[li].index_put_((st.rows, st.lens), v)
        st.queries[li].index_copy_(0, qrow, q)
        h = text.finish_layer(w, h, attend(text, q, st.keys[li], st.values[li], mask))
    step = fed.long()
    st.lens.add_(step)
    st.pos.add_(step)
    st.step.add_(1)
    pick(st, text.logits(h), st.step, fed)


# The decode attention's kernels on CUDA, chosen on purpose: the memory-efficient kernel takes the
# additive mask and needs no per-shape set-up. torch 2.11 would prefer cuDNN attention on sm90
# (cuDNN >= 9.15), which builds an execution plan per new shape (~0.4 s each, a public report):
# every capture bucket at load, and inside serving steps for eager (MoE) guides at each new
# capacity. Math stays as the fallback for inputs the efficient kernel refuses.
DECODE_SDPA_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attend(text: TextModel, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor, backends=DECODE_SDPA_BACKENDS) -> torch.Tensor:
    """One decode row per request against its cache: q (B, Hq, D), keys and values (B, cap, Hkv, D)
    (views of the workspace), mask (B, 1, 1, cap) additive -> (B, Hq, D).

    The G = Hq / Hkv query heads of a KV head are laid out as G query rows of that head,
    (B, Hkv, G, D) against (B, Hkv, cap, D), so no GQA flag is needed: with a mask *and* enable_gqa,
    SDPA can use neither flash (no mask) nor memory-efficient attention (no GQA) and falls back to
    the math kernel, which copies K/V G times over the whole capacity and upcasts them, every layer
    of every step. In this form the fused memory-efficient kernel takes it (DECODE_SDPA_BACKENDS on
    CUDA); which one runs is reported by vllm_sgl.guide.profile (`sdpa_backends`)."""
    b, hq, d = q.shape
    with sdpa_kernel(list(backends)) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.view(b, text.kv_heads, hq // text.kv_heads, d),
                                             keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                                             scale=text.scale)
    return out.reshape(b, hq, d)


class StepRunner:
    """Runs decode_step for a bucket: eagerly, or (CUDA) by replaying its graph. Guide.warm_up
    captures every bucket at load (`capture`); a bucket first met later (the workspace grew) is
    captured then, with a warning: a capture synchronises and empties the allocator's cache."""

    def __init__(self, text: TextModel, use_graphs: bool):
        self.text = text
        self.use_graphs = use_graphs
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool for every bucket's graph (one replays at a time)
        self.warmed = False  # set by Guide.warm_up: later captures are lazy ones
        self.lazy_captures = 0

    def clear(self) -> None:
        self._graphs.clear()

    def capture(self, st: DecodeState) -> None:
        # A 1-token budget never decodes (the first token comes from the prefill): nothing to capture.
        if id(st) not in self._graphs and st.max_tokens > 1:
            self._graphs[id(st)] = self._capture(st)

    def __call__(self, st: DecodeState) -> None:
        if not (self.use_graphs and st.tokens.is_cuda):
            decode_step(self.text, st)
            return
        graph = self._graphs.get(id(st))
        if graph is None:
            if self.warmed:
                self.lazy_captures += 1
                logger.warning("SGL guide: capturing the decode step of bucket (batch %d, capacity %d) inside a "
                               "step (not captured at load: the workspace grew)", st.batch, st.cap)
            graph = self._graphs[id(st)] = self._capture(st)
        graph.replay()

    def _capture(self, st: DecodeState) -> "torch.cuda.CUDAGraph":
        # Warm-up and capture run the step for real: keep the state as it is and put it back after.
        saved = [t.clone() for t in st.mutable()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm_steps(self.text, st)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            decode_step(self.text, st)
        for t, s in zip(st.mutable(), saved):
            t.copy_(s)
        return graph


def warm_steps(text: TextModel, st: DecodeState, n: int = 2) -> None:
    """The real steps a capture runs first (lazy allocations, kernel choices). Each starts from step
    0, so it writes output column 1 and no further: with a 2-token budget there is no column 2 (on
    CUDA an out-of-range write is a device-side assert at load, which kills the engine)."""
    for _ in range(n):
        st.step.zero_()
        decode_step(text, st)
