"""Tests of the SGL importance definition, the fused Triton kernel and the dispatcher.

The Triton kernel runs under Triton's CPU interpreter in ONE subprocess (interp_checker.py) with
TRITON_INTERPRET=1 in its environment only: vLLM engine tests in the same pytest session must
never see that variable. Each interpreter case is still its own pytest test, so a failure names
its case and carries the checker's message.
"""
from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

sys.path.insert(0, str(REPO))  # this checkout's vllm_sgl, installed or not (a bare GPU machine)
import vllm_sgl.kernels as K  # noqa: E402
gather_paged_keys, importance_and_keep_set, keep_set, keep_set_ref = (
    K.gather_paged_keys, K.importance_and_keep_set, K.keep_set, K.keep_set_ref)
visual_importance, visual_importance_paged, visual_importance_paged_ref, visual_importance_ref = (
    K.visual_importance, K.visual_importance_paged, K.visual_importance_paged_ref, K.visual_importance_ref)
CHECKER = HERE / "interp_checker.py"
AOT = HERE / "aot_compile_check.py"
BENCH = REPO / "benchmarks" / "bench_importance.py"
# The interpreter was validated with this triton (3.9.0's interpreter gave wrong results here).
INTERP_TRITON = "3.8.0"


def _triton_version():
    # Without importing triton into the pytest process.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _load_cases():
    # By path, so it works under any pytest import mode and from the checker script alike.
    spec = importlib.util.spec_from_file_location("sgl_kernel_cases", HERE / "kernel_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.INTERP_CASES


INTERP_CASES = _load_cases()


def _run_checker(tmp_path_factory, device: str) -> dict:
    tmp = tmp_path_factory.mktemp(f"checker_{device}")
    cases_json, results_json = tmp / "cases.json", tmp / "results.json"
    cases_json.write_text(json.dumps(INTERP_CASES))
    proc = subprocess.run([sys.executable, str(CHECKER), str(cases_json), str(results_json), "--device", device],
                          env=_env(interpret=device == "cpu"), cwd=str(REPO), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not results_json.exists():
        pytest.fail(f"kernel checker ({device}) crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return json.loads(results_json.read_text())


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    version = _triton_version()
    if version is None:
        pytest.skip("triton is not installed")
    if version != INTERP_TRITON:
        pytest.skip(f"the interpreter cases are validated with triton {INTERP_TRITON} only, found {version}")
    return _run_checker(tmp_path_factory, "cpu")


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory):
    if not torch.cuda.is_available() or _triton_version() is None:
        pytest.skip("needs CUDA and triton (compiled kernel cases)")
    return _run_checker(tmp_path_factory, "cuda")


def test_interpreter_environment(interp_results):
    env = interp_results["_env"]
    assert env["interpreter"], "kernels were not built for the interpreter"
    assert env["triton"] == INTERP_TRITON, env


@pytest.mark.parametrize("case_id", [c["id"] for c in INTERP_CASES])
def test_kernel_case(interp_results, case_id):
    r = interp_results.get(case_id)
    assert r is not None, f"checker produced no result for {case_id}"
    assert r["ok"], f"{case_id}: {r['msg']}"


@pytest.mark.parametrize("case_id", [c["id"] for c in INTERP_CASES])
def test_kernel_case_cuda(cuda_results, case_id):
    r = cuda_results.get(case_id)
    assert r is not None, f"checker produced no result for {case_id}"
    assert r["ok"], f"{case_id} (compiled, {cuda_results['_env']['gpu']}): {r['msg']}"


def test_sdpp_cases_reach_their_windows(interp_results):
    """The "sgl-sdpp" interpreter cases reach what they are there for."""
    r = interp_results
    assert r["sdpp_mixed_planes"]["windows"] == 6 + 3  # 40 x 23: 3 x 2 windows; 3 tiles of 16 x 16
    assert r["sdpp_full_and_empty_windows"]["full_windows"] >= 1
    assert r["sdpp_full_and_empty_windows"]["empty_windows"] >= 1
    assert r["sdpp_ties"]["full_windows"] >= 1 and r["sdpp_ties"]["empty_windows"] >= 1
    assert r["sdpp_spent_rank"]["eps_changes"]


def test_gpu_kernels_compile_for_sm90(tmp_path):
    # Ahead-of-time compile with Triton's bundled ptxas: no GPU needed.
    if _triton_version() is None:
        pytest.skip("triton is not installed")
    env = _env(interpret=False)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # a real compile, not a cache hit
    proc = subprocess.run([sys.executable, str(AOT), "--arch", "90"], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The definition itself (in process, pure PyTorch: no triton import).
# --------------------------------------------------------------------------------------------
def _naive_importance(q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len, sm_scale=None):
    """Brute force, scalar loops, float64: a literal reading of SGL_METHOD.md."""
    L, R, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    out = []
    for b, start, n in zip(image_req, image_start, image_len):
        imp = [0.0] * n
        kb = cu_keys[b]
        for r in range(cu_rows[b], cu_rows[b + 1]):
            p = row_pos[r]
            if not p > start + n - 1:
                continue
            for layer in range(L):
                for h in range(Hq):
                    logits = [float(q[layer, r, h].double() @ k[layer, kb + t, h // G].double()) * scale
                              for t in range(p + 1)]
                    m = max(logits)
                    z = sum(math.exp(x - m) for x in logits)
                    for j in range(n):
                        imp[j] += math.exp(logits[start + j] - m) / z
        out += imp
    return torch.tensor(out, dtype=torch.float64)


def _tiny(seed=0, Hq=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    cu_rows, cu_keys = [0, 4, 7], [0, 14, 24]
    row_pos = [10, 3, 13, 11, 9, 6, 8]  # request 0 unsorted, rows 3 and 10 before image 1's end
    image_req, image_start, image_len = [0, 0, 1], [1, 6, 2], [3, 5, 4]
    q = torch.randn(2, 7, Hq, D, generator=g) * 2
    k = torch.randn(2, 24, Hkv, D, generator=g)
    return q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
def test_definition_matches_brute_force(hq, hkv):
    args = _tiny(seed=hq * 10 + hkv, Hq=hq, Hkv=hkv)
    ref = visual_importance_ref(*args)
    assert ref.dtype == torch.float32 and ref.shape == (12,)
    torch.testing.assert_close(ref.double(), _naive_importance(*args), rtol=1e-5, atol=1e-6)
    ref2 = visual_importance_ref(*args, sm_scale=0.3)
    torch.testing.assert_close(ref2.double(), _naive_importance(*args, sm_scale=0.3), rtol=1e-5, atol=1e-6)


def test_definition_rows_before_image_contribute_nothing():
    q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len = _tiny()
    base = visual_importance_ref(q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len)
    # Rows 1 (pos 3) and 4.. change; row 1 is before image 0's end (pos 3 = last token of image 0)
    # and image 1: perturbing it must not change request 0's importance.
    q2 = q.clone()
    q2[:, 1] = torch.randn_like(q2[:, 1]) * 5
    after = visual_importance_ref(q2, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len)
    torch.testing.assert_close(after, base, rtol=0, atol=0)
    # An image with no row after it has importance exactly 0.
    imp = visual_importance_ref(q, k, cu_rows, [1, 2, 3, 0, 1, 2, 3], cu_keys, image_req, image_start, image_len)
    assert torch.count_nonzero(imp[:8]) == 0 and torch.count_nonzero(imp[8:]) == 0


def test_definition_probabilities_are_real_softmax():
    # One row, one head, 1-token image at position 0 and keys that make the softmax uniform: the row
    # at position p gives exactly 1/(p+1) per layer and head.
    L, Hq, D = 3, 2, 4
    q = torch.zeros(L, 1, Hq, D)
    k = torch.randn(L, 6, 1, D)
    imp = visual_importance_ref(q, k, [0, 1], [4], [0, 6], [0], [0], [1])
    torch.testing.assert_close(imp, torch.tensor([L * Hq / 5.0]))


def test_keep_set_ref_edges():
    imp = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 7.0])
    cu = [0, 1, 7]  # image 0: N = 1; image 1: N = 6
    idx, cu_keep = keep_set_ref(imp, cu, 0.5)
    assert cu_keep.tolist() == [0, 1, 4]
    assert idx.tolist() == [0, 0, 1, 5]  # image 1 values [3,3,2,3,0.5,7]: 7 then ties 3,3 at lower index
    idx, cu_keep = keep_set_ref(imp, cu, 1.0)
    assert idx.tolist() == [0, 0, 1, 2, 3, 4, 5] and cu_keep.tolist() == [0, 1, 7]
    idx, cu_keep = keep_set_ref(imp, cu, 1e-6)  # k = max(1, floor(...)) = 1
    assert idx.tolist() == [0, 5]
    idx, cu_keep = keep_set_ref(imp, cu, torch.tensor([1.0, 0.34]))  # floor(0.34 * 6) = 2: 7, first 3
    assert idx.tolist() == [0, 0, 5] and cu_keep.tolist() == [0, 1, 3]
    idx, cu_keep = keep_set_ref(torch.ones(5), [0, 5], 0.4)  # all tied: lowest indices
    assert idx.tolist() == [0, 1]
    idx, cu_keep = keep_set_ref(torch.arange(100.0), [0, 100], 0.29)  # 0.29 * 100 = 28.999...: k = 29
    assert cu_keep.tolist() == [0, 29] and idx.tolist() == list(range(71, 100))
    idx, cu_keep = keep_set_ref(torch.zeros(0), [0], 0.5)  # no images
    assert idx.numel() == 0 and cu_keep.tolist() == [0]


def test_keep_set_with_counts():
    imp = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 7.0])
    cu = [0, 1, 7]
    idx, cu_keep = keep_set_ref(imp, cu, counts=[1, 3])
    assert idx.tolist() == [0, 0, 1, 5] and cu_keep.tolist() == [0, 1, 4]  # = keep ratio 0.5 above
    idx, cu_keep = keep_set(imp, cu, counts=torch.tensor([1, 6]))
    assert idx.tolist() == [0, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"counts\[1\] = 7 is outside \[1, N = 6\]"):
        keep_set(imp, cu, counts=[1, 7])
    with pytest.raises(ValueError, match="exactly one of keep_ratio and counts"):
        keep_set(imp, cu, 0.5, counts=[1, 3])
    with pytest.raises(ValueError, match="exactly one of keep_ratio and counts"):
        keep_set_ref(imp, cu)


def _greedy_log_det(L: torch.Tensor, k: int) -> list[int]:
    """The DPP's greedy MAP by brute force: each step adds the token that maximises log det L[S]."""
    sel: list[int] = []
    for _ in range(k):
        best = max((j for j in range(L.shape[0]) if j not in sel),
                   key=lambda j: (float(torch.linalg.slogdet(L[sel + [j]][:, sel + [j]]).logabsdet), -j))
        sel.append(best)
    return sorted(sel)


@pytest.mark.parametrize("width, plane", [(6, 36), (6, 18), (20, 60)])  # one window; two planes; two windows
def test_sdpp_definition_is_the_greedy_dpp_map(width, plane):
    """sdpp_keep_ref (incremental Cholesky, fp32) = in each window, the greedy log-det MAP of
    L = q S q (float64) with the window's budget k_w (its share of the top-k)."""
    n = 36 if plane < 60 else 60
    v = torch.rand(n, generator=torch.Generator().manual_seed(5)) * 3
    q = K.importance_ref.sdpp_quality(v).double()
    t = torch.arange(n)
    y, x, p = (t % plane) // width, t % width, t // plane
    window = p * 100 + y // 16 * 10 + x // 16
    d2 = ((y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2).double()
    S = torch.exp(-d2 / (2 * K.importance_ref.SDPP_SIGMA ** 2)) * (window[:, None] == window[None])
    L = q[:, None] * S * q[None]
    for k in (1, 4, 9):
        top = K.importance_ref.top_k_ref(v, k)
        want = []
        for w in torch.unique(window).tolist():
            m = torch.nonzero(window == w).flatten()
            sel = _greedy_log_det(L[m][:, m], int(torch.isin(top, m).sum()))
            want += m[sel].tolist()
        assert K.sdpp_keep_ref(v, k, width, plane).tolist() == sorted(want)
    # The first pick is the most important token, as in the paper's rule.
    assert K.sdpp_keep_ref(v, 1, width, plane).tolist() == [int(v.argmax())]


def test_sdpp_spreads_where_top_k_piles_up():
    """Equal importance over an 8 x 8 grid: top-k takes the first row's start, the spatial rule
    the lowest index first (ties) and then tokens far apart."""
    imp, cu, lay = torch.ones(64), [0, 64], [(8, 64)]
    assert keep_set(imp, cu, counts=[4])[0].tolist() == [0, 1, 2, 3]
    spread = keep_set(imp, cu, counts=[4], rules=["sgl-sdpp"], layouts=lay)[0]
    assert 0 in spread.tolist()
    yx = torch.stack([spread // 8, spread % 8], 1).float()
    assert torch.cdist(yx, yx).masked_fill(torch.eye(4, dtype=torch.bool), 99).min() >= 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(rules=["topk"]), "unknown keep rule 'topk'; accepted: sgl, sgl-sdpp"),
    (dict(rules=["sgl", "sgl"]), r"rules must have one entry per image \(1\)"),
    (dict(rules=["sgl-sdpp"]), r'rule "sgl-sdpp" needs layouts'),
    (dict(rules=["sgl-sdpp"], layouts=[(5, 12)]), r"layouts\[0\] = \(5, 12\) does not tile an image of 12 tokens"),
    (dict(rules=["sgl-sdpp"], layouts=[(4, 8)]), r"layouts\[0\] = \(4, 8\) does not tile"),
])
def test_bad_keep_rules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_set(torch.rand(12), [0, 12], counts=[3], **kwargs)


def test_dispatcher_cpu_uses_definition():
    args = _tiny()
    ref = visual_importance_ref(*args)
    assert torch.equal(visual_importance(*args), ref)
    assert torch.equal(visual_importance(*args, backend="torch"), ref)
    imp, idx, cu_keep = importance_and_keep_set(*args, keep_ratio=0.5)
    assert torch.equal(imp, ref)
    ridx, rcu = keep_set_ref(ref, [0, 3, 8, 12], 0.5)
    assert torch.equal(idx, ridx) and torch.equal(cu_keep, rcu)
    i2, c2 = keep_set(ref, [0, 3, 8, 12], 0.5)
    assert torch.equal(i2, ridx) and torch.equal(c2, rcu)
    assert torch.equal(importance_and_keep_set(*args, keep_ratio=0.5, backend="torch")[1], ridx)


def test_no_images_and_empty_request():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 10, 2, 8)
    imp = visual_importance_ref(q, k, [0, 0, 3], [7, 8, 9], [0, 0, 10], [], [], [])
    assert imp.shape == (0,)
    imp = visual_importance_ref(q, k, [0, 0, 3], [7, 8, 9], [0, 0, 10], [1], [2], [4])
    assert imp.shape == (4,) and imp.sum() > 0


def _paged_tiny(block_size=4):
    q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len = _tiny()
    L, _, Hkv, D = k.shape
    lens = [cu_keys[i + 1] - cu_keys[i] for i in range(len(cu_keys) - 1)]  # 14, 10
    table = torch.tensor([[5, 0, 2, 7, -1], [1, 6, 3, -1, -1]], dtype=torch.int32)
    cache = torch.full((L, 8, block_size, Hkv, D), float("nan"))
    for b, n in enumerate(lens):
        for t in range(n):
            cache[:, table[b, t // block_size], t % block_size] = k[:, cu_keys[b] + t]
    return (q, cache, table, torch.tensor(lens), cu_rows, row_pos, image_req, image_start, image_len), k


def test_paged_definition_matches_dense():
    pargs, k = _paged_tiny()
    dense = torch.cat([k[:, 0:14], k[:, 14:24]], dim=1)
    assert torch.equal(gather_paged_keys(pargs[1], pargs[2], pargs[3]), dense)
    ref = visual_importance_ref(*_tiny())
    assert torch.equal(visual_importance_paged_ref(*pargs), ref)
    assert torch.equal(visual_importance_paged(*pargs), ref)  # CPU: auto -> definition


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(1, a[1][0]), "key_cache must be 5-D"),
    (lambda a: a.__setitem__(2, a[2][:, :3]), "needs 4 blocks"),
    (lambda a: a.__setitem__(2, torch.tensor([[5, 0, 2, 8, -1], [1, 6, 3, -1, -1]])), r"block_table\[0\] refers"),
    (lambda a: a.__setitem__(3, torch.tensor([14])), "seq_lens must have one entry per request"),
    (lambda a: a.__setitem__(3, torch.tensor([14, 9])), r"row_pos\[4\] = 9 is outside"),
    (lambda a: a.__setitem__(1, a[1].half()), "key_cache dtype"),
])
def test_bad_paged_args(mutate, match):
    pargs, _ = _paged_tiny()
    pargs = list(pargs)
    mutate(pargs)
    for fn in (visual_importance_paged, visual_importance_paged_ref):
        with pytest.raises(ValueError, match=match):
            fn(*pargs)


# --------------------------------------------------------------------------------------------
# Argument errors: clear ValueErrors naming the argument.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [visual_importance, visual_importance_ref])
@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(0, a[0][0]), "queries must be 4-D"),
    (lambda a: a.__setitem__(1, a[1][:1]), "same num_layers"),
    (lambda a: a.__setitem__(1, a[1][..., :4]), "same head_dim"),
    (lambda a: a.__setitem__(1, a[1].half()), "keys dtype"),
    (lambda a: a.__setitem__(0, a[0].long()), "queries dtype"),
    (lambda a: a.__setitem__(1, torch.randn(2, 24, 3, 8)), "multiple of KV heads"),
    (lambda a: a.__setitem__(2, [0, 4, 6]), r"cu_rows\[-1\]"),
    (lambda a: a.__setitem__(4, [0, 14, 24, 30]), "B\\+1 entries"),
    (lambda a: a.__setitem__(3, [10, 3, 13, 11, 9, 6]), "row_pos must have one entry per query row"),
    (lambda a: a.__setitem__(3, [10, 3, 14, 11, 9, 6, 8]), r"row_pos\[2\] = 14 is outside"),
    (lambda a: a.__setitem__(5, [0, 0, 2]), "image_req entries"),
    (lambda a: a.__setitem__(7, [3, 5, 0]), "image_len entries must be >= 1"),
    (lambda a: a.__setitem__(6, [1, 6, 8]), "outside request 1"),
    (lambda a: a.__setitem__(6, [1, 2, 2]), "must not overlap"),
    (lambda a: a.__setitem__(7, [3, 5]), "same length"),
    (lambda a: a.__setitem__(2, torch.tensor([0.0, 4.0, 7.0])), "cu_rows must be an integer tensor"),
])
def test_bad_importance_args(fn, mutate, match):
    args = list(_tiny())
    mutate(args)
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), torch.tensor([0.5, 2.0]), [0.5, 0.0]])
def test_bad_keep_ratio(ratio):
    imp = torch.rand(10)
    for fn in (keep_set, keep_set_ref):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
            fn(imp, [0, 4, 10], ratio)
    bad = ratio if isinstance(ratio, float) else [0.5, 0.5, 3.0]  # _tiny() has 3 images
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        importance_and_keep_set(*_tiny(), keep_ratio=bad)


def test_bad_keep_args():
    with pytest.raises(ValueError, match="one entry per image"):
        keep_set(torch.rand(10), [0, 4, 10], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"cu_image\[-1\]"):
        keep_set(torch.rand(10), [0, 4, 9], 0.5)
    with pytest.raises(ValueError, match="at least one visual token"):
        keep_set(torch.rand(10), [0, 4, 4, 10], 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        keep_set(torch.rand(10), [0, 10], 0.5, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    # In a clean subprocess, so we can also check the error path did not import triton.
    if K.__name__ != "vllm_sgl.kernels":
        pytest.skip("vllm_sgl is not installed")
    code = (
        "import sys, torch\n"
        "from vllm_sgl.kernels import visual_importance, keep_set\n"
        "q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 6, 2, 8)\n"
        "for call in (lambda: visual_importance(q, k, [0, 2], [4, 5], [0, 6], [0], [0], [3], backend='triton'),\n"
        "             lambda: keep_set(torch.rand(4), [0, 4], 0.5, backend='triton')):\n"
        "    try:\n"
        "        call(); print('NO ERROR'); sys.exit(1)\n"
        "    except RuntimeError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e) and 'no CPU backend' in str(e), e\n"
        "assert 'vllm_sgl.kernels.importance_triton' not in sys.modules, 'the dispatcher imported the kernel'\n"
        "assert 'TRITON_INTERPRET' not in __import__('os').environ\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(interpret=False), cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# The benchmark script's CPU paths (no GPU here).
# --------------------------------------------------------------------------------------------
def test_benchmark_cpu_tiny(tmp_path):
    out_csv = tmp_path / "bench.csv"
    keep_csv = tmp_path / "keep.csv"
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--iters", "2",
                           "--warmup", "1", "--csv", str(out_csv), "--plot", str(tmp_path / "bench.png"),
                           "--keep-csv", str(keep_csv), "--keep-ratios", "0.1,0.99"],
                          env=_env(interpret=False), cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out_csv.open()))
    assert rows, "benchmark wrote no rows"
    for r in rows:
        assert float(r["fused_ms"]) > 0 and float(r["unfused_ms"]) > 0, r
        assert float(r["speedup"]) > 0 and 0 < float(r["fused_roofline_frac"]) and r["max_abs_err"] != ""
        assert float(r["max_abs_err"]) < 1e-3, r
        assert float(r["sdpp_keep_ms"]) > 0, r
    keep = list(csv.DictReader(keep_csv.open()))  # batch {1, 2} x N {64, 256} x keep {0.1, 0.99}
    assert len(keep) == 8 and {r["keep_ratio"] for r in keep} == {"0.1", "0.99"}
    for r in keep:
        assert float(r["sgl_ms"]) > 0 and float(r["sdpp_ms"]) > 0 and int(r["sdpp_scratch_bytes"]) > 0, r
        assert int(r["sdpp_max_steps"]) <= 255, r


def test_benchmark_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the no-GPU path does not run (and the real benchmark would)")
    proc = subprocess.run([sys.executable, str(BENCH)], env=_env(interpret=False), cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA is not available" in proc.stdout and "smoke check passed" in proc.stdout, proc.stdout
