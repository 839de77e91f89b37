"""vllm_sgl/engine/cpu_rejection_sampler.py against vLLM's original rejection-sampler Triton kernels.

Two subprocesses run the same deterministic inputs (this file is their script):
- `triton`: Triton's interpreter (TRITON_INTERPRET=1, vLLM told Triton is usable) runs the kernels
  of vllm/v1/sample/rejection_sampler.py, and the whole `apply_sampling_constraints` +
  `rejection_sample` path with them: the ground truth;
- `cpu`: vLLM's CPU build as the engine has it (`CpuPlatform.register_triton_kernel_overrides`,
  the C++ wrappers of vllm/utils/cpu_triton_utils.py);
- `fix`: the same after `cpu_rejection_sampler.install()` ran first, as the plugin does in a worker;
  each kernel alone and the whole path, through what vLLM bound.
The pytest process itself never imports vLLM nor patches anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = sys.executable

# (name, draft tokens per request, temperature per request (0 = greedy), draft probs?, top-k/p?)
CASES = [
    ("all_greedy", [3, 2, 4], [0, 0, 0], False, False),
    ("all_random", [3, 2, 4], [0.8, 0.01, 1.3], False, False),
    ("mixed", [4, 4, 4, 4], [0, 0.7, 0, 0.01], False, True),
    ("mixed_zero_drafts", [0, 3, 0, 2, 1], [0.9, 0, 0, 0.5, 1.0], False, False),
    ("random_zero_first", [0, 4, 2], [0.6, 0.9, 1.1], False, True),
    ("all_greedy_dp", [3, 1, 2], [0, 0, 0], True, False),
    ("all_random_dp", [2, 3, 1], [0.7, 1.0, 0.3], True, True),
    ("mixed_dp", [4, 0, 4, 2], [0, 0.8, 0.01, 0], True, False),
]
VOCAB = 53


def _case_inputs(idx: int, num_draft, temps, with_dp: bool, topkp: bool) -> dict:
    g = torch.Generator().manual_seed(1000 + idx)
    B, N = len(num_draft), sum(num_draft)
    logits = torch.randn(N, VOCAB, generator=g) * 3
    draft = torch.randint(0, VOCAB, (N,), generator=g)
    # Most drafts are the target's argmax so that rows accept a few tokens before rejecting.
    draft = torch.where(torch.rand(N, generator=g) < 0.7, logits.argmax(-1), draft).to(torch.int32)
    temperature = torch.tensor(temps, dtype=torch.float32)
    return dict(
        num_draft=list(num_draft),
        max_spec_len=max(max(num_draft), 1),
        cu=torch.tensor(num_draft).cumsum(0).to(torch.int32),
        draft=draft,
        draft_probs=(torch.randn(N, VOCAB, generator=g) * 2).softmax(-1) if with_dp else None,
        logits=logits,
        bonus=torch.randint(0, VOCAB, (B, 1), generator=g),
        temperature=temperature,
        is_greedy=temperature == 0,
        top_k=torch.randint(2, VOCAB, (B,), generator=g, dtype=torch.int32) if topkp else None,
        top_p=(torch.rand(B, generator=g) * 0.5 + 0.5) if topkp else None,
        uniform=torch.rand(N, generator=g, dtype=torch.float64),
        inv_q=torch.empty(B, VOCAB).exponential_(generator=g).reciprocal(),
        recovered=torch.randint(0, VOCAB, (N,), generator=g, dtype=torch.int32),
        seeds={i: 77 + i for i, t in enumerate(temps) if t > 0 and i % 2 == 0},
    )


def _kernel_outputs(c: dict, expand, recovered, random, greedy) -> dict:
    """Each kernel alone; `expand` etc. are callables taking the kernel's launch arguments."""
    B, N, msl = len(c["num_draft"]), len(c["draft"]), c["max_spec_len"]
    out = {}
    for key, rf, rt in (("temperature", 0, 1), ("top_k", 0, 0), ("top_p", 0, 0)):
        x = c[key] if c[key] is not None else c["temperature"]
        buf = torch.full((N,), -7, dtype=x.dtype)  # a sentinel where vLLM has new_empty
        expand(B, buf, x, c["cu"], rf, rt, 128)
        out["expand_" + key] = buf
    probs = (c["logits"] / 0.7).softmax(-1)
    nodp = c["draft_probs"] is None
    rec = torch.full((N,), -7, dtype=torch.int32)
    recovered((B, msl), rec, c["cu"], c["draft"], c["draft_probs"], probs, c["inv_q"], VOCAB, 8192,
              nodp, False)
    out["recovered"] = rec
    buf = torch.full((B, msl + 1), -1, dtype=torch.int32)
    all_greedy = bool(c["is_greedy"].all())
    greedy(B, buf, c["cu"], c["draft"], probs.argmax(-1), c["bonus"],
           None if all_greedy else c["is_greedy"], msl, None, None, False)
    if not all_greedy:
        random(B, buf, c["cu"], c["draft"], c["draft_probs"], probs, c["bonus"], c["recovered"],
               c["uniform"], c["is_greedy"], msl, VOCAB, None, nodp, False)
    out["sample"] = buf
    return out


def _rejection_sample(rs, c: dict) -> torch.Tensor:
    """vLLM's own path after the logits processors: temperature/top-k/top-p, then sampling."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    B = len(c["num_draft"])
    greedy = c["is_greedy"]
    gens = {i: torch.Generator().manual_seed(s) for i, s in c["seeds"].items()}
    md = SamplingMetadata(
        temperature=None if bool(greedy.all()) else c["temperature"].clone(),
        all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
        top_p=c["top_p"], top_k=c["top_k"], generators=gens, max_num_logprobs=None,
        no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(B),
        presence_penalties=torch.zeros(B), repetition_penalties=torch.ones(B),
        output_token_ids=[[] for _ in range(B)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )
    torch.manual_seed(4321)  # the unseeded requests' draws
    target = rs.apply_sampling_constraints(c["logits"].clone(), c["cu"], md)
    return rs.rejection_sample(
        c["draft"], c["num_draft"], c["max_spec_len"], c["cu"], c["draft_probs"], target,
        c["bonus"], md,
    )


def _worker(mode: str, out_path: str) -> None:
    torch.set_num_threads(1)
    import vllm.v1.sample.rejection_sampler as rs

    cases = [_case_inputs(i, *spec[1:]) for i, spec in enumerate(CASES)]
    res: dict = {}
    if mode == "triton":
        from vllm.triton_utils import HAS_TRITON

        assert HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

        def launch(kernel):
            def call(grid, *args):
                names = kernel.arg_names
                n_const = {"expand_kernel": 1, "sample_recovered_tokens_kernel": 3,
                           "rejection_random_sample_kernel": 2,
                           "rejection_greedy_sample_kernel": 1}[kernel.__name__]
                pos, const = args[: len(args) - n_const], args[len(args) - n_const:]
                kernel[grid if isinstance(grid, tuple) else (grid,)](
                    *pos, **dict(zip(names[len(names) - n_const:], const)))
            return call

        k = [launch(rs.expand_kernel), launch(rs.sample_recovered_tokens_kernel),
             launch(rs.rejection_random_sample_kernel), launch(rs.rejection_greedy_sample_kernel)]
        res["kernels"] = [_kernel_outputs(c, *k) for c in cases]
        res["sample"] = [_rejection_sample(rs, c) for c in cases]
    else:
        from vllm_sgl.engine import cpu_rejection_sampler as fix

        if not fix.needed():
            torch.save({"needed": False}, out_path)
            return
        from vllm.platforms import current_platform
        from vllm.utils import cpu_triton_utils as cpu_tl

        def plain(f):
            return lambda grid, *args: f(*args)

        res["needed"] = True
        if mode == "fix":  # as in a worker: the plugin installs the fix, then vLLM binds the kernels
            res["installed"] = (fix.install(), fix.install())  # idempotent
        current_platform.register_triton_kernel_overrides()
        res["bound"] = rs.expand_kernel._impl is fix.expand_kernel_impl
        try:  # a step whose drafts are all gone: 0 target rows (vLLM's top-k path calls k.max() on them)
            res["empty_rows"] = tuple(rs.apply_sampling_constraints(torch.empty(0, 8), None, None).shape)
        except Exception as e:  # noqa: BLE001
            res["empty_rows"] = repr(e)[:100]
        impls = (cpu_tl._expand_kernel_impl, cpu_tl._sample_recovered_tokens_kernel_impl,
                 cpu_tl._rejection_random_sample_kernel_impl, cpu_tl._rejection_greedy_sample_kernel_impl)
        res["kernels"] = [_kernel_outputs(c, *map(plain, impls)) for c in cases]
        res["sample"] = []
        for c in cases:
            try:  # vLLM's wrappers can crash here (garbage top-k indices)
                res["sample"].append(_rejection_sample(rs, c))
            except Exception as e:  # noqa: BLE001
                res["sample"].append(repr(e)[:200])
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton (for its interpreter) is not installed")
    tmp = tmp_path_factory.mktemp("cpu_rejection_sampler")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    procs = {}
    for mode in ("triton", "cpu", "fix"):
        # triton: vLLM's CPU build disables Triton (no CPU backend); the vLLM 0.34 test environment's
        # sitecustomize (on PYTHONPATH, so Python loads it first) makes vLLM run its kernels in the
        # interpreter, the top-k/top-p sampler on its PyTorch path
        e = dict(env, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT / 'scripts' / 'vllm-0.34'}{os.pathsep}{env['PYTHONPATH']}") \
            if mode == "triton" else env
        procs[mode] = subprocess.Popen(
            [VENV_PY, __file__, mode, str(tmp / f"{mode}.pt")], env=e, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {mode: p.communicate(timeout=300)[0] for mode, p in procs.items()}
    if procs["cpu"].returncode != 0 and "No module named 'vllm" in logs["cpu"]:
        pytest.skip("vLLM is not importable")
    for mode in ("cpu", "fix"):
        assert procs[mode].returncode == 0, f"{mode} worker failed:\n{logs[mode][-4000:]}"
    out = {mode: torch.load(tmp / f"{mode}.pt") for mode in ("cpu", "fix")}
    if not out["cpu"]["needed"]:
        pytest.skip("this vLLM does not bind the C++ rejection-sampler wrappers (not the CPU build)")
    assert procs["triton"].returncode == 0, f"triton worker failed:\n{logs['triton'][-4000:]}"
    out["triton"] = torch.load(tmp / "triton.pt")
    return out


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fix_kernels_match_triton(results, i):
    tri, fix = results["triton"]["kernels"][i], results["fix"]["kernels"][i]
    for key in tri:
        assert _same(fix[key], tri[key]), (key, fix[key].tolist(), tri[key].tolist())


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fixed_rejection_sample_matches_triton(results, i):
    """The whole path (temperature, top-k/top-p, seeded draws, both kernels) after install()."""
    tri, fix = results["triton"]["sample"][i], results["fix"]["sample"][i]
    assert _same(fix, tri), (fix.tolist(), tri.tolist())


def test_install_binds_and_is_idempotent(results):
    assert results["fix"]["installed"] == (True, True)
    assert results["fix"]["bound"] and not results["cpu"]["bound"]
    assert results["fix"]["empty_rows"] == (0, 8) and results["cpu"]["empty_rows"] != (0, 8)


def test_vllm_cpu_wrappers_differ_from_triton(results):
    """Documents the upstream bug (docs/UPSTREAM_cpu_rejection_sampler.md): vLLM's
    `_expand_kernel_impl` never writes a float32/int32 output (it writes an int64 copy)."""
    tri, vl = results["triton"]["kernels"], results["cpu"]["kernels"]
    bad = [(CASES[i][0], k) for i in range(len(CASES)) for k in tri[i] if not _same(vl[i][k], tri[i][k])]
    if not bad:
        pytest.skip("vLLM's CPU rejection-sampler wrappers now match the Triton kernels")
    assert ("mixed", "expand_temperature") in bad
    # vLLM's expanded temperatures are the untouched sentinel: nothing was written.
    assert bool((vl[2]["expand_temperature"] == -7).all())


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
