"""Compiles the importance kernels for a CUDA target without a GPU (Triton's bundled ptxas): catches
GPU compile errors (types, shapes, unsupported ops) that the interpreter does not see.

    python tests/kernels/aot_compile_check.py [--arch 90] [--full]

Default: a few representative variants (about a minute on a small CPU); --full: every dtype x GQA
{1, 7, 8} x head_dim {80, 128} x dense/paged. Exit status 1 if any variant fails to compile.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's vllm_sgl (a bare GPU machine too)


def _arg_type(name: str, dtype: str) -> str:
    if name in ("q_ptr", "k_ptr"):
        return "*" + dtype
    if name in ("lse_ptr", "part_ptr", "imp_ptr"):
        return "*fp32"
    if name == "out_ptr":
        return "*i64" if dtype == "keep" else "*fp32"
    if name == "bt_ptr":
        return "*i32"
    if name.endswith("_ptr"):
        return "*i64"
    if name == "qk_scale":
        return "fp32"
    if name in ("stride_kl", "stride_kb"):  # layer / block strides of a large cache exceed int32
        return "i64"
    return "i32"


def compile_kernel(fn, dtype: str, constexprs: dict, target, types: dict | None = None, **opts):
    sig = {n: ("constexpr" if n in constexprs else (types or {}).get(n) or _arg_type(n, dtype)) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target, options=opts)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--full", action="store_true")
    args = p.parse_args()
    from vllm_sgl.kernels import importance_triton as K
    target = GPUTarget("cuda", args.arch, 32)
    if args.full:
        variants = list(itertools.product(["bf16", "fp16", "fp32"], [1, 7, 8], [80, 128], [False, True]))
    else:
        variants = [("bf16", 8, 128, False), ("fp32", 7, 80, True)]
    jobs = []
    for dt, group, hd, paged in variants:
        prec = "ieee" if dt == "fp32" else "tf32"
        bn1, bn2 = (32, 64) if dt == "fp32" else (64, 128)
        common = dict(HEAD_DIM=hd, GROUP=group, BLOCK_M=64, BLOCK_D=max(16, 1 << (hd - 1).bit_length()),
                      INPUT_PRECISION=prec, DOT_FP32=False, PAGED=paged)
        tag = f"{dt} G{group} D{hd} {'paged' if paged else 'dense'}"
        jobs.append((f"_lse_kernel {tag}", K._lse_kernel, dt, dict(common, BLOCK_N=bn1)))
        jobs.append((f"_importance_kernel {tag}", K._importance_kernel, dt, dict(common, BLOCK_N=bn2)))
    jobs.append(("_sum_splits_kernel", K._sum_splits_kernel, "fp32", dict(BLOCK=1024)))
    jobs.append(("_keep_kernel", K._keep_kernel, "keep", dict(BLOCK=1024)))
    fp32 = dict(q_ptr="*fp32", sim_ptr="*fp32", c_ptr="*fp32", eps="fp32")
    jobs.append(("_sdpp_window_kernel", K._sdpp_window_kernel, "keep", dict(WINDOW=16), fp32,
                 dict(enable_fp_fusion=False)))
    jobs.append(("_sdpp_compact_kernel", K._sdpp_compact_kernel, "keep", dict(BLOCK=1024), fp32, {}))
    fails = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    for name, fn, dt, ce, *extra in jobs:
        types, opts = extra or (None, {})
        try:
            c = compile_kernel(fn, dt, ce, target, types, num_warps=4, num_stages=2, **opts)
            print(f"ok   {name} (shared memory {c.metadata.shared} B)", flush=True)
        except Exception:  # noqa: BLE001  (report every variant)
            fails += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(jobs) - fails}/{len(jobs)} compiled")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
