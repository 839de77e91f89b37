"""Runs the Triton importance kernels under Triton's CPU interpreter (or compiled, on a GPU) and
checks them against the PyTorch definition. A script, not a test module: test_importance_kernel.py
runs it in a subprocess so TRITON_INTERPRET=1 never reaches the pytest process (vLLM engine tests
share that process).

    python tests/kernels/interp_checker.py CASES.json RESULTS.json            # interpreter, CPU
    python tests/kernels/interp_checker.py CASES.json RESULTS.json --device cuda  # compiled, GPU

Without CASES.json (`-`), the cases of test_importance_kernel.py are used.

CASES.json: a list of case dicts (see test_importance_kernel.py). RESULTS.json: {case id: result}
with result = {"ok": bool, "msg": str, "seconds": float, ...}. One failing case never stops the
others; its traceback goes into its msg.
"""
from __future__ import annotations

import os
import sys

DEVICE = "cuda" if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cuda" else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
else:
    os.environ.pop("TRITON_INTERPRET", None)

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's vllm_sgl (a bare GPU machine too)
from vllm_sgl.kernels import (  # noqa: E402
    importance_and_keep_set,
    keep_set_ref,
    visual_importance_paged,
    visual_importance_paged_ref,
    visual_importance_ref,
)
from vllm_sgl.kernels._args import SDPP_EPS, sdpp_scratch_elems  # noqa: E402
from vllm_sgl.kernels.importance_ref import sdpp_windows  # noqa: E402
from vllm_sgl.kernels.importance_triton import (  # noqa: E402
    is_interpreter,
    keep_set_triton,
    visual_importance_paged_triton,
    visual_importance_triton,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_inputs(case: dict):
    """Deterministic inputs for one case. Each request: {"keys": T_b, "rows": R_b,
    "images": [[start, len], ...], "rows_at": "tail" | "spread"}. "tail" rows are the last R_b
    positions (text after the images + decode rows, the engine's layout); "spread" rows are random
    positions, unsorted, some before images (they must contribute nothing to those images)."""
    g = torch.Generator().manual_seed(case.get("seed", 0))
    L, Hq, Hkv, D = case["layers"], case["q_heads"], case["kv_heads"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    cu_rows, cu_keys, row_pos = [0], [0], []
    image_req, image_start, image_len = [], [], []
    for b, r in enumerate(case["requests"]):
        T, R = r["keys"], r["rows"]
        if r.get("rows_at", "tail") == "tail":
            row_pos += list(range(T - R, T))
        else:
            row_pos += torch.randint(0, T, (R,), generator=g).tolist()
        for start, n in r["images"]:
            image_req.append(b)
            image_start.append(start)
            image_len.append(n)
        cu_rows.append(cu_rows[-1] + R)
        cu_keys.append(cu_keys[-1] + T)
    R, T = cu_rows[-1], cu_keys[-1]
    # Scaled-up queries give peaky attention, so most k-th / (k+1)-th gaps are far above fp32 noise.
    q = torch.randn(L, R, Hq, D, generator=g) * case.get("q_scale", 2.0)
    k = torch.randn(L, T, Hkv, D, generator=g)
    q, k = q.to(device=DEVICE, dtype=dtype), k.to(device=DEVICE, dtype=dtype)
    if case.get("strided"):  # non-compact strides: a view into wider buffers
        qw = torch.zeros(L, R, Hq, D + 16, dtype=dtype, device=DEVICE)
        qw[..., 3:3 + D] = q
        kw = torch.zeros(L, T, Hkv + 1, D, dtype=dtype, device=DEVICE)
        kw[:, :, 1:] = k
        q, k = qw[..., 3:3 + D], kw[:, :, 1:]
    args = (q, k, torch.tensor(cu_rows), torch.tensor(row_pos), torch.tensor(cu_keys),
            torch.tensor(image_req, dtype=torch.long), torch.tensor(image_start, dtype=torch.long),
            torch.tensor(image_len, dtype=torch.long))
    return args


def to_paged(keys, cu_keys, block_size, seed):
    """A paged copy of dense keys: blocks in shuffled order, spare blocks and block tails NaN (a read
    of anything outside a request's keys poisons the result)."""
    g = torch.Generator().manual_seed(seed + 7)
    L, _, Hkv, D = keys.shape
    lens = (cu_keys[1:] - cu_keys[:-1]).tolist()
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    cache = torch.full((L, num_blocks, block_size, Hkv, D), float("nan"), dtype=keys.dtype, device=keys.device)
    table = torch.full((len(lens), max(need + [1]) + 1), -1, dtype=torch.int32)  # -1: unused entries
    nxt = 0
    for b, n in enumerate(lens):
        for j in range(need[b]):
            blk = perm[nxt]
            nxt += 1
            table[b, j] = blk
            t0 = j * block_size
            m = min(block_size, n - t0)
            cache[:, blk, :m] = keys[:, cu_keys[b] + t0:cu_keys[b] + t0 + m]
    return cache, table, torch.tensor(lens)


def q_mass(args) -> torch.Tensor:
    """Per visual token, L * Hq * |Q(image)|: the most importance it could have (scale for tolerances)."""
    q, _, cu_rows, row_pos, _, image_req, image_start, image_len = args
    L, _, Hq, _ = q.shape
    out = []
    for b, s, n in zip(image_req.tolist(), image_start.tolist(), image_len.tolist()):
        rows = row_pos[cu_rows[b]:cu_rows[b + 1]]
        out.append(torch.full((n,), float(L * Hq * int((rows > s + n - 1).sum()))))
    return torch.cat(out) if out else torch.zeros(0)


def compare_keep(ref_imp, tol, cu_image, ratio, got_idx, got_cu, ref_idx, ref_cu):
    """Keep sets must be equal wherever the k-th / (k+1)-th gap of the definition's importance
    exceeds the tolerance; inside the noise band, the kept values must still be a valid top-k."""
    if got_cu.tolist() != ref_cu.tolist():
        return f"cu_keep {got_cu.tolist()} != {ref_cu.tolist()}"
    for i in range(len(cu_image) - 1):
        v = ref_imp[cu_image[i]:cu_image[i + 1]]
        t = tol[cu_image[i]:cu_image[i + 1]]
        a = got_idx[ref_cu[i]:ref_cu[i + 1]]
        b = ref_idx[ref_cu[i]:ref_cu[i + 1]]
        kk = b.numel()
        if a.min() < 0 or a.max() >= v.numel() or not bool((a[1:] > a[:-1]).all()):
            return f"image {i}: keep set not ascending/in range: {a.tolist()[:20]}"
        if torch.equal(a, b):
            continue
        sv = torch.sort(v, descending=True).values
        gap = (sv[kk - 1] - sv[kk]).item() if kk < v.numel() else math.inf
        if gap > 2 * t.max().item():
            return f"image {i}: keep set differs with gap {gap:.3g} > tol {2 * t.max().item():.3g}"
        if not torch.allclose(torch.sort(v[a]).values, torch.sort(v[b]).values, rtol=0, atol=2 * t.max().item()):
            return f"image {i}: kept values differ beyond tolerance"
    return ""


def run_case(case: dict) -> dict:
    kind = case.get("kind", "importance")
    if kind == "keep":
        return run_keep_case(case)
    args = build_inputs(case)
    q, k = args[0], args[1]
    sm_scale = case.get("sm_scale")
    # The definition in fp32 from the same (low-precision) inputs, upcast.
    ref = visual_importance_ref(q.float(), k.float(), *args[2:], sm_scale=sm_scale)
    out = torch.full_like(ref, float("nan"))  # poison: an unwritten element fails
    cfg = dict(case.get("config", {}), poison=True)
    res = {"n_visual": ref.numel()}
    if case.get("paged"):
        cache, table, lens = to_paged(k, args[4], case["paged"], case.get("seed", 0))
        paged_args = (q, cache, table, lens, args[2], args[3], *args[5:])
        pref = visual_importance_paged_ref(q.float(), cache.float(), *paged_args[2:], sm_scale=sm_scale)
        if not torch.equal(pref, ref):
            return dict(res, ok=False, msg="visual_importance_paged_ref differs from the dense definition")
        got = visual_importance_paged_triton(*paged_args, sm_scale=sm_scale, out=out, _config=cfg)
        if not torch.equal(visual_importance_paged(*paged_args, sm_scale=sm_scale, backend="triton").isnan(),
                           torch.zeros_like(ref, dtype=torch.bool)):
            return dict(res, ok=False, msg="dispatcher (paged, backend='triton') gave NaN")
    else:
        got = visual_importance_triton(*args, sm_scale=sm_scale, out=out, _config=cfg)
    if got.data_ptr() != out.data_ptr():
        return dict(res, ok=False, msg="out buffer not used")
    if ref.numel() == 0:
        return dict(res, ok=True, msg="")
    if not torch.isfinite(got).all():
        bad = torch.nonzero(~torch.isfinite(got))[:10].flatten().tolist()
        return dict(res, ok=False, msg=f"non-finite importance at {bad}")
    mass = q_mass(args).to(ref.device)
    # fp32 accumulation noise, scaled by the value and by how many probabilities were summed.
    tol = 2e-5 * ref.abs() + 5e-7 * mass + 1e-7
    err = (got - ref).abs()
    res.update(max_abs_err=err.max().item(), max_ref=ref.max().item(),
               worst_err_over_tol=(err / tol).max().item())
    if (err > tol).any():
        j = int((err / tol).argmax())
        return dict(res, ok=False, msg=f"importance[{j}] = {got[j].item()!r}, definition {ref[j].item()!r}, "
                                       f"tol {tol[j].item():.3g}")

    cu_image = [0] + torch.cumsum(args[7], 0).tolist()
    ratio = case.get("keep_ratio", 0.25)
    if isinstance(ratio, list):
        ratio = torch.tensor(ratio)
    ref_idx, ref_cu = keep_set_ref(ref, cu_image, ratio)
    # Same input to both selections: must be exactly equal, ties included.
    idx, cu, msg = guarded_keep(ref, cu_image, ratio, ref_idx, case.get("topk_block"))
    if msg:
        return dict(res, ok=False, msg=msg)
    if not (torch.equal(idx, ref_idx) and torch.equal(cu, ref_cu)):
        return dict(res, ok=False, msg="keep_set_triton on the definition's importance differs from keep_set_ref")
    # End to end through the dispatcher: kernel importance -> kernel keep set.
    imp2, idx2, cu2 = importance_and_keep_set(*args, keep_ratio=ratio, sm_scale=sm_scale, backend="triton")
    # Bit-equal unless the case forced a non-default tiling (another fp32 summation order).
    same = torch.equal(imp2, got) if not case.get("config") else bool(((imp2 - ref).abs() <= tol).all())
    if not same:
        return dict(res, ok=False, msg="dispatcher (backend='triton') importance differs from the direct call")
    msg = compare_keep(ref, tol, cu_image, ratio, idx2, cu2, ref_idx, ref_cu)
    res["keep_exact"] = bool(torch.equal(idx2, ref_idx))
    return dict(res, ok=not msg, msg=msg)


def run_keep_case(case: dict) -> dict:
    g = torch.Generator().manual_seed(case.get("seed", 0))
    lens = case["image_lens"]
    vals = []
    for n in lens:
        levels = case.get("levels")  # few distinct values: many ties
        if levels:
            v = torch.randint(0, levels, (n,), generator=g).float() * 0.5
        else:
            v = torch.rand(n, generator=g) * 10
        vals.append(v)
    for i, lo, hi, amount in case.get("boost", []):  # a region all in the top-k
        vals[i][lo:hi] += amount
    imp = torch.cat(vals).to(DEVICE)
    if case.get("signed_zeros"):
        imp[::3] = -0.0
        imp[1::3] = 0.0
    if case.get("negative"):
        imp = imp - 5.0
    cu_image = [0] + torch.cumsum(torch.tensor(lens), 0).tolist()
    ratio, counts = case.get("keep_ratio"), case.get("keep_counts")
    if isinstance(ratio, list):
        ratio = torch.tensor(ratio)
    rules, layouts = case.get("rules"), case.get("layouts")
    eps = case.get("sdpp_eps", SDPP_EPS)
    ref_idx, ref_cu = keep_set_ref(imp, cu_image, ratio, counts=counts, rules=rules, layouts=layouts, _sdpp_eps=eps)
    scratch = None
    if case.get("scratch"):
        sdpp = [i for i, r in enumerate(rules) if r == "sgl-sdpp"]
        need = sdpp_scratch_elems([lens[i] for i in sdpp], [int(ref_cu[i + 1] - ref_cu[i]) for i in sdpp])
        scratch = torch.full((need + 1,), float("nan"), device=DEVICE)[1:]  # starts 4 bytes past a 16-byte boundary
        with_scratch = keep_set_ref(imp, cu_image, ratio, counts=counts, rules=rules, layouts=layouts,
                                    scratch=scratch.clone(), _sdpp_eps=eps)[0]
        if not torch.equal(with_scratch, ref_idx):
            return {"ok": False, "msg": "keep_set_ref with the caller's scratch differs"}
    idx, cu, msg = guarded_keep(imp, cu_image, ratio, ref_idx, case.get("topk_block"), counts, rules, layouts, eps,
                                scratch)
    if msg:
        return {"ok": False, "msg": msg}
    if scratch is not None and bool(scratch.isnan().all()):
        return {"ok": False, "msg": "keep_set_triton did not use the caller's scratch"}
    ok = torch.equal(idx, ref_idx) and torch.equal(cu, ref_cu)
    msg = "" if ok else (f"keep sets differ: first mismatch at flat index "
                         f"{int(torch.nonzero(idx != ref_idx)[0]) if idx.shape == ref_idx.shape else 'shape'}")
    if ok:  # each image alone too: a write past an image's k slots would land in the guard
        rs = ratio if not isinstance(ratio, torch.Tensor) else ratio.tolist()
        for i in range(len(lens)):
            r_i = rs[i] if isinstance(rs, list) else rs
            c_i = None if counts is None else [counts[i]]
            r_i = None if counts is not None else r_i
            sub = imp[cu_image[i]:cu_image[i + 1]]
            rule_i = None if rules is None else [rules[i]]
            lay_i = None if layouts is None else [layouts[i]]
            alone = keep_set_ref(sub, [0, lens[i]], r_i, counts=c_i, rules=rule_i, layouts=lay_i, _sdpp_eps=eps)[0]
            if not torch.equal(alone, ref_idx[int(ref_cu[i]):int(ref_cu[i + 1])]):
                return {"ok": False, "msg": f"image {i}: keep_set_ref alone differs from in the batch"}
            _, _, msg = guarded_keep(sub, [0, lens[i]], r_i, alone, case.get("topk_block"), c_i, rule_i, lay_i, eps)
            if msg:
                return {"ok": False, "msg": f"image {i} alone: {msg}"}
    return dict(keep_coverage(imp, cu_image, ref_cu, rules, layouts, eps, ref_idx), ok=ok, msg=msg, n=int(sum(lens)))


def keep_coverage(imp, cu_image, ref_cu, rules, layouts, eps, ref_idx) -> dict:
    """What an "sgl-sdpp" case reached: windows, windows kept whole and windows keeping nothing, and
    whether its eps changed the keep sets (the spent gains' fallback ran)."""
    sdpp = [i for i, r in enumerate(rules or []) if r == "sgl-sdpp"]
    if not sdpp:
        return {}
    n = [cu_image[i + 1] - cu_image[i] for i in sdpp]
    wins, kw = sdpp_windows(torch.cat([imp[cu_image[i]:cu_image[i + 1]] for i in sdpp]), [0, *np.cumsum(n)],
                            [int(ref_cu[i + 1] - ref_cu[i]) for i in sdpp], [layouts[i] for i in sdpp])
    size = torch.as_tensor(wins[:, 4] * wins[:, 5])
    kw = kw.cpu()
    default = keep_set_ref(imp, cu_image, counts=(ref_cu[1:] - ref_cu[:-1]).tolist(), rules=rules, layouts=layouts)[0]
    return {"windows": len(wins), "full_windows": int((kw == size).sum()), "empty_windows": int((kw == 0).sum()),
            "eps_changes": eps != SDPP_EPS and not torch.equal(default, ref_idx)}


def guarded_keep(imp, cu_image, ratio, ref_idx, block, counts=None, rules=None, layouts=None, sdpp_eps=SDPP_EPS,
                 scratch=None):
    """keep_set_triton into a -1-poisoned buffer followed by a guard region that must stay -1."""
    buf = torch.full((ref_idx.numel() + 64,), -1, dtype=torch.int64, device=imp.device)
    idx, cu = keep_set_triton(imp, cu_image, ratio, counts=counts, rules=rules, layouts=layouts,
                              out=buf[:ref_idx.numel()], scratch=scratch, _block=block, _sdpp_eps=sdpp_eps)
    if not bool((buf[ref_idx.numel():] == -1).all()):
        return idx, cu, "keep_set_triton wrote past the end of its output"
    if bool((idx < 0).any()):
        return idx, cu, "keep_set_triton left output entries unwritten"
    return idx, cu, ""


def main() -> int:
    if sys.argv[1] == "-":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_cases import INTERP_CASES as cases
    else:
        cases = json.load(open(sys.argv[1]))
    results = {"_env": {"triton": triton.__version__, "torch": torch.__version__,
                        "interpreter": is_interpreter(), "device": DEVICE,
                        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None}}
    if DEVICE == "cpu":
        torch.set_num_threads(1)  # the machine is shared; numpy/torch threads fight the other worker
    else:  # the definition must not use TF32 either
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for case in cases:
        t0 = time.time()
        try:
            r = run_case(case)
        except Exception:  # noqa: BLE001  (report per case, keep going)
            r = {"ok": False, "msg": traceback.format_exc()}
        r["seconds"] = round(time.time() - t0, 2)
        results[case["id"]] = r
        print(f"{case['id']}: {'ok' if r['ok'] else 'FAIL'} {r['seconds']}s {r['msg'][:200]}", flush=True)
    json.dump(results, open(sys.argv[2], "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
