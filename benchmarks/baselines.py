"""The field's visual-token pruning baselines on the shapes pair, as their papers define them, beside
SGL's own keep sets at the same token counts; what each reads from the models; the target's answer
with only the kept tokens. PyTorch reference only (vllm_sgl.reference, fp32, batch 1); the engine
never imports this. benchmarks/quality.py runs it; ranking_study.py reads its captures.

Methods (`METHODS`, `keep(name, capture, k, hp)`), each with the layer the target drops the other
visual tokens at (0: its input, where SGL prunes, so they never enter the KV):
- `random`: k tokens uniformly at random (seeded by the example), at the input.
- `fastv` (Chen et al. 2024): the attention the *last* prompt token pays each visual token in the
  target's layer K-1, mean over heads; the target runs layers 0..K-1 on every token and drops the
  rest from layer K on. Searched: K, and the rows (last prompt row, as FastV's code; or every row
  after the image).
- `fastv+sdpp`: FastV's scores (its chosen K and rows) spread by the spatial DPP of `sgl-sdpp` (the
  windowed definition of docs/importance.md; sigma and theta searched, the same candidates as
  `sgl-sdpp`'s), at FastV's layer: what the spatial rule adds to the best baseline's own ranking, so
  the table shows what the guide adds on its own.
- `divprune` (Alvar et al. 2025): greedy max-min cosine diversity of the target's visual
  embeddings (its vision tower's merged output), at the input. No hyperparameters.
- `cdpruner` (Zhang et al. 2025): conditional DPP, kernel r_i S_ij r_j with S the cosine of the
  target's visual embeddings and r = exp(alpha x relevance), the relevance the mean cosine of each
  visual token with the question's token embeddings (this pair has no text encoder; the target's own
  input embeddings are the nearest thing). Searched: the sign of the relevance (CDPruner negates it
  for CLIP's space) and theta.
- `visionzip` (Yang et al. 2025): dominant tokens by the attention they receive in the target's last
  vision block, plus contextual tokens: the rest grouped by key similarity around evenly spaced
  centres and merged (mean) into them, at the input. Searched: the dominant share (paper: 54/64).
- `sgl` / `sgl-sdpp`: the method's keep sets from the guide's importance (vllm_sgl.pruning), at the
  input, as the engine computes them (the engine's rows come from vLLM itself; these are the
  reference's cross-checks). `sgl-sdpp` searched: sigma, theta (the shipped rule's constants are one
  of the candidates; the engine runs the shipped ones).
- `sgl@K`: the guide's keep set dropped at FastV's chosen layer K instead of the input: the guide's
  ranking against the target's own at the same place (not servable: the pruned tokens enter the KV).
- `guide-1-layer`: the guide's last layer only (the paper's finding (i) vs (ii)), at the input.

Every method with hyperparameters gets the same search budget (`SEARCH`, SEARCH_BUDGET configurations
each), chosen on the validation split of the pair being tested (quality.py --search).

Captures and replies are cached under .cache/baselines/<pair id>/, the pair id a hash of both
checkpoints' weights, so a different pair can never read another's.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_sgl.pruning import top_k_keep  # noqa: E402
from vllm_sgl.tasks import shapes  # noqa: E402

GRID_TOKENS = shapes.IMAGE_SIZE // 28  # 16 merged tokens per side
MAX_TOKENS = 32
CACHE = ROOT / ".cache" / "baselines"


# ----------------------------------------------------------------------------------------------
# The pair's identity


def pair_id(guide_dir: Path, target_dir: Path) -> str:
    """A hash of both checkpoints' weight files: caches keyed by it belong to one pair only."""
    h = hashlib.sha256()
    for d in (guide_dir, target_dir):
        for f in sorted(Path(d).glob("*.safetensors")):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Capture: everything the rankings read, one guide pass and one target pass per example


class PerLayerRows:
    """Observer: per layer, the attention rows strictly after the image pay each visual key, summed
    over heads and rows ('all', the method's rows), and the last such row's mean over heads ('last':
    FastV's score; in prefill that is the last prompt token)."""

    def __init__(self, start: int, n: int, num_layers: int):
        self.start, self.n = start, n
        self.all = torch.zeros(num_layers, n)
        self.last = torch.zeros(num_layers, n)
        self.seen: set[int] = set()

    def __call__(self, layer, probs, q, row_seq, key_seq, keys) -> None:
        rows = row_seq > self.start + self.n - 1
        if not bool(rows.any()):
            return
        cols = (key_seq >= self.start) & (key_seq < self.start + self.n)
        p = probs[:, rows][:, :, cols].float().cpu()  # (heads, rows, N)
        self.all[layer] += p.sum(dim=(0, 1))
        if layer not in self.seen:  # the prefill call: its last row is the last prompt token
            self.last[layer] = p[:, -1].mean(0)
            self.seen.add(layer)


class VisionLastBlock:
    """Pre-hook on the vision tower's last block's attention (full attention in Qwen2.5-VL): the
    attention each merged token receives (mean over heads, summed over query patches and over its
    2 x 2 patches) and its keys (no RoPE, mean over its patches), in the merged output's order."""

    def __init__(self, vlm):
        self.visual = vlm.model.model.visual
        self.received = self.keys = None
        self.handle = self.visual.blocks[-1].attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        h = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        assert kwargs["cu_seqlens"].numel() == 2, "one image, one full-attention sequence"
        S = h.shape[0]
        qkv = module.qkv(h).reshape(S, 3, module.num_heads, -1)
        q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q.float(), k.float()) * module.scaling, dim=-1)
        unit = self.visual.spatial_merge_size ** 2
        self.received = probs.mean(0).sum(0).view(S // unit, unit).sum(1)
        self.keys = qkv[:, 1].reshape(S, -1).float().view(S // unit, unit, -1).mean(1)

    def result(self, grid_thw: torch.Tensor):
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.visual.spatial_merge_size, window_size=self.visual.window_size,
            patch_size=self.visual.patch_size)
        rev = torch.argsort(window_index)  # the blocks run in window order; the merged output is row-major
        self.handle.remove()
        return self.received[rev].detach().cpu(), self.keys[rev].detach().cpu()


@torch.no_grad()
def capture_example(ref, e: shapes.Example) -> dict:
    from vllm_sgl.reference import ImportanceObserver, LayerCache, Observers

    tok = ref.processor.tokenizer
    prep = ref.prepare([e.image], e.question)
    (start, n), = prep.visual_spans
    L = prep.input_ids.numel()
    G, T = ref.guide, ref.target

    # the guide: its greedy answer; the method's importance, per layer
    g_rows, imp = PerLayerRows(start, n, G.num_layers), ImportanceObserver(prep.visual_spans)
    answer, _, _ = G.greedy(G.input_embeddings(prep), G.positions(prep), MAX_TOKENS, observer=Observers(g_rows, imp))
    assert torch.allclose(g_rows.all.sum(0), imp.importance[0], rtol=1e-4, atol=1e-5)

    # the target: visual embeddings, last vision block, per-layer prompt attention, full-image answer
    vis = VisionLastBlock(T)
    t_embeds = T.input_embeddings(prep)
    t_recv, t_keys = vis.result(prep.image_grid_thw)
    t_pos = T.positions(prep)
    t_rows = PerLayerRows(start, n, T.num_layers)
    T.forward(t_embeds, t_pos, torch.arange(L), [LayerCache() for _ in range(T.num_layers)], observer=t_rows)
    full, _, _ = T.greedy(t_embeds, t_pos, MAX_TOKENS)

    q_ids = torch.tensor(tok(e.question)["input_ids"])
    return {
        "seed": e.seed, "kind": e.kind, "question": e.question, "answer": e.answer,
        "objects": [(o.row, o.col, o.color, o.shape) for o in e.objects],
        "start": start, "n": n, "L": L,
        "g_importance": imp.importance[0],  # exactly as SGLReference sums it
        "g_layers": g_rows.all,             # (guide layers, N)
        "t_all": t_rows.all, "t_last": t_rows.last,  # (target layers, N), prefill rows after the image
        "t_vis": t_embeds[start : start + n].float().clone(),
        "t_recv": t_recv, "t_keys": t_keys,
        "t_text": T.lm.embed_tokens(q_ids).float(),
        "guide_reply": tok.decode(answer, skip_special_tokens=True),
        "target_reply": tok.decode(full, skip_special_tokens=True),
    }


# ----------------------------------------------------------------------------------------------
# Selection rules


def cosine(F: torch.Tensor) -> torch.Tensor:
    F = F.double()
    F = F / F.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return F @ F.T


def dpp_greedy(K: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of a DPP with kernel K (incremental Cholesky, as CDPruner's conditional_dpp_map):
    each step takes the largest remaining gain d_j^2 (first index on ties). Once every remaining gain
    is <= 1e-10 (the kernel's rank is spent) the rest go by the diagonal (relevance) order."""
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
    return sel


def maxmin_greedy(D: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min diversity on distances D (N x N): first the token whose nearest
    other token is farthest, then repeatedly the one farthest from the kept set. Ties: first index."""
    N = D.shape[0]
    first = int(torch.argmax(torch.topk(D, 2, dim=0, largest=False).values[1]))
    sel, dmin = [first], D[first].clone()
    taken = torch.zeros(N, dtype=torch.bool)
    taken[first] = True
    while len(sel) < k:
        j = int(torch.argmax(dmin.masked_fill(taken, -float("inf"))))
        sel.append(j)
        taken[j] = True
        dmin = torch.minimum(dmin, D[j])
    return sel


def relevance_kernel(rel: torch.Tensor, S: torch.Tensor, theta: float) -> torch.Tensor:
    """CDPruner's conditional kernel r_i S_ij r_j, r = exp(alpha x rel), rel min-max scaled to [0, 1],
    alpha = theta / (2 (1 - theta))."""
    rel = rel.double()
    rel = torch.exp(theta / (2 * (1 - theta)) * (rel - rel.min()) / (rel.max() - rel.min() + 1e-6))
    return rel[:, None] * S * rel[None, :]


def text_relevance(vis: torch.Tensor, text: torch.Tensor, sign: float) -> torch.Tensor:
    v = vis.double() / vis.double().norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    return sign * (v @ t.T).mean(-1)


def spread(score: torch.Tensor, k: int, hp: dict) -> torch.Tensor:
    """The spatial keep rule `sgl-sdpp` (windowed DPP on the token grid) over any score."""
    from vllm_sgl.kernels import sdpp_keep_ref

    return sdpp_keep_ref(score, k, GRID_TOKENS, score.numel(), sigma=hp["sigma"], theta=hp["theta"])


def visionzip_ctx(c: dict, k: int, dominant: float) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """VisionZip: k_d = round(dominant x k) tokens by attention received in the target's last vision
    block; of the rest, k_c = k - k_d evenly spaced centres, every other remaining token merged
    (mean of the target's visual embeddings) into the centre whose keys it is most similar to.
    Returns (kept indices, {index: its new embedding})."""
    k_d = min(k, max(1, round(k * dominant)))
    k_c = k - k_d
    dom = top_k_keep(c["t_recv"], k_d)
    if k_c <= 0:
        return dom, {}
    taken = set(dom.tolist())
    rest = torch.tensor([j for j in range(c["n"]) if j not in taken])
    centres = rest[:: max(1, len(rest) // k_c)][:k_c]
    others = torch.tensor(sorted(set(rest.tolist()) - set(centres.tolist())), dtype=torch.long)
    keys = c["t_keys"].double()
    keys = keys / keys.norm(dim=-1, keepdim=True)
    assign = torch.argmax(keys[others] @ keys[centres].T, dim=1) if len(others) else torch.zeros(0, dtype=torch.long)
    new = {int(ci): c["t_vis"][[int(ci)] + others[assign == i].tolist()].mean(0) for i, ci in enumerate(centres)}
    return torch.sort(torch.cat([dom, centres])).values, new


def _fastv_score(c: dict, hp: dict) -> torch.Tensor:
    return c["t_last" if hp["rows"] == "last" else "t_all"][hp["K"] - 1]


class Keep:
    """A keep set: indices (ascending), the target layer the others are dropped at, and replaced
    embeddings (VisionZip's merged contextual tokens)."""

    def __init__(self, indices, drop_at: int = 0, new_rows: dict | None = None):
        self.indices = torch.sort(torch.as_tensor(indices, dtype=torch.long)).values
        self.drop_at = drop_at
        self.new_rows = new_rows or {}


def _visionzip(c, k, hp):
    kept, merged = visionzip_ctx(c, k, hp["dominant"])
    return kept, 0, merged


def _sdpp_hp(hp):
    return {"sigma": hp["sigma"], "theta": hp["theta"]}


# name -> (keep(capture, k, hp) -> Keep, default hyperparameters)
METHODS = {
    "random": (lambda c, k, hp: Keep(top_k_keep(torch.rand(c["n"], generator=torch.Generator().manual_seed(c["seed"])), k)), {}),
    "fastv": (lambda c, k, hp: Keep(top_k_keep(_fastv_score(c, hp), k), hp["K"]), {"K": 2, "rows": "last"}),
    "fastv+sdpp": (lambda c, k, hp: Keep(spread(_fastv_score(c, hp), k, _sdpp_hp(hp)), hp["K"]),
                   {"K": 2, "rows": "last", "sigma": 1.5, "theta": 0.85}),
    "divprune": (lambda c, k, hp: Keep(maxmin_greedy(1 - cosine(c["t_vis"]), k)), {}),
    "cdpruner": (lambda c, k, hp: Keep(dpp_greedy(relevance_kernel(text_relevance(c["t_vis"], c["t_text"], hp["sign"]),
                                                                   cosine(c["t_vis"]), hp["theta"]), k)),
                 {"sign": -1.0, "theta": 0.5}),
    "visionzip": (lambda c, k, hp: Keep(*_visionzip(c, k, hp)), {"dominant": 54 / 64}),
    "sgl": (lambda c, k, hp: Keep(top_k_keep(c["g_importance"], k)), {}),
    "sgl-sdpp": (lambda c, k, hp: Keep(spread(c["g_importance"], k, hp)), {"sigma": 1.5, "theta": 0.85}),
    "sgl@K": (lambda c, k, hp: Keep(top_k_keep(c["g_importance"], k), hp["K"]), {"K": 2}),
    "guide-1-layer": (lambda c, k, hp: Keep(top_k_keep(c["g_layers"][-1], k)), {}),
}

# The same search budget for every method that has hyperparameters: SEARCH_BUDGET configurations,
# the defaults (the papers' or the shipped values) first, so they win ties.
SEARCH_BUDGET = 6
# (sigma, theta) of the spatial rule, the shipped constants first: the same candidates wherever it runs
SDPP_CANDIDATES = [{"sigma": s, "theta": t} for s, t in
                   ((1.5, 0.85), (1.0, 0.7), (1.0, 0.85), (2.5, 0.85), (2.5, 0.95), (1.5, 0.7))]
SEARCH = {
    "fastv": [{"K": K, "rows": r} for K in (2, 1, 3) for r in ("last", "all")],
    "fastv+sdpp": SDPP_CANDIDATES,
    "cdpruner": [{"sign": s, "theta": t} for s in (-1.0, 1.0) for t in (0.5, 0.3, 0.8)],
    "visionzip": [{"dominant": d} for d in (54 / 64, 0.5, 0.7, 0.95, 1.0, 0.3)],
    "sgl-sdpp": SDPP_CANDIDATES,
}
# A method that spreads another's scores searches its own constants on top of that method's choice.
BUILDS_ON = {"fastv+sdpp": "fastv"}
assert all(len(v) == SEARCH_BUDGET and v[0].items() <= METHODS[m][1].items() for m, v in SEARCH.items())


def keep(name: str, c: dict, k: int, hp: dict | None = None) -> Keep:
    fn, default = METHODS[name]
    out = fn(c, k, {**default, **(hp or {})})
    assert out.indices.numel() == k and out.indices.unique().numel() == k, (name, out.indices.numel(), k)
    return out


# ----------------------------------------------------------------------------------------------
# The target's answer with only the kept tokens


class Runner:
    """The pair's reference, its captures and the target's replies per (split, example, keep set),
    both cached under CACHE/<pair id>/."""

    def __init__(self, guide_dir: Path, target_dir: Path, threads: int = 1):
        from vllm_sgl.reference import SGLReference

        torch.set_num_threads(threads)
        self.ref = SGLReference(guide_dir, target_dir)
        self.tok = self.ref.processor.tokenizer
        self.pair = pair_id(guide_dir, target_dir)
        self.dir = CACHE / self.pair
        self.dir.mkdir(parents=True, exist_ok=True)
        self.replies_file = self.dir / "replies.json"
        self.replies: dict[str, str] = json.loads(self.replies_file.read_text()) if self.replies_file.exists() else {}
        self.dirty = 0
        self._cur = None

    def capture(self, split: str, i: int, e: shapes.Example) -> dict:
        f = self.dir / split / f"{i:05d}.pt"
        if f.exists():
            c = torch.load(f, weights_only=False)
            if c["seed"] == e.seed:
                return c
        f.parent.mkdir(parents=True, exist_ok=True)
        c = capture_example(self.ref, e)
        torch.save(c, f)
        return c

    def _inputs(self, c: dict):
        if self._cur is None or self._cur[0] != c["seed"]:
            e = shapes.make_example(c["seed"])
            prep = self.ref.prepare([e.image], e.question)
            T = self.ref.target
            self._cur = (c["seed"], prep, T.input_embeddings(prep), T.positions(prep))
        return self._cur[1:]

    @torch.no_grad()
    def reply(self, c: dict, kp: Keep) -> str:
        tag = ",".join(f"{j}" for j in sorted(kp.new_rows))  # merged rows: a different input
        key = f"{c['seed']}:{kp.drop_at}:{hashlib.sha1(bytes(str(kp.indices.tolist()) + tag, 'ascii')).hexdigest()[:16]}"
        if key not in self.replies:
            from vllm_sgl.reference import SGLReference

            prep, emb, pos = self._inputs(c)
            if kp.new_rows:
                emb = emb.clone()
                for j, row in kp.new_rows.items():
                    emb[c["start"] + j] = row.to(emb.dtype)
            rows = SGLReference._keep_rows(prep.input_ids.numel(), prep.visual_spans, [kp.indices])
            ids, _, _ = self.ref.target.greedy(emb, pos, MAX_TOKENS, rows, kp.drop_at)
            self.replies[key] = self.tok.decode(ids, skip_special_tokens=True)
            self.dirty += 1
            if self.dirty >= 500:
                self.save()
        return self.replies[key]

    def save(self) -> None:
        if self.dirty:
            tmp = self.replies_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.replies))
            tmp.replace(self.replies_file)
            self.dirty = 0


def target_flops_keep(n: int, k: int, K: int, layers: int) -> int:
    """FastV at equal target compute: the kept tokens after layer K that make its visual-token
    layer-work equal the input pruning's, K x n + (layers - K) x k' = layers x k (0: not possible)."""
    return max(0, math.floor((layers * k - K * n) / (layers - K)))

