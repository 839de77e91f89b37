"""Ranking study (issue 33): which ranking of the guide's attention keeps the visual tokens the
target needs at small keep ratios, and how it compares with the token-pruning baselines. PyTorch
reference only (vllm_sgl.reference, fp32, batch 1); no engine.

    .venv/bin/python benchmarks/ranking_study.py capture --split validation --examples 150
    .venv/bin/python benchmarks/ranking_study.py capture --split test --examples 200
    .venv/bin/python benchmarks/ranking_study.py budget --split test            # where keep 0.1 goes
    .venv/bin/python benchmarks/ranking_study.py tune --split validation        # hyperparameters
    .venv/bin/python benchmarks/ranking_study.py eval --split test              # every method, every ratio
    .venv/bin/python benchmarks/ranking_study.py report --split test --out benchmarks/figures/ranking-study-2026-12-04

`capture` runs, once per example, everything a ranking can be computed from and stores it under
--cache (default .cache/ranking-study/SPLIT/NNNN.pt):
- the guide's attention probabilities from every importance row (the prompt rows after the image,
  then the decode rows a_1..a_{m-1}) to every visual token, per layer and head: (layers, heads,
  rows, N); and the same rows on the blank image (the example's own background and noise, no
  objects; same prompt, the guide's answer teacher-forced) for the position prior;
- the guide's visual-token features: the vision tower's merged output and the language model's
  hidden state at the visual positions entering every layer (and after the last);
- the target's visual embeddings (its own vision tower), its FastV ranking (second layer, prompt
  rows after the image), both vision towers' last-block attention received per merged token
  (VisionZip) and the last block's keys per merged token, the question's token embeddings of both
  models, the guide's and the target's greedy answers on the full image.
`eval` then ranks, keeps k = max(1, floor(r * N)) tokens, and runs the target's greedy answer with
only those visual tokens at its input (original M-RoPE positions, as `SGLReference` does); replies
are cached per (example, keep set), so methods that keep the same tokens cost one run.

Methods (`METHODS`; `--methods` picks some): the paper's ranking `sgl`, candidate rankings from the
guide's attention (`sgl-*`), and the baselines `random`, `fastv`, `divprune`, `cdpruner-*`,
`visionzip`, `visionzip-ctx`. Their definitions are in the functions below; hyperparameters that
`tune` chooses on the validation split are in `HPARAMS` (the chosen values are written there).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_sgl.pruning import keep_count  # noqa: E402
from vllm_sgl.tasks import shapes  # noqa: E402

RATIOS = (0.5, 0.25, 0.1, 0.05)
GRID_TOKENS = shapes.IMAGE_SIZE // 28  # 16 merged tokens per side
FASTV_LAYER = 1
MAX_TOKENS = 32


def log(msg: str) -> None:
    print(f"[ranking] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Geometry of the task: which visual tokens an object covers


def cell_tokens(row: int, col: int, side: int = GRID_TOKENS) -> list[int]:
    """The 2 x 2 merged visual tokens of one 56 px cell (row-major token order)."""
    return [(2 * row + dr) * side + 2 * col + dc for dr in (0, 1) for dc in (0, 1)]


def object_mask(objects, n: int = GRID_TOKENS * GRID_TOKENS) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    for r, c, *_ in objects:
        m[cell_tokens(r, c)] = True
    return m


def asked_objects(c: dict) -> list[tuple]:
    """The objects the answer depends on: every object for lists, the one named for the others
    (exists: the matching object if there is one, else none)."""
    objs, q, kind = c["objects"], c["question"].lower().rstrip("?."), c["kind"]
    if kind == "list":
        return list(objs)
    if kind == "color":  # What color is the {shape}
        shape = q.split()[-1]
        return [o for o in objs if o[3] == shape]
    if kind == "shape":  # What shape is the {color} object
        color = q.split()[-2]
        return [o for o in objs if o[2] == color]
    color, shape = q.split()[-2:]  # exists / where: ... {color} {shape}
    return [o for o in objs if o[2] == color and o[3] == shape]


# ----------------------------------------------------------------------------------------------
# Capture


def blank_image(example: shapes.Example):
    """The example's image without its objects: the same background level and the same noise
    (shapes._draw draws the noise from default_rng(seed) after the shapes)."""
    from PIL import Image

    side = shapes.IMAGE_SIZE
    noise = np.random.default_rng(example.seed).normal(0.0, 6.0, (side, side, 3))
    px = np.clip(np.full((side, side, 3), float(example.background), np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(px)


class RowAttention:
    """Observer: the probabilities every row strictly after the image pays to each visual key, per
    layer and head, in row order (prefill rows, then one row per decode step)."""

    def __init__(self, start: int, n: int, num_layers: int):
        self.start, self.n = start, n
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def __call__(self, layer, probs, q, row_seq, key_seq, keys) -> None:
        rows = row_seq > self.start + self.n - 1
        if not bool(rows.any()):
            return
        cols = (key_seq >= self.start) & (key_seq < self.start + self.n)
        assert int(cols.sum()) == self.n
        self.rows[layer].append(probs[:, rows][:, :, cols].float().cpu())

    def tensor(self) -> torch.Tensor:  # (layers, heads, rows, N)
        return torch.stack([torch.cat(r, dim=1) for r in self.rows])


class HiddenAtVisual:
    """Forward pre-hooks on every decoder layer's input norm (and the final norm): the hidden state
    of the visual rows entering each layer, from the prefill call only."""

    def __init__(self, vlm, start: int, n: int):
        self.start, self.n, self.L = start, n, None
        self.states: dict[int, torch.Tensor] = {}
        mods = [layer.input_layernorm for layer in vlm.lm.layers] + [vlm.lm.norm]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(mods)]

    def _hook(self, i):
        def hook(module, args):
            h = args[0]
            if h.shape[0] > self.start + self.n and i not in self.states:
                self.states[i] = h[self.start : self.start + self.n].detach().float().cpu()
        return hook

    def remove(self) -> torch.Tensor:
        for h in self.handles:
            h.remove()
        return torch.stack([self.states[i] for i in sorted(self.states)])


class VisionLastBlock:
    """Pre-hook on the vision tower's last block's attention (full attention in Qwen2.5-VL): the
    attention each merged token receives (mean over heads, summed over all query patches and over
    its 2 x 2 patches) and its keys (mean over its patches, heads concatenated), in the merged
    output's (row-major) order."""

    def __init__(self, vlm):
        self.visual = vlm.model.model.visual
        self.attn = self.visual.blocks[-1].attn
        self.received = None
        self.keys = None
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.grid = None

    def _hook(self, module, args, kwargs):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        h = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        cu = kwargs["cu_seqlens"]
        assert cu.numel() == 2, "one image, one full-attention sequence"
        S = h.shape[0]
        q, k, _ = module.qkv(h).reshape(S, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q.float(), k.float()) * module.scaling, dim=-1)
        recv = probs.mean(0).sum(0)  # (S,)
        unit = self.visual.spatial_merge_size ** 2
        self.received = recv.view(S // unit, unit).sum(1)
        # keys without RoPE (content only) for similarity
        k_raw = module.qkv(h).reshape(S, 3, module.num_heads, -1)[:, 1].reshape(S, -1)
        self.keys = k_raw.float().view(S // unit, unit, -1).mean(1)

    def result(self, grid_thw: torch.Tensor):
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.visual.spatial_merge_size, window_size=self.visual.window_size,
            patch_size=self.visual.patch_size)
        rev = torch.argsort(window_index)
        return self.received[rev].detach().cpu(), self.keys[rev].detach().cpu()

    def remove(self):
        self.handle.remove()


@torch.no_grad()
def capture_example(ref, e: shapes.Example) -> dict:
    from vllm_sgl.reference import ImportanceObserver, LayerCache, Observers

    tok = ref.processor.tokenizer
    prep = ref.prepare([e.image], e.question)
    (start, n), = prep.visual_spans
    L = prep.input_ids.numel()
    G, T = ref.guide, ref.target

    # guide: full image, greedy answer, per-row attention, hidden states, vision-tower attention
    gvis = VisionLastBlock(G)
    g_embeds = G.input_embeddings(prep)
    gvis.remove()
    g_recv, g_keys = gvis.result(prep.image_grid_thw)
    g_pos = G.positions(prep)
    rows = RowAttention(start, n, G.num_layers)
    imp = ImportanceObserver(prep.visual_spans)
    hid = HiddenAtVisual(G, start, n)
    answer, top1, _ = G.greedy(g_embeds, g_pos, MAX_TOKENS, observer=Observers(rows, imp))
    g_hidden = hid.remove()
    gA = rows.tensor()
    assert torch.allclose(gA.sum(dim=(0, 1, 2)), imp.importance[0], rtol=1e-4, atol=1e-5)

    # guide on the blank image, same prompt, its answer teacher-forced: the same rows
    bprep = ref.prepare([blank_image(e)], e.question)
    b_embeds, b_pos = G.input_embeddings(bprep), G.positions(bprep)
    ans = answer[:-1]
    h = torch.cat([b_embeds] + [G._embed_token(t) for t in ans])
    nxt = int(b_pos.max()) + 1
    pos = torch.cat([b_pos, (nxt + torch.arange(len(ans))).expand(3, -1)], dim=1)
    brows = RowAttention(start, n, G.num_layers)
    G.forward(h, pos, torch.arange(h.shape[0]), [LayerCache() for _ in range(G.num_layers)], observer=brows)
    gA_blank = brows.tensor()
    assert gA_blank.shape == gA.shape, (gA_blank.shape, gA.shape)

    # target: visual embeddings, FastV, vision-tower attention, full-image answer
    tvis = VisionLastBlock(T)
    t_embeds = T.input_embeddings(prep)
    tvis.remove()
    t_recv, t_keys = tvis.result(prep.image_grid_thw)
    t_pos = T.positions(prep)
    fastv = ImportanceObserver(prep.visual_spans, {FASTV_LAYER})
    T.forward(t_embeds, t_pos, torch.arange(L), [LayerCache() for _ in range(T.num_layers)], observer=fastv)
    full, _, _ = T.greedy(t_embeds, t_pos, MAX_TOKENS)

    q_ids = torch.tensor(tok(e.question)["input_ids"])
    return {
        "seed": e.seed, "kind": e.kind, "question": e.question, "answer": e.answer,
        "objects": [(o.row, o.col, o.color, o.shape) for o in e.objects],
        "start": start, "n": n, "L": L, "n_prefill_rows": L - start - n,
        "gA": gA, "gA_blank": gA_blank,
        "g_importance": imp.importance[0],  # the method's importance exactly as SGLReference sums it
        "g_hidden": g_hidden.half(),  # (layers + 1, N, hidden): [0] = the vision tower's merged output
        "g_recv": g_recv, "g_keys": g_keys,
        "g_text": G.lm.embed_tokens(q_ids).float(),
        "t_vis": t_embeds[start : start + n].float().clone(),
        "t_fastv": fastv.importance[0], "t_recv": t_recv, "t_keys": t_keys,
        "t_text": T.lm.embed_tokens(q_ids).float(),
        "guide_reply": tok.decode(answer, skip_special_tokens=True),
        "guide_ids": answer, "guide_top1": top1,
        "target_reply": tok.decode(full, skip_special_tokens=True),
    }


def load_ref(pair_dir: Path):
    from vllm_sgl.reference import SGLReference

    return SGLReference(pair_dir / "guide", pair_dir / "target")


def cmd_capture(args) -> None:
    torch.set_num_threads(args.threads)
    d = args.cache / args.split
    d.mkdir(parents=True, exist_ok=True)
    ref = load_ref(args.pair_dir)
    examples = shapes.split_examples(args.split, args.examples)
    t0 = time.perf_counter()
    done = 0
    for i, e in enumerate(examples):
        f = d / f"{i:04d}.pt"
        if f.exists():
            continue
        torch.save(capture_example(ref, e), f)
        done += 1
        if done % 20 == 0:
            log(f"capture {args.split}: {i + 1}/{len(examples)} ({time.perf_counter() - t0:.0f} s)")
    log(f"captured {done} new examples of {args.split} in {time.perf_counter() - t0:.0f} s")


def load_captures(cache: Path, split: str, count: int, fields=None) -> list[dict]:
    out = []
    for i in range(count):
        f = cache / split / f"{i:04d}.pt"
        if not f.exists():
            raise SystemExit(f"{f} missing: run `capture --split {split} --examples {count}` first")
        c = torch.load(f, weights_only=False)
        if fields is not None:
            c = {k: v for k, v in c.items() if k in fields or not torch.is_tensor(v)}
        out.append(c)
    return out



# ----------------------------------------------------------------------------------------------
# Rankings. Each method maps (capture, k) to the kept indices (ascending). Top-k everywhere is
# vllm_sgl.pruning.top_k_keep: ties to the lower index.


def topk(score: torch.Tensor, k: int) -> torch.Tensor:
    from vllm_sgl.pruning import top_k_keep

    return top_k_keep(score, k)


def guide_importance(c: dict, rows: str = "all", layers=None, rownorm: bool = False, blank: bool = False) -> torch.Tensor:
    """Sum of the guide's attention to each visual token over the chosen layers, heads and rows.
    rows: 'all' (the method's Q: prefill rows after the image + decode rows), 'prefill', 'decode'
    (a_1..a_{m-1}; the last prefill row if the answer has one token), 'answer' (the rows whose
    output is an answer token: the last prefill row + the decode rows).
    rownorm: each (layer, head, row)'s probabilities over the visual tokens scaled to sum to 1
    (only how a row spreads its visual attention counts, not how much of it goes to text)."""
    A = c["gA_blank"] if blank else c["gA"]
    p = c["n_prefill_rows"]
    if rows == "prefill":
        A = A[:, :, :p]
    elif rows == "decode":
        A = A[:, :, p:] if A.shape[2] > p else A[:, :, p - 1 : p]
    elif rows == "answer":
        A = A[:, :, p - 1 :]
    if layers is not None:
        A = A[list(layers)]
    if rownorm:
        A = A / A.sum(-1, keepdim=True).clamp_min(1e-12)
    return A.sum(dim=(0, 1, 2))


def cosine(F: torch.Tensor) -> torch.Tensor:
    F = F.double()
    F = F / F.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return F @ F.T


def dpp_greedy(K: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of a DPP with kernel K (fast incremental Cholesky, as CDPruner's
    conditional_dpp_map): each step takes argmax of the remaining marginal gain d_j^2 (first index on
    ties), then orthogonalises. When every remaining gain is <= 1e-10 (the kernel's rank is spent),
    the rest are taken by the diagonal (relevance) order."""
    K = K.double()
    N = K.shape[0]
    d2 = K.diagonal().clone()
    cis = torch.zeros(k, N, dtype=K.dtype)
    sel: list[int] = []
    taken = torch.zeros(N, dtype=torch.bool)
    for i in range(k):
        j = int(torch.argmax(d2))
        if float(d2[j]) <= 1e-10:
            rest = torch.sort(-K.diagonal().masked_fill(taken, -float("inf")), stable=True).indices
            sel += rest[: k - i].tolist()
            break
        sel.append(j)
        taken[j] = True
        e = (K[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(d2[j]))
        cis[i] = e
        d2 = d2 - e * e
        d2[taken] = -float("inf")
    return sorted(sel)


def maxmin_greedy(D: torch.Tensor, k: int, weight: torch.Tensor | None = None, first: int | None = None) -> list[int]:
    """DivPrune's greedy max-min diversity on distances D (N x N): the first token is the one whose
    nearest other token is farthest (or `first`), then repeatedly the token whose distance to the
    kept set is largest (times `weight`, if given). Ties: first index."""
    N = D.shape[0]
    if first is None:
        nn = torch.topk(D, 2, dim=0, largest=False).values[1]
        first = int(torch.argmax(nn if weight is None else nn * weight))
    sel = [first]
    dmin = D[first].clone()
    taken = torch.zeros(N, dtype=torch.bool)
    taken[first] = True
    while len(sel) < k:
        s = dmin if weight is None else dmin * weight
        s = s.masked_fill(taken, -float("inf"))
        j = int(torch.argmax(s))
        sel.append(j)
        taken[j] = True
        dmin = torch.minimum(dmin, D[j])
    return sorted(sel)


def mmr_greedy(rel: torch.Tensor, S: torch.Tensor, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance: repeatedly the token with the largest
    rel_j - lam * max_{s kept} S_js (rel scaled to [0, 1] by its max). Ties: first index."""
    rel = rel.double() / rel.max().clamp_min(1e-12)
    N = rel.numel()
    red = torch.zeros(N, dtype=torch.float64)
    taken = torch.zeros(N, dtype=torch.bool)
    sel: list[int] = []
    for _ in range(k):
        s = (rel - lam * red).masked_fill(taken, -float("inf"))
        j = int(torch.argmax(s))
        sel.append(j)
        taken[j] = True
        red = torch.maximum(red, S[j].clamp_min(0))
    return sorted(sel)


def relevance_kernel(rel: torch.Tensor, S: torch.Tensor, theta: float) -> torch.Tensor:
    """CDPruner's conditional kernel: r_i S_ij r_j with r = exp(alpha * rel), alpha =
    theta / (2 (1 - theta)); rel is scaled to [0, 1] (min-max) first."""
    rel = rel.double()
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-6)
    if theta != 1:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel[:, None] * S * rel[None, :]


def text_relevance(vis: torch.Tensor, text: torch.Tensor, sign: float) -> torch.Tensor:
    """CDPruner's instruction relevance: the mean cosine of each visual token with the question's
    token embeddings (CDPruner negates it for LLaVA's CLIP space; `sign` chooses)."""
    v = vis.double() / vis.double().norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    return sign * (v @ t.T).mean(-1)


def guide_features(c: dict, which: str) -> torch.Tensor:
    """The guide's features of the visual tokens: 'vis' (the vision tower's merged output, the
    language model's input), 'h1'/'h2' (entering layer 1/2), 'last' (after the last layer, before
    the final norm), 'keys' (the vision tower's last-block keys, mean of the 2 x 2 patches)."""
    if which == "keys":
        return c["g_keys"]
    idx = {"vis": 0, "h1": 1, "h2": 2, "h3": 3, "last": -1}[which]
    return c["g_hidden"][idx].float()


_PRIORS: dict[str, torch.Tensor] = {}


def static_prior(cache: Path, split: str = "validation", count: int = 200, kind: str = "blank") -> torch.Tensor:
    """The position prior, computed once (per guide and image grid) offline: the mean over `count`
    validation prompts of the guide's importance on their blank images ('blank'), or on the real
    images ('mean'), each normalised to sum to 1, times N (1 = no bias)."""
    key = f"{split}:{count}:{kind}"
    if key not in _PRIORS:
        f = cache / f"prior-{split}-{count}-{kind}.pt"
        if f.exists():
            _PRIORS[key] = torch.load(f)
        else:
            cs = load_captures(cache, split, count, fields=("gA", "gA_blank"))
            imps = torch.stack([guide_importance(c, blank=(kind == "blank")) for c in cs])
            prior = (imps / imps.sum(-1, keepdim=True)).mean(0) * imps.shape[1]
            torch.save(prior, f)
            _PRIORS[key] = prior
    return _PRIORS[key]


class Ctx:
    cache: Path = ROOT / ".cache/ranking-study"


def m_random(c, k, hp):
    return topk(torch.rand(c["n"], generator=torch.Generator().manual_seed(c["seed"])), k)


def m_fastv(c, k, hp):
    return topk(c["t_fastv"], k)


def m_sgl(c, k, hp):
    return topk(guide_importance(c), k)


def m_sgl_rows(c, k, hp):
    return topk(guide_importance(c, rows=hp["rows"], rownorm=hp.get("rownorm", False),
                                 layers=hp.get("layers")), k)


def m_sgl_prior_exact(c, k, hp):
    """importance / (the same rows' importance on the blank image), per request."""
    return topk(guide_importance(c) / guide_importance(c, blank=True).clamp_min(1e-12) ** hp.get("beta", 1.0), k)


def m_sgl_prior_static(c, k, hp):
    prior = static_prior(Ctx.cache, kind=hp.get("prior", "blank"))
    return topk(guide_importance(c, rows=hp.get("rows", "all")) / prior ** hp.get("beta", 1.0), k)


def _guide_rel(c, hp):
    imp = guide_importance(c, rows=hp.get("rows", "all"), rownorm=hp.get("rownorm", False))
    if hp.get("prior_beta"):
        imp = imp / static_prior(Ctx.cache) ** hp["prior_beta"]
    if hp.get("log"):
        imp = torch.log(imp.clamp_min(1e-12))
    return imp


def m_sgl_dpp(c, k, hp):
    """CDPruner's conditional DPP with the guide's importance as the relevance."""
    S = cosine(guide_features(c, hp["feat"]))
    return dpp_greedy(relevance_kernel(_guide_rel(c, hp), S, hp["theta"]), k)


def m_sgl_mmr(c, k, hp):
    S = cosine(guide_features(c, hp["feat"]))
    return mmr_greedy(_guide_rel(c, hp), S, k, hp["lam"])


def m_sgl_maxmin(c, k, hp):
    """DivPrune's max-min greedy weighted by the guide's importance (scaled to (0, 1]): first the
    most important token, then argmax importance^a x distance to the kept set."""
    rel = _guide_rel(c, hp).double()
    rel = rel / rel.max()
    D = 1 - cosine(guide_features(c, hp["feat"]))
    return maxmin_greedy(D, k, weight=rel ** hp["a"], first=int(torch.argmax(rel)))


def m_divprune(c, k, hp):
    return maxmin_greedy(1 - cosine(c["t_vis"] if hp.get("side", "target") == "target" else guide_features(c, "vis")), k)


def m_cdpruner(c, k, hp):
    """CDPruner: relevance = the question's text embedding vs the visual tokens (the target's, or
    the guide's), similarity = cosine of the same visual tokens, conditional DPP greedy MAP."""
    if hp["side"] == "target":
        vis, text = c["t_vis"], c["t_text"]
    else:
        vis, text = guide_features(c, "vis"), c["g_text"]
    rel = text_relevance(vis, text, hp.get("sign", -1.0))
    return dpp_greedy(relevance_kernel(rel, cosine(vis), hp.get("theta", 0.5)), k)


def m_visionzip(c, k, hp):
    return topk(c["t_recv"] if hp.get("side", "target") == "target" else c["g_recv"], k)


def visionzip_ctx(c, k, hp):
    """VisionZip with contextual tokens: k_d = round(k * 54 / 64) dominant tokens by attention
    received in the target's last vision block; of the rest, k_c = k - k_d evenly spaced ones
    (every len/k_c-th, VisionZip's uniform pick) become centres, every other remaining token is
    averaged into the centre whose keys it is most similar to (cosine); each centre's embedding is
    replaced by the mean of its group. Returns (kept indices, {index: new embedding row})."""
    k_d = max(1, round(k * 54 / 64)) if k > 1 else 1
    k_c = k - k_d
    dom = topk(c["t_recv"], k_d)
    if k_c <= 0:
        return dom, {}
    rest = torch.tensor(sorted(set(range(c["n"])) - set(dom.tolist())))
    step = max(1, len(rest) // k_c)
    centres = rest[::step][:k_c]
    others = torch.tensor(sorted(set(rest.tolist()) - set(centres.tolist())), dtype=torch.long)
    keys = c["t_keys"].double()
    keys = keys / keys.norm(dim=-1, keepdim=True)
    assign = torch.argmax(keys[others] @ keys[centres].T, dim=1) if len(others) else torch.zeros(0, dtype=torch.long)
    new = {}
    for ci, cidx in enumerate(centres.tolist()):
        group = [cidx] + others[assign == ci].tolist()
        new[cidx] = c["t_vis"][group].mean(0)
    return torch.sort(torch.cat([dom, centres])).values, new


def m_visionzip_ctx(c, k, hp):
    return visionzip_ctx(c, k, hp)[0]


def m_sgl_split(c, k, hp):
    """The guide's importance picks ceil(f x k) tokens (optionally by MMR with lambda `lam` over
    the guide's visual-feature cosine); the rest are spread evenly over the image: among the tokens
    not kept yet, every (remaining / rest)-th in index (reading) order."""
    k_i = min(k, max(1, math.ceil(hp["f"] * k)))
    imp = _guide_rel(c, hp)
    if hp.get("lam"):
        first = mmr_greedy(imp, cosine(guide_features(c, hp.get("feat", "vis"))), k_i, hp["lam"])
    else:
        first = topk(imp, k_i).tolist()
    rest = [j for j in range(c["n"]) if j not in set(first)]
    r = k - k_i
    extra = [rest[int(len(rest) * t / r)] for t in range(r)] if r > 0 else []
    return sorted(first + extra)


def m_oracle_objects(c, k, hp):
    """A diagnostic, not a ranking anyone can deploy: the ground-truth object tokens first (every
    token of every object in the image, by the guide's importance if they do not all fit), the rest
    spread evenly over the image (hp spread=True) or by the guide's importance. Asks whether any
    choice of 25 tokens lets this target answer, e.g. lists, when pruned at its input."""
    imp = guide_importance(c)
    on = object_mask(c["objects"], c["n"])
    objs = sorted(torch.nonzero(on).flatten().tolist(), key=lambda j: -float(imp[j]))[:k]
    taken = set(objs)
    rest = [j for j in range(c["n"]) if j not in taken]
    r = k - len(objs)
    if r <= 0:
        return sorted(objs)
    if hp.get("spread"):
        extra = [rest[int(len(rest) * t / r)] for t in range(r)]
    else:
        extra = sorted(rest, key=lambda j: -float(imp[j]))[:r]
    return sorted(objs + extra)


def m_sgl_strata(c, k, hp):
    """ceil(f x k) tokens by the guide's importance; the other r = k - ceil(f k) from r strata:
    the tokens not kept yet, in index (reading) order, cut into r equal consecutive blocks, and from
    each block its most important token (the guide still decides inside each block)."""
    k_i = min(k, max(1, math.ceil(hp["f"] * k)))
    imp = _guide_rel(c, hp)
    first = topk(imp, k_i).tolist()
    taken = set(first)
    rest = [j for j in range(c["n"]) if j not in taken]
    r = k - k_i
    extra = []
    for t in range(r):
        block = rest[len(rest) * t // r : len(rest) * (t + 1) // r]
        extra.append(block[int(torch.argmax(imp[block]))])
    return sorted(first + extra)


def grid_distance2(n: int, side: int = GRID_TOKENS) -> torch.Tensor:
    yx = torch.stack(torch.meshgrid(torch.arange(n // side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).double()
    return ((yx[:, None] - yx[None]) ** 2).sum(-1)


def m_sgl_sdpp(c, k, hp):
    """Conditional DPP whose similarity is spatial: S_ij = exp(-d_ij^2 / (2 sigma^2)) on the token
    grid (d in tokens; sigma fixed, or sigma_scale x sqrt(N / k): a fraction of the spacing of k
    evenly spread tokens, so the spatial repulsion shrinks as the budget grows), times the guide's visual-feature cosine (clamped at 0) if `feat` is given;
    relevance = the guide's importance (CDPruner's min-max + exp(alpha r), theta)."""
    if not any(h in hp for h in ("sigma", "sigma_scale", "theta", "feat")):
        # the shipped rule: the engine's own function and constants (importance "sgl-sdpp")
        from vllm_sgl.kernels import sdpp_keep_ref

        return sdpp_keep_ref(guide_importance(c), k, GRID_TOKENS, c["n"])
    sigma = hp["sigma"] if "sigma" in hp else hp["sigma_scale"] * math.sqrt(c["n"] / k)
    S = torch.exp(-grid_distance2(c["n"]) / (2 * sigma ** 2))
    if hp.get("feat"):
        S = S * cosine(guide_features(c, hp["feat"])).clamp_min(0)
    return dpp_greedy(relevance_kernel(_guide_rel(c, hp), S, hp["theta"]), k)


# name -> (function, default hyperparameters, description). Candidates' hyperparameters are
# replaced by tune's choice (HPARAMS_FILE) when it exists.
METHODS = {
    "random": (m_random, {}, "k tokens uniformly at random (seeded by the example)"),
    "fastv": (m_fastv, {}, "FastV-style: the target's own 2nd-layer attention from the prompt rows after the image"),
    "visionzip": (m_visionzip, {"side": "target"}, "VisionZip dominant tokens: attention received in the target's last vision block"),
    "visionzip-ctx": (m_visionzip_ctx, {}, "VisionZip: 54/64 dominant + 10/64 contextual tokens (merged groups)"),
    "divprune": (m_divprune, {"side": "target"}, "DivPrune: max-min cosine diversity of the target's visual embeddings"),
    "cdpruner-target": (m_cdpruner, {"side": "target", "sign": -1.0, "theta": 0.5}, "CDPruner: target text-embedding relevance x target visual similarity, DPP MAP"),
    "cdpruner-guide": (m_cdpruner, {"side": "guide", "sign": -1.0, "theta": 0.5}, "CDPruner with the guide's text embedding and visual features"),
    "sgl": (m_sgl, {}, "the paper's ranking: guide attention summed over layers, heads, rows after the image + decode rows"),
    "sgl-decode": (m_sgl_rows, {"rows": "decode"}, "guide attention from the decode rows a_1..a_{m-1} only"),
    "sgl-answer": (m_sgl_rows, {"rows": "answer"}, "guide attention from the last prompt row + decode rows"),
    "sgl-rownorm": (m_sgl_rows, {"rows": "all", "rownorm": True}, "each row's visual attention normalised to 1, then summed"),
    "sgl-prior-exact": (m_sgl_prior_exact, {"beta": 1.0}, "importance / the same rows' importance on the blank image (a 2nd guide pass)"),
    "sgl-prior": (m_sgl_prior_static, {"beta": 1.0, "prior": "blank"}, "importance / a static position prior (validation blank images)"),
    "sgl-dpp": (m_sgl_dpp, {"feat": "vis", "theta": 0.5}, "conditional DPP: guide importance as relevance, guide visual-feature cosine kernel"),
    "sgl-mmr": (m_sgl_mmr, {"feat": "vis", "lam": 0.5}, "MMR: importance - lambda x max similarity to the kept set"),
    "sgl-maxmin": (m_sgl_maxmin, {"feat": "vis", "a": 1.0}, "importance^a x max-min distance (DivPrune weighted by the guide)"),
    "sgl-split": (m_sgl_split, {"f": 0.5}, "ceil(f k) by the guide's importance, the rest spread evenly over the image"),
    "sgl-strata": (m_sgl_strata, {"f": 0.5}, "ceil(f k) by the guide's importance, the rest the most important of equal reading-order blocks"),
    "oracle-objects": (m_oracle_objects, {}, "diagnostic: every object token (ground truth), then the guide's importance"),
    "oracle-objects-spread": (m_oracle_objects, {"spread": True},
                              "diagnostic: every object token (ground truth), the rest evenly over the image"),
    "sgl-sdpp": (m_sgl_sdpp, {}, "conditional DPP: guide importance x spatial Gaussian kernel on the token grid; "
                 "as shipped (importance \"sgl-sdpp\": sigma 1.5, theta 0.85, fp32) unless tuned"),
}
HPARAMS_FILE = "hparams.json"


def method_hparams(name: str) -> dict:
    hp = dict(METHODS[name][1])
    f = Ctx.cache / HPARAMS_FILE
    if f.exists():
        hp.update(json.loads(f.read_text()).get(name, {}))
    return hp


def keep_for(name: str, c: dict, k: int, hp: dict | None = None) -> torch.Tensor:
    fn = METHODS[name][0] if name in METHODS else None
    out = fn(c, k, method_hparams(name) if hp is None else hp)
    out = torch.as_tensor(out, dtype=torch.long)
    assert out.numel() == k and out.unique().numel() == k, (name, out.numel(), k)
    return torch.sort(out).values



# ----------------------------------------------------------------------------------------------
# Evaluation: the target's greedy answer with only the kept visual tokens at its input


class Evaluator:
    """The target, and a cache of its replies per (example, keep set[, modified rows])."""

    def __init__(self, args, split: str):
        from vllm_sgl.reference import SGLReference

        self.args = args
        self.ref = load_ref(args.pair_dir)
        self.tok = self.ref.processor.tokenizer
        self.split = split
        self.file = args.cache / split / "replies.json"
        self.replies: dict[str, str] = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.dirty = 0
        self._cur = None
        self._keep_rows = SGLReference._keep_rows

    def _example(self, i: int, c: dict):
        if self._cur is None or self._cur[0] != i:
            e = shapes.make_example(c["seed"])
            assert e.question == c["question"] and e.answer == c["answer"]
            prep = self.ref.prepare([e.image], e.question)
            T = self.ref.target
            self._cur = (i, e, prep, T.input_embeddings(prep), T.positions(prep))
        return self._cur

    @staticmethod
    def key(i: int, keep: torch.Tensor, tag: str = "") -> str:
        h = hashlib.sha1(np.asarray(keep.tolist(), dtype=np.int16).tobytes()).hexdigest()[:16]
        return f"{i}:{tag}{h}"

    @torch.no_grad()
    def reply(self, i: int, c: dict, keep: torch.Tensor, new_rows: dict | None = None, tag: str = "") -> str:
        key = self.key(i, keep, tag)
        if key in self.replies:
            return self.replies[key]
        _, e, prep, emb, pos = self._example(i, c)
        if new_rows:
            emb = emb.clone()
            for j, row in new_rows.items():
                emb[c["start"] + j] = row.to(emb.dtype)
        L = prep.input_ids.numel()
        rows = self._keep_rows(L, prep.visual_spans, [keep])
        ids, _, _ = self.ref.target.greedy(emb, pos, MAX_TOKENS, rows, 0)
        out = self.tok.decode(ids, skip_special_tokens=True)
        self.replies[key] = out
        self.dirty += 1
        if self.dirty >= 200:
            self.save()
        return out

    @torch.no_grad()
    def downscaled(self, i: int, c: dict, k: int) -> str:
        """The target on the image resized (bicubic) to the largest square grid of <= k tokens."""
        side = max(1, math.isqrt(k))
        key = f"{i}:down{side}"
        if key in self.replies:
            return self.replies[key]
        _, e, *_ = self._example(i, c)
        img = e.image.resize((side * 28, side * 28), resample=3)
        prep = self.ref.prepare([img], e.question)
        assert prep.visual_spans[0][1] == side * side, (prep.visual_spans, side)
        T = self.ref.target
        ids, _, _ = T.greedy(T.input_embeddings(prep), T.positions(prep), MAX_TOKENS)
        out = self.tok.decode(ids, skip_special_tokens=True)
        self.replies[key] = out
        self.dirty += 1
        return out

    def save(self) -> None:
        if self.dirty:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.replies))
            tmp.replace(self.file)
            self.dirty = 0


def evaluate(ev: Evaluator, cs: list[dict], name: str, ratios, hp: dict | None = None) -> dict:
    """{ratio: [correct per example]} for one method (hp: override its hyperparameters)."""
    out = {}
    for r in ratios:
        ok = []
        for i, c in enumerate(cs):
            k = keep_count(c["n"], r)
            if name == "downscaled":
                reply = ev.downscaled(i, c, k)
            elif name == "visionzip-ctx":
                keep, new = visionzip_ctx(c, k, {})
                reply = ev.reply(i, c, keep, new, tag="vzc")
            else:
                reply = ev.reply(i, c, keep_for(name, c, k, hp))
            ok.append(shapes.is_correct(reply, c["answer"]))
        out[r] = ok
    ev.save()
    return out


def summarise(cs: list[dict], ok: list[bool]) -> dict:
    res = {"all": sum(ok) / len(ok)}
    for kind in shapes.KINDS:
        sel = [o for o, c in zip(ok, cs) if c["kind"] == kind]
        res[kind] = sum(sel) / len(sel) if sel else float("nan")
    return res


# ----------------------------------------------------------------------------------------------
# Budget: where the kept tokens go


def budget_stats(cs: list[dict], name: str, ratio: float) -> dict:
    """Share of kept tokens on object cells (all, per kind), kept tokens per token row (share of
    the k), and coverage of the objects the answer needs (>= 1 token, all 4 tokens; lists: every
    object with >= 1 token)."""
    rows = torch.zeros(GRID_TOKENS)
    on = defaultdict(lambda: [0, 0])
    cov1 = defaultdict(lambda: [0, 0])
    cov4 = defaultdict(lambda: [0, 0])
    list_all = [0, 0]
    for c in cs:
        k = keep_count(c["n"], ratio)
        keep = visionzip_ctx(c, k, {})[0] if name == "visionzip-ctx" else keep_for(name, c, k)
        m = object_mask(c["objects"])
        kept = set(keep.tolist())
        for j in kept:
            rows[j // GRID_TOKENS] += 1
        for kind in ("all", c["kind"]):
            on[kind][0] += int(m[keep].sum())
            on[kind][1] += k
        for o in asked_objects(c):
            n_in = sum(t in kept for t in cell_tokens(o[0], o[1]))
            for kind in ("all", c["kind"]):
                cov1[kind][0] += n_in >= 1
                cov1[kind][1] += 1
                cov4[kind][0] += n_in == 4
                cov4[kind][1] += 1
        if c["kind"] == "list":
            list_all[0] += all(any(t in kept for t in cell_tokens(o[0], o[1])) for o in c["objects"])
            list_all[1] += 1
    frac = lambda a: a[0] / a[1] if a[1] else float("nan")  # noqa: E731
    res = {"method": name, "ratio": ratio, "on_object": frac(on["all"])}
    for kind in shapes.KINDS:
        res[f"on_object_{kind}"] = frac(on[kind])
    res["object_token_share"] = sum(4 * len(c["objects"]) for c in cs) / sum(c["n"] for c in cs)
    res["asked_covered_1"] = frac(cov1["all"])
    res["asked_covered_4"] = frac(cov4["all"])
    for kind in shapes.KINDS:
        res[f"asked_covered_1_{kind}"] = frac(cov1[kind])
    res["list_every_object"] = frac(list_all)
    for r in range(GRID_TOKENS):
        res[f"row{r}"] = float(rows[r] / rows.sum())
    return res




# ----------------------------------------------------------------------------------------------
# Diagnostic (not a ranking): is the loss the ranking's, or the target's? The target with the same
# kept tokens, but each kept visual key's attention logit raised by log(w_j), w_j = 1 + the pruned
# visual tokens whose nearest kept token (cosine of the target's visual embeddings) is j: ToMe's
# proportional attention, so the kept tokens carry the attention mass of the tokens they stand for.
# It needs a per-key bias in the target's attention (an engine change), so it is only measured here.


@torch.no_grad()
def greedy_key_bias(vlm, embeds, positions, keep_rows, key_bias, max_new_tokens=MAX_TOKENS):
    """ExplicitVLM.greedy pruned at the input (drop_at 0), with key_bias (L,) added to the attention
    logits of every key by its sequence index (decode keys: 0). Same math as ExplicitVLM.forward."""
    from vllm_sgl.reference import LayerCache, layer_qkv

    caches = [LayerCache() for _ in range(vlm.num_layers)]
    L = embeds.shape[0]
    bias_all = torch.cat([key_bias.float(), torch.zeros(max_new_tokens + 1)])

    def fwd(h, pos, seq):
        cos, sin = vlm.lm.rotary_emb(h[None], pos[:, None, :] if vlm.mrope else pos[:1])
        cos, sin = cos[0], sin[0]
        for li, layer in enumerate(vlm.lm.layers):
            attn = layer.self_attn
            n = h.shape[0]
            q, k, v = layer_qkv(layer, h, cos, sin)
            keys, values, key_seq = caches[li].extend(k, v, seq)
            group = q.shape[1] // keys.shape[1]
            visible = key_seq[None, :] <= seq[:, None]
            scores = torch.einsum("qhd,khd->hqk", q.float(), keys.repeat_interleave(group, 1).float())
            scores = scores * attn.scaling + bias_all[key_seq][None, None, :]
            probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
            out = torch.einsum("hqk,khd->qhd", probs, values.repeat_interleave(group, 1).float())
            h = h + attn.o_proj(out.reshape(n, -1).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h)[None])[0]
        return vlm.model.lm_head(vlm.lm.norm(h)).float()

    seq = torch.arange(L)[keep_rows]
    logits = fwd(embeds[keep_rows], positions[:, keep_rows], seq)[-1]
    next_pos, next_seq, tokens = int(positions.max()) + 1, L, []
    while True:
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if tok in vlm.eos_ids or len(tokens) >= max_new_tokens:
            return tokens
        logits = fwd(vlm._embed_token(tok), torch.full((3, 1), next_pos, dtype=torch.long), torch.tensor([next_seq]))[-1]
        next_pos += 1
        next_seq += 1


def proportional_bias(c: dict, keep: torch.Tensor, L: int) -> torch.Tensor:
    F = c["t_vis"].double()
    F = F / F.norm(dim=-1, keepdim=True)
    pruned = torch.ones(c["n"], dtype=torch.bool)
    pruned[keep] = False
    w = torch.ones(len(keep), dtype=torch.float64)
    if bool(pruned.any()):
        nearest = torch.argmax(F[pruned] @ F[keep].T, dim=1)
        w += torch.bincount(nearest, minlength=len(keep)).double()
    bias = torch.zeros(L)
    bias[c["start"] + keep] = torch.log(w).float()
    return bias


def evaluate_proportional(ev: "Evaluator", cs: list[dict], name: str, ratios) -> dict:
    out = {}
    for r in ratios:
        ok = []
        for i, c in enumerate(cs):
            keep = keep_for(name, c, keep_count(c["n"], r))
            key = ev.key(i, keep, "prop")
            if key not in ev.replies:
                _, e, prep, emb, pos = ev._example(i, c)
                rows = ev._keep_rows(prep.input_ids.numel(), prep.visual_spans, [keep])
                ids = greedy_key_bias(ev.ref.target, emb, pos, rows, proportional_bias(c, keep, emb.shape[0]))
                ev.replies[key] = ev.tok.decode(ids, skip_special_tokens=True)
                ev.dirty += 1
            ok.append(shapes.is_correct(ev.replies[key], c["answer"]))
        out[r] = ok
    ev.save()
    return out


# ----------------------------------------------------------------------------------------------
# Tuning on the validation split


def tune_grid() -> list[tuple[str, dict]]:
    """(method, hyperparameters) configurations tune evaluates."""
    grid: list[tuple[str, dict]] = []
    for rows in ("decode", "answer", "prefill"):
        grid.append(("sgl-rows", {"rows": rows}))
    grid.append(("sgl-rows", {"rows": "all", "rownorm": True}))
    grid.append(("sgl-rows", {"rows": "all", "layers": [2]}))
    for beta in (0.5, 1.0, 2.0):
        grid.append(("sgl-prior", {"beta": beta, "prior": "blank"}))
    grid.append(("sgl-prior", {"beta": 1.0, "prior": "mean"}))
    for feat in ("vis", "last"):
        for theta in (0.5, 0.8, 0.95):
            grid.append(("sgl-dpp", {"feat": feat, "theta": theta}))
    for feat in ("vis", "last"):
        for lam in (0.3, 0.6, 0.9):
            grid.append(("sgl-mmr", {"feat": feat, "lam": lam}))
    for a in (0.5, 1.0, 2.0):
        grid.append(("sgl-maxmin", {"feat": "vis", "a": a}))
    for f in (0.3, 0.5, 0.7):
        grid.append(("sgl-split", {"f": f}))
        grid.append(("sgl-split", {"f": f, "lam": 0.6}))
    for f in (0.3, 0.5):
        grid.append(("sgl-strata", {"f": f}))
    for sigma in (1.5, 2.0, 3.0, 4.0, 6.0):
        for theta in (0.8, 0.85, 0.9, 0.93):
            grid.append(("sgl-sdpp", {"sigma": sigma, "theta": theta}))
    grid.append(("sgl-sdpp", {"sigma": 3.0, "theta": 0.9, "feat": "vis"}))
    for scale in (0.35, 0.5, 0.7):
        for theta in (0.8, 0.85, 0.9):
            grid.append(("sgl-sdpp", {"sigma_scale": scale, "theta": theta}))
    for sign in (1.0, -1.0):
        for side in ("target", "guide"):
            grid.append(("cdpruner-" + side, {"side": side, "sign": sign, "theta": 0.5}))
    return grid


def hp_name(method: str, hp: dict) -> str:
    return method + ("[" + ",".join(f"{k}={v}" for k, v in hp.items()) + "]" if hp else "")


def _fn_name(method: str) -> str:
    return {"sgl-rows": "sgl-decode"}.get(method, method)


def cmd_tune(args) -> None:
    torch.set_num_threads(args.threads)
    Ctx.cache = args.cache
    cs = load_captures(args.cache, args.split, args.examples)
    ev = Evaluator(args, args.split)
    f = args.cache / f"tune-{args.split}-{args.examples}.json"
    results = json.loads(f.read_text()) if f.exists() else {}
    grid = tune_grid()
    if args.methods:
        want = set(args.methods.split(","))
        grid = [(m, hp) for m, hp in grid if m in want]
    configs = [(m, {}) for m in ("sgl", "random", "fastv", "divprune", "visionzip", "visionzip-ctx", "downscaled")
               if not args.methods or m in args.methods.split(",")] + grid
    t0 = time.perf_counter()
    for m, hp in configs:
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            log(f"time budget of {args.budget_s} s spent: run tune again to continue")
            break
        name = hp_name(m, hp)
        todo = [r for r in args.ratios if str(r) not in results.get(name, {})]
        if not todo:
            continue
        t = time.perf_counter()
        fn_method = _fn_name(m)
        res = evaluate(ev, cs, fn_method, todo, hp or None)
        for r, ok in res.items():
            results.setdefault(name, {})[str(r)] = summarise(cs, ok)
        f.write_text(json.dumps(results, indent=1))
        log(f"{name}: " + " ".join(f"{r:g}:{results[name][str(r)]['all']:.3f}" for r in args.ratios)
            + f" ({time.perf_counter() - t:.0f} s, total {time.perf_counter() - t0:.0f} s)")
    print_tune(results, args.ratios)


def objective(row: dict, ratios) -> float:
    """Validation objective: mean over the ratios of overall accuracy."""
    return sum(row[str(r)]["all"] for r in ratios) / len(ratios)


def print_tune(results: dict, ratios) -> None:
    ratios = [r for r in ratios]
    print(f"{'config':<58}" + "".join(f"{f'{r:g}':>7}" for r in ratios) + f"{'mean':>7}   list@0.1 exists@0.1")
    rows = [(n, v) for n, v in results.items() if all(str(r) in v for r in ratios)]
    for n, v in sorted(rows, key=lambda x: -objective(x[1], ratios)):
        l01 = v.get("0.1", {})
        print(f"{n:<58}" + "".join(f"{v[str(r)]['all']:>7.3f}" for r in ratios) + f"{objective(v, ratios):>7.3f}"
              + f"   {l01.get('list', float('nan')):.3f}    {l01.get('exists', float('nan')):.3f}")



# ----------------------------------------------------------------------------------------------
# Budget, evaluation on a split, report

BASELINES = ("random", "downscaled", "fastv", "divprune", "cdpruner-target", "cdpruner-guide", "visionzip", "visionzip-ctx")
CANDIDATES = ("sgl-decode", "sgl-answer", "sgl-rownorm", "sgl-prior-exact", "sgl-prior", "sgl-dpp", "sgl-mmr",
              "sgl-maxmin", "sgl-split", "sgl-strata", "sgl-sdpp")
ALL_METHODS = ("sgl",) + CANDIDATES + BASELINES


def _methods(args) -> list[str]:
    return args.methods.split(",") if args.methods else list(ALL_METHODS)


def cmd_budget(args) -> None:
    Ctx.cache = args.cache
    cs = load_captures(args.cache, args.split, args.examples)
    rows = [budget_stats(cs, m, r) for m in _methods(args) if m != "downscaled" for r in args.ratios]
    args.out.mkdir(parents=True, exist_ok=True)
    f = args.out / f"budget-{args.split}.csv"
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    print(f"{'method':<18}{'ratio':>6}{'on obj':>8}{'asked>=1':>9}{'asked=4':>8}{'list all':>9}  kept share by token row 0..15")
    for r in rows:
        print(f"{r['method']:<18}{r['ratio']:>6g}{r['on_object']:>8.3f}{r['asked_covered_1']:>9.3f}{r['asked_covered_4']:>8.3f}"
              f"{r['list_every_object']:>9.3f}  " + " ".join(f"{r[f'row{i}']:.2f}" for i in range(GRID_TOKENS)))
    log(f"wrote {f}")


def cmd_eval(args) -> None:
    torch.set_num_threads(args.threads)
    Ctx.cache = args.cache
    cs = load_captures(args.cache, args.split, args.examples)
    ev = Evaluator(args, args.split)
    f = args.cache / f"eval-{args.split}-{args.examples}.json"
    results = json.loads(f.read_text()) if f.exists() else {}
    results["target"] = {"1.0": [shapes.is_correct(c["target_reply"], c["answer"]) for c in cs]}
    results["guide"] = {"1.0": [shapes.is_correct(c["guide_reply"], c["answer"]) for c in cs]}
    t0 = time.perf_counter()
    for m in _methods(args):
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            log(f"time budget of {args.budget_s} s spent: run eval again to continue")
            break
        t = time.perf_counter()
        if m == "sgl+prop":
            res = evaluate_proportional(ev, cs, "sgl", args.ratios)
        elif m.endswith("+prop"):
            res = evaluate_proportional(ev, cs, m[: -len("+prop")], args.ratios)
        else:
            res = evaluate(ev, cs, m, args.ratios)
        for r, ok in res.items():
            results.setdefault(m, {})[str(r)] = ok
        f.write_text(json.dumps(results))
        log(f"{m}: " + " ".join(f"{r:g}:{sum(ok) / len(ok):.3f}" for r, ok in res.items())
            + f" ({time.perf_counter() - t:.0f} s)")
    log(f"eval {args.split}: {time.perf_counter() - t0:.0f} s")


def cmd_report(args) -> None:
    """CSV (method, ratio, kind, correct, total, accuracy) and markdown tables from eval's results."""
    cs = load_captures(args.cache, args.split, args.examples, fields=())
    results = json.loads((args.cache / f"eval-{args.split}-{args.examples}.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, by_ratio in results.items():
        for r, ok in by_ratio.items():
            for kind in ("all",) + shapes.KINDS:
                sel = [o for o, c in zip(ok, cs) if kind == "all" or c["kind"] == kind]
                rows.append({"method": m, "ratio": float(r), "kind": kind, "correct": sum(sel), "total": len(sel),
                             "accuracy": round(sum(sel) / len(sel), 4)})
    with (args.out / f"accuracy-{args.split}.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    acc = {(r["method"], r["ratio"], r["kind"]): r["accuracy"] for r in rows}
    kinds = ("all",) + shapes.KINDS
    counts = {k: sum(1 for c in cs if k == "all" or c["kind"] == k) for k in kinds}
    md = [f"# Ranking study: accuracy on the shapes {args.split} split ({len(cs)} examples; "
          + ", ".join(f"{k} {counts[k]}" for k in shapes.KINDS) + ")", ""]
    for m in ("target", "guide"):
        if (m, 1.0, "all") in acc:
            md.append(f"- {m}, full image: " + ", ".join(f"{k} {acc[(m, 1.0, k)]:.3f}" for k in kinds))
    md.append("")
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] < 1}, reverse=True)
    methods = [m for m in results if m not in ("target", "guide")]
    for r in ratios:
        k = keep_count(GRID_TOKENS * GRID_TOKENS, r)
        md += [f"## keep {r:g} ({k} of 256 visual tokens)", "",
               "| method | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        for m in methods:
            if (m, r, "all") in acc:
                md.append(f"| {m} | " + " | ".join(f"{acc[(m, r, kd)]:.3f}" for kd in kinds) + " |")
        md.append("")
    md += ["## overall accuracy by ratio", "", "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
           "| --- |" + " --- |" * len(ratios)]
    for m in methods:
        md.append(f"| {m} | " + " | ".join(f"{acc.get((m, r, 'all'), float('nan')):.3f}" for r in ratios) + " |")
    (args.out / f"accuracy-{args.split}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    log(f"wrote {args.out}/accuracy-{args.split}.csv and .md")


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--pair-dir", type=Path, default=ROOT / ".cache/shapes-pair")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache/ranking-study")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    p.add_argument("--methods", default=None, help="comma list (default: every method)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=0, help="tune: stop starting configurations after this many seconds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/figures/ranking-study-2026-12-04")
    args = p.parse_args(argv)
    args.ratios = sorted({float(x) for x in args.ratios.split(",")}, reverse=True)
    COMMANDS[args.command](args)
    return 0


COMMANDS = {"capture": cmd_capture, "tune": cmd_tune, "budget": cmd_budget, "eval": cmd_eval, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
