"""The kernel cases shared by test_importance_kernel.py and interp_checker.py (plain data, no
imports of the package, so the checker can run from a bare checkout on a GPU machine).

A case: layers, q_heads, kv_heads, head_dim, dtype, requests (each: keys T_b, rows R_b,
images [[start, len]], rows_at tail|spread), and optional seed, keep_ratio (float or per image),
sm_scale, strided, paged (block size), config (kernel tiling overrides), topk_block.
Keep-only cases (kind="keep") give image_lens and how to fill the importance.
"""
from __future__ import annotations

import random


def _req(keys, rows, images, rows_at="tail"):
    return {"keys": keys, "rows": rows, "images": images, "rows_at": rows_at}


def _case(id, layers, q_heads, kv_heads, head_dim, dtype, requests, **kw):
    return dict(id=id, layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                requests=requests, **kw)


INTERP_CASES = [
    # GQA 1 / 2 / 8 x head_dim 64 / 80 / 128 x fp32 / fp16 / bf16 (a Latin square, not the product).
    _case("g1_d64_fp32", 2, 4, 4, 64, "fp32", [_req(60, 9, [[5, 37]])]),
    _case("g1_d80_bf16", 2, 2, 2, 80, "bf16", [_req(70, 12, [[3, 20], [30, 25]])], seed=1),
    _case("g1_d128_fp16", 1, 2, 2, 128, "fp16", [_req(50, 6, [[10, 30]]), _req(40, 4, [[0, 33]])], seed=2),
    _case("g2_d64_fp16", 2, 4, 2, 64, "fp16",
          [_req(90, 10, [[2, 40], [45, 30]]), _req(30, 5, []), _req(64, 7, [[1, 50]])], seed=3),
    _case("g2_d80_fp32", 2, 4, 2, 80, "fp32", [_req(80, 11, [[4, 60]]), _req(45, 3, [[0, 41]])], seed=4),
    _case("g2_d128_bf16", 1, 4, 2, 128, "bf16", [_req(100, 20, [[7, 70]])], seed=5),
    _case("g8_d64_bf16", 1, 16, 2, 64, "bf16", [_req(75, 8, [[0, 64]]), _req(50, 6, [[5, 40]])], seed=6),
    _case("g8_d80_fp16", 1, 8, 1, 80, "fp16", [_req(66, 5, [[6, 50]])], seed=7),
    _case("g8_d128_fp32", 2, 16, 2, 128, "fp32", [_req(90, 9, [[9, 70]]), _req(35, 2, [[1, 30]])], seed=8),
    # GQA groups that do not divide the tile (Qwen2-VL-2B: 12/2 = 6, Qwen2.5-VL-7B: 28/4 = 7).
    _case("g6_d128_bf16", 1, 12, 2, 128, "bf16", [_req(60, 11, [[2, 40]]), _req(50, 3, [[0, 45]])], seed=23),
    _case("g7_d128_fp16_tile16", 1, 28, 4, 128, "fp16", [_req(55, 5, [[4, 40]], rows_at="spread")], seed=24,
          config={"BLOCK_M": 16}),
    _case("g3_d64_fp32_tile32", 2, 6, 2, 64, "fp32", [_req(40, 13, [[0, 20]]), _req(30, 4, [[3, 9]])], seed=25,
          config={"BLOCK_M": 32, "splits": 2}),
    # 8 requests of different lengths, 0..3 images each, ragged rows.
    _case("batch8_mixed", 1, 4, 2, 64, "fp16", [
        _req(40, 1, [[2, 30]]), _req(120, 30, [[0, 20], [25, 30], [60, 20]]), _req(20, 3, []),
        _req(55, 12, [[10, 1], [20, 25]]), _req(90, 7, [[5, 80]]), _req(33, 2, [[0, 1], [1, 1], [2, 29]]),
        _req(70, 25, [[30, 17]]), _req(18, 4, [[3, 9]])], seed=9, keep_ratio=0.3),
    # Large N, few rows (interpreter time grows with N x rows).
    _case("bigN_2500_bf16", 1, 4, 2, 64, "bf16", [_req(2520, 3, [[10, 2500]])], seed=10, keep_ratio=0.1),
    _case("bigN_2048_two_images", 1, 8, 1, 128, "fp16",
          [_req(2100, 2, [[0, 16], [30, 2048]]), _req(40, 2, [[4, 30]])], seed=11, keep_ratio=0.05),
    # Many rows (prefill text + decode rows), small N.
    _case("rows200", 1, 2, 1, 64, "fp32", [_req(280, 200, [[10, 64]])], seed=12),
    _case("rows_spread_unsorted", 1, 4, 2, 64, "fp32",
          [_req(160, 150, [[5, 40], [70, 30]], rows_at="spread"), _req(50, 20, [[20, 10]], rows_at="spread")],
          seed=13),
    # A request whose rows all sit before its image (image importance = 0), one with no rows.
    _case("rows_before_image_and_empty", 1, 2, 2, 64, "fp32",
          [_req(60, 0, [[10, 20]]), _req(60, 10, [[0, 10], [50, 10]]), _req(30, 3, [[0, 5]])], seed=14),
    _case("all_rows_before_image", 1, 2, 2, 64, "fp32", [_req(60, 5, [[50, 10]], rows_at="spread")],
          seed=21),
    # N = 1 images and keep_ratio 1.0; per-image ratio tensor.
    _case("n1_keep_all", 1, 2, 1, 64, "bf16", [_req(12, 4, [[2, 1], [4, 1]]), _req(8, 2, [[0, 1]])],
          seed=15, keep_ratio=1.0),
    _case("per_image_ratio", 1, 4, 2, 64, "fp32", [_req(80, 6, [[0, 30], [31, 40]]), _req(40, 3, [[2, 33]])],
          seed=16, keep_ratio=[0.1, 0.5, 1.0]),
    # Small odd blocks + phase-2 split into partials (the reduction kernel), strided views, sm_scale.
    _case("small_blocks_splits", 3, 4, 2, 80, "fp16", [_req(70, 9, [[3, 50]]), _req(45, 13, [[1, 17]])],
          seed=17, config={"BLOCK_N1": 16, "BLOCK_N2": 16, "BLOCK_M": 32, "splits": 4}),
    _case("strided_views", 2, 4, 2, 64, "fp32", [_req(50, 5, [[3, 40]])], seed=18, strided=True,
          sm_scale=0.07),
    _case("no_images", 1, 2, 1, 64, "fp32", [_req(30, 5, []), _req(10, 2, [])], seed=19),
    # Keep-set kernel alone: big N, ties (few levels), +-0.0, negatives, block smaller than N.
    dict(id="keep_bigN_ties", kind="keep", image_lens=[20000, 1, 3000], levels=7, keep_ratio=0.3, seed=30),
    dict(id="keep_all_equal", kind="keep", image_lens=[1000, 17], levels=1, keep_ratio=0.25, seed=31),
    dict(id="keep_signed_zero_negative", kind="keep", image_lens=[300, 64], signed_zeros=True, negative=True,
         keep_ratio=[0.5, 0.9], seed=32, topk_block=64),
    dict(id="keep_random_small_block", kind="keep", image_lens=[513, 2, 2049], keep_ratio=0.11, seed=33,
         topk_block=32),
    # Explicit k per image (the engine passes the target's placeholder counts).
    dict(id="keep_counts", kind="keep", image_lens=[700, 5, 64], keep_counts=[70, 5, 1], levels=9, seed=34,
         topk_block=64),
    # The spatial keep rule ("sgl-sdpp", windows of 16 x 16 tokens): a Qwen-like 40 x 23 grid (edge
    # windows 8 wide, 7 high) between a top-k image and InternVL-like tiles (plane 256, width 16);
    # equal importance (ties across lanes; k = N); windows kept whole (k_w = |w|) beside windows
    # that keep nothing (k_w = 0); a budget past the kernel's rank (the spent gains' fallback to
    # quality order); the caller's scratch (NaN-filled, its start not 16-byte aligned).
    dict(id="sdpp_mixed_planes", kind="keep", image_lens=[920, 300, 768], keep_counts=[46, 30, 40], seed=35,
         rules=["sgl-sdpp", "sgl", "sgl-sdpp"], layouts=[[40, 920], [20, 300], [16, 256]]),
    dict(id="sdpp_ties", kind="keep", image_lens=[920, 64, 12], levels=1, keep_counts=[60, 10, 12], seed=36,
         rules=["sgl-sdpp"] * 3, layouts=[[40, 920], [8, 64], [4, 12]]),
    dict(id="sdpp_full_and_empty_windows", kind="keep", image_lens=[768, 560], keep_counts=[270, 20], seed=38,
         boost=[[0, 0, 256, 100.0], [1, 0, 40, 100.0]], rules=["sgl-sdpp"] * 2, layouts=[[16, 256], [20, 560]]),
    dict(id="sdpp_spent_rank", kind="keep", image_lens=[36, 600], keep_counts=[30, 3], seed=37, sdpp_eps=2.0,
         rules=["sgl-sdpp", "sgl-sdpp"], layouts=[[6, 36], [24, 600]]),
    dict(id="sdpp_scratch", kind="keep", image_lens=[768, 64, 920], keep_counts=[40, 64, 46], seed=39, scratch=True,
         rules=["sgl-sdpp", "sgl", "sgl-sdpp"], layouts=[[16, 256], [8, 64], [23, 920]]),
    # Paged keys (shuffled blocks, NaN in spare blocks and block tails): dense-equivalent results.
    _case("paged_bs16_g2_bf16", 2, 4, 2, 80, "bf16",
          [_req(70, 9, [[3, 50]]), _req(45, 13, [[1, 17], [20, 10]]), _req(20, 2, [])], seed=40, paged=16),
    _case("paged_bs5_g8_fp32_splits", 2, 16, 2, 64, "fp32",
          [_req(61, 7, [[0, 33]], rows_at="spread"), _req(33, 4, [[2, 1], [4, 20]])], seed=41, paged=5,
          config={"splits": 3, "BLOCK_N1": 16, "BLOCK_N2": 32}),
    _case("paged_bs32_g1_fp16", 1, 2, 2, 128, "fp16", [_req(300, 5, [[10, 257]])], seed=42, paged=32),
    # The largest guide image size, one row (interpreter time grows with N x rows).
    _case("bigN_16384", 1, 2, 1, 128, "bf16", [_req(16400, 1, [[8, 16384]])], seed=20, keep_ratio=0.25),
    _case("bigN_4096_rows16", 1, 4, 2, 64, "fp16", [_req(4120, 16, [[4, 4096]])], seed=22, keep_ratio=0.5),
]


def _generated_cases():
    """Every GQA ratio x head_dim x dtype, each with a random batch: 1-4 requests, 0-3 images each,
    1-40 rows, tail or spread rows, 1-2 layers."""
    rng = random.Random(1234)
    cases = []
    for group, hkv in ((1, 2), (2, 2), (8, 1)):
        for d in (64, 80, 128):
            for dt in ("fp32", "fp16", "bf16"):
                reqs = []
                for b in range(rng.randint(1, 4)):
                    n_img = rng.randint(1 if b == 0 else 0, 3)
                    pos, images = rng.randint(0, 5), []
                    for _ in range(n_img):
                        n = rng.choice([1, 2, 7, 16, 33, 64, 100, 129])
                        images.append([pos, n])
                        pos += n + rng.randint(0, 6)
                    rows = rng.randint(1, 40)
                    keys = pos + rows + rng.randint(0, 10)
                    reqs.append(_req(keys, rows, images, rng.choice(["tail", "tail", "spread"])))
                cases.append(_case(f"gen_g{group}_d{d}_{dt}", rng.randint(1, 2), group * hkv, hkv, d, dt, reqs,
                                   seed=rng.randint(0, 10**6), keep_ratio=rng.choice([0.05, 0.2, 0.5, 1.0])))
    return cases


INTERP_CASES += _generated_cases()
