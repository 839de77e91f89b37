"""The SGL reference (vllm_sgl/reference.py) against the method definition (shared/SGL_METHOD.md).

Everything here runs the PyTorch reference on CPU over the tiny random checkpoint pairs; no vLLM
engine is started. The models are loaded once per session (conftest.py: `reference`).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from vllm_sgl.images import synthetic_image, synthetic_question
from vllm_sgl.reference import (
    FUSES,
    ImportanceObserver,
    Observers,
    SGLReference,
    SGLSettings,
    keep_count,
    keep_set,
)
from vllm_sgl.tiny import LMSize, TinyPairSpec, make_tiny_pair

EPS = 1e-5


def expected_k(n: int, ratio: float) -> int:
    """max(1, floor(r * N)) with r read as the decimal the user wrote (0.29 * 100 = 29 exactly)."""
    return max(1, math.floor(Fraction(str(ratio)) * n))


def q_rows(prep, span, answer_len: int) -> list[int]:
    """Sequence indices of Q for one image: prompt rows strictly after its last visual token, then
    the decode rows a_1..a_{m-1} (fed back at sequence indices L, L+1, ...)."""
    start, n = span
    L = prep.input_ids.numel()
    return list(range(start + n, L)) + [L + i for i in range(answer_len - 1)]


class RowMass:
    """Observer recording, per (layer, head, row), the probability mass each row puts on each
    image's visual keys, plus how many rows after each image every layer saw."""

    def __init__(self, spans):
        self.spans = spans
        self.max_mass = 0.0  # largest mass one (layer, head, row) puts on one image
        self.max_total = 0.0  # ... on all images together
        self.row_count: dict[tuple[int, int], int] = {}  # (layer, image) -> Q rows seen
        self.row_sum: dict[tuple[int, int], torch.Tensor] = {}  # (layer, image) -> rows' row sums
        self.importance64 = [torch.zeros(n, dtype=torch.float64) for _, n in spans]

    def __call__(self, layer, probs, q, row_seq, key_seq, keys) -> None:
        assert probs.shape[1] == row_seq.numel() and probs.shape[2] == key_seq.numel()
        assert bool((probs >= 0).all())
        total = torch.zeros(probs.shape[:2], dtype=torch.float64)
        for i, (start, n) in enumerate(self.spans):
            cols = (key_seq >= start) & (key_seq < start + n)
            mass = probs[:, :, cols].double().sum(-1)  # (H, rows)
            total += mass
            rows = row_seq > start + n - 1
            self.row_count[(layer, i)] = self.row_count.get((layer, i), 0) + int(rows.sum())
            if bool(rows.any()):
                self.max_mass = max(self.max_mass, float(mass[:, rows].max()))
                contrib = probs[:, rows][:, :, cols].double().sum(dim=(0, 1))
                self.importance64[i].index_add_(0, key_seq[cols] - start, contrib)
        # every row's probabilities are normalised over the keys it attends to
        sums = probs.double().sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        self.max_total = max(self.max_total, float(total.max()))


# ----------------------------------------------------------------------------------------------
# SGP at keep ratio 1 is the unpruned target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_ratio_one_is_the_full_image(reference, seed):
    s = SGLSettings(keep_ratio=1.0, max_new_tokens=12)
    r = reference.run([synthetic_image(seed)], synthetic_question(seed), s)
    (n,) = r.num_visual_tokens
    assert r.keep_indices == [list(range(n))]
    assert r.target_prompt_len == r.prompt_len
    assert r.target_pruned_answer_ids == r.target_full_answer_ids
    assert len(r.target_full_answer_ids) >= 1


# ----------------------------------------------------------------------------------------------
# The explicit forward is transformers' forward


def _hf_inputs(prep):
    L = prep.input_ids.numel()
    out = dict(input_ids=prep.input_ids[None], pixel_values=prep.pixel_values,
               attention_mask=torch.ones(1, L, dtype=torch.long))
    if prep.image_grid_thw is not None:  # M-RoPE families (InternVL's tiles need neither)
        out.update(image_grid_thw=prep.image_grid_thw, mm_token_type_ids=prep.mm_token_type_ids[None])
    return out


def check_matches_transformers(ref, seed: int) -> None:
    """Explicit-probability logits and greedy answers equal transformers' own (guide and target),
    and the pruned target equals transformers fed the kept rows at their unpruned M-RoPE positions."""
    from vllm_sgl.reference import LayerCache

    prep = ref.prepare([synthetic_image(seed, size=(196, 140))], synthetic_question(seed))
    L = prep.input_ids.numel()
    for vlm in (ref.guide, ref.target):
        embeds, pos = vlm.input_embeddings(prep), vlm.positions(prep)
        ours = vlm.forward(embeds, pos, torch.arange(L), [LayerCache() for _ in range(vlm.num_layers)])
        with torch.no_grad():
            hf = vlm.model(**_hf_inputs(prep)).logits[0].float()
        # fp32 rounding in a different order (transformers' fused experts): up to 3.4e-4 measured on
        # 1 of 44352 logits of the tiny Qwen3-VL-MoE target; the greedy answers below are exact
        torch.testing.assert_close(ours, hf, rtol=1e-4, atol=5e-4)
        answer, _, _ = vlm.greedy(embeds, pos, 6)
        with torch.no_grad():
            generated = vlm.model.generate(**_hf_inputs(prep), max_new_tokens=6, do_sample=False)[0, L:].tolist()
        assert answer == generated[: len(answer)]
    target = ref.target
    embeds, pos = target.input_embeddings(prep), target.positions(prep)
    (start, n), = prep.visual_spans
    keep = torch.tensor(sorted({0, n // 3, n // 2, n - 1}))
    rows = ref._keep_rows(L, prep.visual_spans, [keep])
    ours = target.forward(embeds, pos, torch.arange(L), [LayerCache() for _ in range(target.num_layers)], 0, rows)
    torch.testing.assert_close(ours, pruned_transformers_logits(target, embeds, pos, rows, prep), rtol=1e-4, atol=2e-4)
    if target.deepstack_levels:
        # Deepstack rows other than the kept ones (the first k visual rows') give other logits, so
        # the comparison above pins the kept rows' own deepstack features.
        first_k = ref._keep_rows(L, prep.visual_spans, [torch.arange(keep.numel())])
        shifted = embeds.clone()
        shifted[rows, target.hidden :] = embeds[first_k, target.hidden :]
        wrong = pruned_transformers_logits(target, shifted, pos, rows, prep)
        assert (wrong - ours).abs().max() > 1e-2


def pruned_transformers_logits(vlm, embeds, pos, rows, prep):
    """transformers' language model fed only the kept rows at their unpruned positions; with
    deepstack (Qwen3-VL), the kept visual rows' deepstack features through its own visual_pos_masks."""
    H, n = vlm.hidden, int(rows.sum())
    kw = {}
    if vlm.deepstack_levels:
        visual = (prep.input_ids == vlm.model.config.image_token_id)[rows]
        deep = embeds[rows][visual, H:].view(-1, vlm.deepstack_levels, H)
        kw = dict(visual_pos_masks=visual[None], deepstack_visual_embeds=list(deep.unbind(1)))
    with torch.no_grad():
        position_ids = pos[:, rows][:, None] if vlm.mrope else pos[0, rows][None]  # 1D RoPE: one row
        out = vlm.model.model.language_model(inputs_embeds=embeds[rows][None, :, :H], position_ids=position_ids,
                                             attention_mask=torch.ones(1, n, dtype=torch.long), **kw)
        return vlm.model.lm_head(out.last_hidden_state)[0].float()


def test_explicit_forward_matches_transformers(reference):
    check_matches_transformers(reference, seed=2)


# ----------------------------------------------------------------------------------------------
# Importance: non-negative, each (layer, head, row) contributes at most 1


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_importance_nonnegative_and_bounded(reference, seed):
    prep = reference.prepare([synthetic_image(seed)], synthetic_question(seed))
    _, _, answer, _, importance = reference.guide_pass(prep, 12)
    (span,) = prep.visual_spans
    (imp,) = importance
    assert imp.dtype == torch.float32 and imp.numel() == span[1]
    assert bool((imp >= 0).all())
    cfg = reference.guide.text_config
    rows = len(q_rows(prep, span, len(answer)))
    bound = cfg.num_hidden_layers * cfg.num_attention_heads * rows
    assert float(imp.double().sum()) <= bound * (1 + EPS)
    assert float(imp.sum()) > 0


def test_row_mass_at_most_one_and_q_rows(reference):
    """Two images: per (layer, head, row) the mass on one image's visual keys (and on all images'
    together) is <= 1; every layer sees exactly |Q| rows per image, where the first image's Q
    includes the second image's tokens; the observer's fp32 sums match an fp64 recomputation."""
    images = [synthetic_image(11, size=(168, 112)), synthetic_image(12, size=(112, 140))]
    prep = reference.prepare(images, "what is in the image")
    guide = reference.guide
    embeds, positions = guide.input_embeddings(prep), guide.positions(prep)
    imp = ImportanceObserver(prep.visual_spans)
    mass = RowMass(prep.visual_spans)
    answer, _, _ = guide.greedy(embeds, positions, 8, observer=Observers(imp, mass))
    assert 0 < mass.max_mass <= 1 + EPS
    assert mass.max_total <= 1 + EPS
    (s0, n0), (s1, n1) = prep.visual_spans
    assert s1 > s0 + n0  # the second image comes after the first
    for i, span in enumerate(prep.visual_spans):
        expected_rows = len(q_rows(prep, span, len(answer)))
        for layer in range(guide.num_layers):
            assert mass.row_count[(layer, i)] == expected_rows
        torch.testing.assert_close(imp.importance[i].double(), mass.importance64[i], rtol=1e-5, atol=1e-6)
    # Q(first image) strictly contains Q(second image): the second image's tokens and the text
    # between the images are rows of the first image's Q.
    q0 = set(q_rows(prep, prep.visual_spans[0], len(answer)))
    q1 = set(q_rows(prep, prep.visual_spans[1], len(answer)))
    assert q1 < q0 and set(range(s1, s1 + n1)) <= q0


# ----------------------------------------------------------------------------------------------
# Keep set


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 64, 100, 160, 1000])
def test_keep_count_formula(n):
    for r in (0.01, 0.05, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0):
        assert keep_count(n, r) == expected_k(n, r), (n, r)


def test_keep_set_ties_go_to_the_lower_index():
    t = torch.tensor
    cases = [
        (t([1.0, 3.0, 3.0, 2.0, 3.0]), 0.4, [1, 2]),  # three tied at the top, k = 2
        (t([1.0, 3.0, 3.0, 2.0, 3.0]), 0.6, [1, 2, 4]),
        (t([1.0, 3.0, 3.0, 2.0, 3.0]), 0.8, [1, 2, 3, 4]),
        (torch.zeros(10), 0.3, [0, 1, 2]),  # all tied
        (t([0.5, 2.0, 0.5, 0.5, 2.0]), 0.6, [0, 1, 4]),  # tie at the k-th place
        (t([0.5, 2.0, 0.5, 0.5, 2.0]), 0.8, [0, 1, 2, 4]),
        (t([0.0, 5.0, 1.0, 5.0]), 0.01, [1]),  # k = 1: the first maximum
        (t([4.0, 1.0, 2.0]), 1.0, [0, 1, 2]),
        (t([1.0, 1.0 + 2**-20, 1.0]), 0.34, [1]),  # a tiny margin is not a tie
    ]
    for imp, ratio, want in cases:
        got = keep_set(imp, ratio)
        assert got.tolist() == want, (imp, ratio, got)
        assert got.dtype == torch.long


@pytest.fixture(scope="module")
def guide_importance(reference):
    prep = reference.prepare([synthetic_image(4)], synthetic_question(4))
    return reference.guide_pass(prep, 8)[4][0]


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.25, 0.29, 0.5, 0.75, 1.0])
def test_keep_set_is_sorted_unique_topk(guide_importance, ratio):
    imp = guide_importance
    n = imp.numel()
    keep = keep_set(imp, ratio).tolist()
    assert keep == sorted(set(keep))
    assert len(keep) == expected_k(n, ratio)
    assert all(0 <= i < n for i in keep)
    dropped = sorted(set(range(n)) - set(keep))
    if dropped:
        worst_kept = min(float(imp[i]) for i in keep)
        best_dropped = max(float(imp[i]) for i in dropped)
        assert worst_kept >= best_dropped
        # on a tie at the boundary the kept one has the lower index
        for d in dropped:
            for k in keep:
                if float(imp[d]) == float(imp[k]):
                    assert k < d


def test_run_is_bit_identical_across_runs(reference):
    images, prompt = [synthetic_image(21)], synthetic_question(21)
    a = reference.run(images, prompt, SGLSettings(keep_ratio=0.25, max_new_tokens=10))
    b = reference.run(images, prompt, SGLSettings(keep_ratio=0.25, max_new_tokens=10))
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())
    (n,) = a.num_visual_tokens
    assert len(a.keep_indices[0]) == expected_k(n, 0.25)
    assert a.keep_indices[0] == keep_set(torch.tensor(a.importance[0]), 0.25).tolist()
    assert a.target_prompt_len == a.prompt_len - n + len(a.keep_indices[0])


# ----------------------------------------------------------------------------------------------
# Hand-checkable cases


@pytest.fixture(scope="module")
def uniform_ref(tmp_path_factory):
    """A pair whose guide has one layer with q_proj and k_proj zeroed (weights and biases): every
    attention logit is 0, so the row at sequence index p gives 1/(p+1) to each of its p+1 keys."""
    spec = TinyPairSpec(
        seed=7,
        guide=LMSize(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128),
        target=LMSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
    )
    guide_dir, target_dir = make_tiny_pair(tmp_path_factory.mktemp("uniform-pair"), spec)
    ref = SGLReference(guide_dir, target_dir)
    assert ref.guide.num_layers == 1
    with torch.no_grad():
        for layer in ref.guide.lm.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return ref


def _uniform_expected(ref, prep, span, answer_len) -> float:
    heads = ref.guide.text_config.num_attention_heads
    layers = ref.guide.num_layers
    return layers * heads * sum(1.0 / (p + 1) for p in q_rows(prep, span, answer_len))


def test_uniform_attention_by_hand(uniform_ref):
    ref = uniform_ref
    prompt = "what is in the image"
    image = synthetic_image(1)
    prep = ref.prepare([image], prompt)
    _, _, answer, _, (imp,) = ref.guide_pass(prep, 8)
    (span,) = prep.visual_spans
    L, (s, n) = prep.input_ids.numel(), span
    # by hand: heads * (sum over prompt rows after the image + decode rows) of 1/(p+1)
    by_hand = 2 * (sum(1.0 / (p + 1) for p in range(s + n, L)) + sum(1.0 / (L + i) for i in range(1, len(answer))))
    assert _uniform_expected(ref, prep, span, len(answer)) == pytest.approx(by_hand, rel=1e-12)
    torch.testing.assert_close(imp.double(), torch.full((n,), by_hand, dtype=torch.float64), rtol=1e-6, atol=0)
    assert bool((imp == imp[0]).all())  # exact ties
    for ratio in (0.1, 0.25, 0.5):
        r = ref.run([image], prompt, SGLSettings(keep_ratio=ratio, max_new_tokens=8))
        assert r.guide_answer_ids == answer
        assert r.keep_indices == [list(range(expected_k(n, ratio)))]  # all tie: the first k


def test_uniform_attention_two_images_by_hand(uniform_ref):
    """Each image's Q is everything after it: the first image's importance counts the second
    image's rows too."""
    ref = uniform_ref
    images = [synthetic_image(2), synthetic_image(3, size=(56, 84))]
    prep = ref.prepare(images, "how many objects are there")
    _, _, answer, _, importance = ref.guide_pass(prep, 8)
    assert len(importance) == 2
    (s0, n0), (s1, n1) = prep.visual_spans
    assert (n0, n1) == tuple(int(g.prod()) // 4 for g in prep.image_grid_thw)
    assert n1 == 6  # 56 x 84 px -> 4 x 6 patches -> 2 x 3 merged tokens
    L, m = prep.input_ids.numel(), len(answer)
    tail = sum(1.0 / (p + 1) for p in range(s1 + n1, L)) + sum(1.0 / (L + i) for i in range(1, m))
    between = sum(1.0 / (p + 1) for p in range(s0 + n0, s1 + n1))  # text between + second image
    for imp, value in zip(importance, (2 * (between + tail), 2 * tail)):
        torch.testing.assert_close(imp.double(), torch.full_like(imp, value, dtype=torch.float64), rtol=1e-6, atol=0)
    r = ref.run(images, "how many objects are there", SGLSettings(keep_ratio=0.5, max_new_tokens=8))
    assert r.keep_indices == [list(range(n0 // 2)), list(range(n1 // 2))]
    assert r.visual_span == [[s0, s0 + n0], [s1, s1 + n1]]


def test_importance_observer_on_hand_written_probs():
    """Known probabilities, known row/key sequence indices: two images, a prefill call, a decode
    call, and a call whose keys skip some sequence indices (as after pruning)."""
    spans = [(2, 3), (6, 2)]  # image 0 at seq 2,3,4; image 1 at seq 6,7
    obs = ImportanceObserver(spans)
    # prefill: rows 0..8 of a 9-token prompt, 2 heads, uniform causal rows p -> 1/(p+1)
    L, H = 9, 2
    probs = torch.zeros(H, L, L)
    for p in range(L):
        probs[:, p, : p + 1] = 1.0 / (p + 1)
    seq = torch.arange(L)
    obs(0, probs, None, seq, seq, None)
    want0 = H * sum(1.0 / (p + 1) for p in range(5, L))  # rows 5..8 (row 4 is the image's own)
    want1 = H * sum(1.0 / (p + 1) for p in range(8, L))  # row 8 only
    torch.testing.assert_close(obs.importance[0], torch.full((3,), want0), rtol=1e-6, atol=0)
    torch.testing.assert_close(obs.importance[1], torch.full((2,), want1), rtol=1e-6, atol=0)
    # a decode row (seq 9) of layer 1 that puts everything on key seq 3 with head 0, and on
    # key seq 7 with head 1
    probs = torch.zeros(H, 1, L + 1)
    probs[0, 0, 3] = 1.0
    probs[1, 0, 7] = 1.0
    obs(1, probs, None, torch.tensor([9]), torch.arange(L + 1), None)
    torch.testing.assert_close(obs.importance[0], torch.tensor([want0, want0 + 1, want0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(obs.importance[1], torch.tensor([want1, want1 + 1]), rtol=1e-6, atol=0)
    # keys with gaps (seq 3 and 6 absent): contributions land on the right visual index
    key_seq = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 10])
    probs = torch.zeros(1, 2, key_seq.numel())
    probs[0, 0, 2] = 0.25  # seq 2 -> image 0 index 0
    probs[0, 0, 3] = 0.5  # seq 4 -> image 0 index 2
    probs[0, 1, 5] = 0.125  # seq 7 -> image 1 index 1
    probs[0, 0, 0] = 0.25
    probs[0, 1, 0] = 0.875
    obs(2, probs, None, torch.tensor([9, 10]), key_seq, None)
    torch.testing.assert_close(
        obs.importance[0], torch.tensor([want0 + 0.25, want0 + 1, want0 + 0.5]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(obs.importance[1], torch.tensor([want1, want1 + 1.125]), rtol=1e-6, atol=0)
    # rows at or before an image's last token never count for it
    before = [imp.clone() for imp in obs.importance]
    probs = torch.ones(1, 1, 5) / 5
    obs(0, probs, None, torch.tensor([4]), torch.arange(5), None)
    for b, a in zip(before, obs.importance):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# rho (dropping the pruned tokens after a fraction of the target's layers)


def test_rho_matches_rho_zero_at_keep_ratio_one(reference):
    images, prompt = [synthetic_image(5)], synthetic_question(5)
    a = reference.run(images, prompt, SGLSettings(keep_ratio=1.0, prune_layer=0.0, max_new_tokens=10))
    b = reference.run(images, prompt, SGLSettings(keep_ratio=1.0, prune_layer=0.5, max_new_tokens=10))
    assert a.target_pruned_answer_ids == b.target_pruned_answer_ids == a.target_full_answer_ids


def test_rho_at_keep_ratio_quarter(reference):
    images, prompt = [synthetic_image(6)], synthetic_question(6)
    s = SGLSettings(keep_ratio=0.25, prune_layer=0.5, max_new_tokens=10)
    r = reference.run(images, prompt, s)
    vocab = reference.target.text_config.vocab_size
    assert 1 <= len(r.target_pruned_answer_ids) <= 10
    assert all(0 <= t < vocab for t in r.target_pruned_answer_ids)
    assert r.keep_indices == reference.run(images, prompt, SGLSettings(keep_ratio=0.25, max_new_tokens=10)).keep_indices

    # The first floor(rho * depth) target layers see every prompt token, the rest only the kept.
    prep = reference.prepare(images, prompt)
    target = reference.target
    keep_rows = reference._keep_rows(prep.input_ids.numel(), prep.visual_spans, [torch.tensor(r.keep_indices[0])])
    drop_at = math.floor(0.5 * target.num_layers)
    assert 0 < drop_at < target.num_layers
    seen: dict[int, list[tuple[int, int]]] = {}

    def record(layer, probs, q, row_seq, key_seq, keys):
        seen.setdefault(layer, []).append((row_seq.numel(), key_seq.numel()))

    embeds, pos = target.input_embeddings(prep), target.positions(prep)
    answer, _, _ = target.greedy(embeds, pos, 10, keep_rows, drop_at, observer=record)
    assert answer == r.target_pruned_answer_ids
    L, kept = prep.input_ids.numel(), int(keep_rows.sum())
    for layer in range(target.num_layers):
        n = L if layer < drop_at else kept
        assert seen[layer][0] == (n, n)  # prefill
        assert [keys for _, keys in seen[layer][1:]] == [n + i for i in range(1, len(answer))]


# ----------------------------------------------------------------------------------------------
# Several images, tiny images


def test_two_images_in_one_prompt(reference):
    images = [synthetic_image(31), synthetic_image(32)]
    r = reference.run(images, "describe the picture in one short sentence", SGLSettings(keep_ratio=0.25, max_new_tokens=8))
    assert len(r.num_visual_tokens) == len(r.visual_span) == len(r.importance) == len(r.keep_indices) == 2
    prep = reference.prepare(images, "describe the picture in one short sentence")
    assert r.visual_span == [[s, s + n] for s, n in prep.visual_spans]
    assert r.visual_span[0][1] < r.visual_span[1][0]
    for n, grid, imp, keep in zip(r.num_visual_tokens, prep.image_grid_thw, r.importance, r.keep_indices):
        assert n == int(grid.prod()) // 4 == len(imp)
        assert len(keep) == expected_k(n, 0.25)
        assert keep == keep_set(torch.tensor(imp), 0.25).tolist()
    assert r.target_prompt_len == r.prompt_len - sum(r.num_visual_tokens) + sum(map(len, r.keep_indices))


def test_smallest_image_keeps_one_token(reference):
    # min_pixels = 4 * 28 * 28: a 56 x 56 image is 4 x 4 patches = 2 x 2 merged tokens
    image = synthetic_image(41, size=(56, 56))
    r = reference.run([image], "what is in the image", SGLSettings(keep_ratio=0.1, max_new_tokens=8))
    assert r.num_visual_tokens == [4]
    assert len(r.keep_indices[0]) == 1
    assert r.keep_indices[0] == [max(range(4), key=lambda i: (r.importance[0][i], -i))]
    # an even smaller image is resized up to the minimum
    r = reference.run([synthetic_image(42, size=(30, 20))], "what is in the image",
                      SGLSettings(keep_ratio=0.1, max_new_tokens=4))
    assert len(r.keep_indices[0]) == 1 and r.num_visual_tokens[0] >= 4


# ----------------------------------------------------------------------------------------------
# SEE


@pytest.mark.parametrize("seed", [0, 7])
def test_see_scores_and_fuses(reference, seed):
    images, prompt = [synthetic_image(seed, size=(168, 140))], synthetic_question(seed)
    results = {
        f: reference.run(images, prompt, SGLSettings(fuse=f, exit_threshold=0.0, max_new_tokens=8)) for f in FUSES
    }
    base = results["mean"]
    conf, cons = base.confidence, base.consistency
    assert 0.0 <= conf <= 1.0 and 0.0 <= cons <= 1.0
    for fuse, r in results.items():
        assert (r.confidence, r.consistency) == (conf, cons)
        want = {"mean": 0.5 * (conf + cons), "product": conf * cons, "confidence": conf, "consistency": cons}[fuse]
        assert r.exit_score == pytest.approx(want, rel=1e-12, abs=0)
        assert r.exit == r.guide_finished  # threshold 0: exit iff the guide finished
    # confidence is the geometric mean of the guide's per-step top-1 probabilities
    prep = reference.prepare(images, prompt)
    _, _, answer, top1, _ = reference.guide_pass(prep, 8)
    assert answer == base.guide_answer_ids
    assert base.guide_finished == (answer[-1] in reference.guide.eos_ids)
    assert conf == pytest.approx(math.prod(top1) ** (1 / len(top1)), rel=1e-9)
    # threshold rule on both sides of the score
    score = base.exit_score
    above = reference.run(images, prompt, SGLSettings(exit_threshold=min(1.0, score + 1e-3), max_new_tokens=8))
    at = reference.run(images, prompt, SGLSettings(exit_threshold=score, max_new_tokens=8))
    assert above.exit is False
    assert at.exit is base.guide_finished


def test_consistency_with_every_token_is_confidence_to_the_m(reference):
    """With consistency_ratio 1 the guide re-reads its full prompt, so each teacher-forced answer
    probability is that step's top-1 probability: consistency = prod(top1) = confidence ** m."""
    images, prompt = [synthetic_image(8)], synthetic_question(8)
    r = reference.run(images, prompt, SGLSettings(consistency_ratio=1.0, max_new_tokens=8))
    m = len(r.guide_answer_ids)
    assert r.consistency == pytest.approx(r.confidence**m, rel=1e-4)
    low = reference.run(images, prompt, SGLSettings(consistency_ratio=0.05, max_new_tokens=8))
    assert 0.0 <= low.consistency <= 1.0
    assert low.confidence == r.confidence


def test_no_exit_when_guide_did_not_finish(reference):
    for seed in range(20):
        images, prompt = [synthetic_image(100 + seed, size=(112, 112))], synthetic_question(seed)
        r = reference.run(images, prompt, SGLSettings(max_new_tokens=1, exit_threshold=0.0))
        assert r.guide_finished == (r.guide_answer_ids[-1] in reference.guide.eos_ids)
        if not r.guide_finished:
            assert len(r.guide_answer_ids) == 1
            assert r.exit is False
            return
    pytest.fail("every 1-token guide answer was end-of-turn")


def test_settings_validation():
    SGLSettings().validate()
    for bad in (
        dict(keep_ratio=0.0),
        dict(keep_ratio=1.5),
        dict(consistency_ratio=-0.1),
        dict(prune_layer=1.0),
        dict(prune_layer=-0.1),
        dict(max_new_tokens=0),
        dict(fuse="max"),
        dict(importance="topk"),
    ):
        with pytest.raises(ValueError):
            SGLSettings(**bad).validate()
    SGLSettings(importance="sgl-sdpp").validate()


# ----------------------------------------------------------------------------------------------
# The Qwen2-VL family


def test_qwen2_vl_pair_runs(tiny_pair_qwen2_vl):
    ref = SGLReference(*tiny_pair_qwen2_vl)
    assert ref.guide.family.name == ref.target.family.name == "qwen2_vl"
    images, prompt = [synthetic_image(9), synthetic_image(10, size=(112, 168))], synthetic_question(9)
    r = ref.run(images, prompt, SGLSettings(keep_ratio=0.25, max_new_tokens=8))
    for n, imp, keep in zip(r.num_visual_tokens, r.importance, r.keep_indices):
        assert len(imp) == n and min(imp) >= 0
        assert keep == keep_set(torch.tensor(imp), 0.25).tolist() and len(keep) == expected_k(n, 0.25)
    assert 0 <= r.confidence <= 1 and 0 <= r.consistency <= 1
    full = ref.run(images, prompt, SGLSettings(keep_ratio=1.0, max_new_tokens=8))
    assert full.target_pruned_answer_ids == full.target_full_answer_ids == r.target_full_answer_ids
    check_matches_transformers(ref, seed=3)


# ----------------------------------------------------------------------------------------------
# Pictures of keep sets (vllm_sgl/visualize.py)


def test_draw_keep_set_cells(tmp_path):
    from vllm_sgl.visualize import draw_keep_set, save_keep_sets

    image = synthetic_image(3, size=(112, 168))  # 8 x 12 patches -> 4 wide x 6 high merged tokens
    grid, merge, cell = (1, 12, 8), 2, 28
    keep = [0, 5, 23]
    pic = draw_keep_set(image, grid, merge, keep, title="t")
    seen = image.resize((112, 168), resample=3)
    assert pic.width >= 112 and pic.height > 168  # the caption band is below the image
    for idx in range(24):
        r, c = divmod(idx, 4)
        box = (c * cell + 2, r * cell + 2, (c + 1) * cell - 2, (r + 1) * cell - 2)  # inside the outline
        got, want = pic.crop(box), seen.crop(box)
        if idx in keep:
            assert list(got.getdata()) == list(want.getdata()), idx
        else:  # darkened: every pixel no brighter than the original's grey level
            assert max(map(max, got.getdata())) < 0.5 * 255 and list(got.getdata()) != list(want.getdata()), idx
    with pytest.raises(ValueError):
        draw_keep_set(image, grid, merge, [24])
    out = tmp_path / "keep.png"
    tiled = save_keep_sets([image, image], [grid, grid], [keep, [1]], out, titles=["a", "b"])
    assert out.exists() and tiled.width > 2 * 112


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_video_positions_are_vllms_and_agree_with_transformers_on_the_test_clips(family, family_pairs):
    """A video's positions in the reference follow vLLM's rule (text after a video continues one past
    its largest position). transformers 5.18 continues at max(h, w) past the video's start; the two
    agree while the clip's time positions stay within its height and width, as the test clips do,
    and the reference's positions equal transformers' there."""
    from engine_utils import VIDEO

    from vllm_sgl.images import synthetic_clip
    from vllm_sgl.reference import SGLReference

    ref = SGLReference(*family_pairs(family))
    model = ref.target.model.model
    for case in VIDEO:
        prep = ref.prepare(case.pil_images(), case.question, case.clips())
        extra = {"second_per_grid_ts": torch.tensor(prep.video_seconds)} if family == "qwen2_5_vl" else {}
        want, _ = model.get_rope_index(prep.input_ids[None], mm_token_type_ids=prep.mm_token_type_ids[None],
                                       image_grid_thw=prep.image_grid_thw, video_grid_thw=prep.video_grid_thw, **extra)
        assert torch.equal(ref.target.positions(prep), want[:, 0]), case
    if family == "qwen3_vl":  # each frame an image of grid (1, h, w) after its timestamp: no time positions
        return
    # A long clip at 2 fps on Qwen2.5-VL: time positions 0, 2, .., 14 outrun 4 x 4 tokens; vLLM's rule
    prep = ref.prepare([], "what", [synthetic_clip(9, 16, (112, 112), 2.0)])
    pos = ref.target.positions(prep)
    start, n = prep.visual_spans[0]
    factor = 2 if family == "qwen2_5_vl" else 1
    assert int(pos[0, start + n]) == int(pos[0, start]) + 7 * factor + 1
