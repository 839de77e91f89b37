"""Correct CPU replacements for vLLM 0.32's rejection-sampler Triton kernels (issue 34).

vLLM's CPU build has no Triton backend, so `CpuPlatform.register_triton_kernel_overrides`
(vllm/platforms/cpu.py) swaps the Triton kernels of vllm/v1/sample/rejection_sampler.py for the
C++ wrappers in vllm/utils/cpu_triton_utils.py. One of them is wrong on every call that matters:

- `_expand_kernel_impl` hands the C++ op `_ensure_int64(output)` and `_ensure_int64(input)`. The
  op reads and writes int64, but `expand_batch_to_tokens` expands float32 temperature / top-p and
  int32 top-k into `x.new_empty(num_tokens)` of the same dtype, so the op writes into a temporary
  int64 copy that is thrown away (no copy-back), and it reads float temperatures truncated to
  integers. `apply_sampling_constraints` then divides the target logits of every request in a
  batch that holds a sampled request by uninitialised memory (and applies garbage top-k/top-p):
  sampled requests answer garbage, and greedy requests batched with them change, because the
  greedy argmax is taken on those same divided logits.

Two more wrappers differ from the Triton kernels on rarer inputs:

- `_rejection_random_sample_kernel_impl`: the C++ op does not reject padded draft tokens (-1;
  it reads `target_probs[row, -1]`, i.e. the previous row's last entry, and may accept the -1),
  and it compares in float32 after casting the float64 uniform draws down (Triton compares the
  float32 ratio with the float64 draw).
- `_sample_recovered_tokens_kernel_impl`: casts a float64 `inv_q` (`use_fp64_gumbel`) to float32,
  so near-ties pick another token than the Triton kernel.

This module gives pure-PyTorch versions of those three with the kernels' launch signatures (the
order `KernelOverride` forwards them in), matching the Triton kernels bit for bit
(tests/test_cpu_rejection_sampler.py runs the originals under Triton's interpreter), and `install()`.
The greedy wrapper (`_rejection_greedy_sample_kernel_impl`) is correct and stays.

Nothing here imports vLLM at module import time.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm_sgl")

# Bound on the [tokens, vocab] temporaries of the recovered-token argmax (elements per chunk).
_CHUNK_ELEMS = 1 << 24


def _segments(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts, counts, req_of_token, pos_of_token) from an inclusive cumulative count [B]."""
    cu = cu.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    starts = cu - counts
    total = int(cu[-1]) if cu.numel() else 0
    req = torch.repeat_interleave(torch.arange(cu.numel(), device=cu.device), counts)[:total]
    pos = torch.arange(total, device=cu.device) - starts[req]
    return starts, counts, req, pos


def expand_kernel_impl(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
) -> None:
    """`expand_kernel`: output[start_r + i] = (input[r] == replace_from ? replace_to : input[r])
    for i < min(n_r, MAX_NUM_TOKENS); in place, in `output`'s own dtype."""
    if cu_num_tokens.numel() == 0:
        return
    _, _, req, pos = _segments(cu_num_tokens)
    vals = torch.where(
        input_val == replace_from,
        torch.as_tensor(replace_to, dtype=input_val.dtype, device=input_val.device),
        input_val,
    )
    idx = torch.arange(req.numel(), device=output.device)
    if MAX_NUM_TOKENS is not None:
        keep = pos < int(MAX_NUM_TOKENS)
        idx, req = idx[keep], req[keep]
    output[idx] = vals[req].to(output.dtype)


def rejection_random_sample_kernel_impl(
    output_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    recovered_token_ids: torch.Tensor,
    uniform_probs: torch.Tensor,
    is_greedy: torch.Tensor | None,
    max_spec_len,
    vocab_size,
    synthetic_conditional_rates: torch.Tensor | None = None,
    NO_DRAFT_PROBS=False,
    SYNTHETIC_MODE=False,
) -> None:
    """`rejection_random_sample_kernel` for the non-greedy rows: each draft token is accepted
    when it is not padding (>= 0) and draft_prob > 0 and target_prob / draft_prob (float32) >=
    uniform (float64, compared in float64) -- or, in synthetic mode, when uniform < rate[pos];
    the first rejected position gets the recovered token and ends the row; a row with no
    rejection gets its bonus token after its drafts. Rows of greedy requests are left alone."""
    B = cu_num_draft_tokens.numel()
    if B == 0:
        return
    random_rows = (
        torch.ones(B, dtype=torch.bool, device=output_token_ids.device)
        if is_greedy is None
        else ~is_greedy.to(torch.bool)
    )
    starts, counts, req, pos = _segments(cu_num_draft_tokens)
    n = req.numel()
    draft = draft_token_ids[:n].to(torch.int64)
    uniform = uniform_probs[:n]
    valid = draft >= 0
    if SYNTHETIC_MODE:
        rate = synthetic_conditional_rates[pos]
        accepted = valid & (uniform < rate)
    else:
        safe = torch.where(valid, draft, torch.zeros_like(draft)).unsqueeze(1)
        tgt = target_probs[:n].gather(1, safe).squeeze(1)
        if NO_DRAFT_PROBS or draft_probs is None:
            dp = torch.ones_like(tgt)
        else:
            dp = draft_probs[:n].gather(1, safe).squeeze(1)
        ratio = tgt / dp  # float32, like the kernel; compared with the float64 draw below
        accepted = valid & (dp > 0) & (ratio.to(uniform.dtype) >= uniform)
    rejected = (~accepted).to(torch.int64)
    # Rejections strictly before each token within its row (segmented exclusive cumsum).
    csum = torch.cumsum(rejected, 0)
    before = csum - rejected - torch.cat([csum.new_zeros(1), csum])[starts[req]]
    write = random_rows[req] & (before == 0)
    token = torch.where(accepted, draft, recovered_token_ids[:n].to(torch.int64))
    output_token_ids[req[write], pos[write]] = token[write].to(output_token_ids.dtype)
    # Bonus for random rows without any rejection.
    row_rejects = torch.zeros(B, dtype=torch.int64, device=rejected.device).index_add_(0, req, rejected)
    bonus_rows = torch.nonzero(random_rows & (row_rejects == 0)).squeeze(1)
    bonus = bonus_token_ids.reshape(B, -1)[:, 0]
    output_token_ids[bonus_rows, counts[bonus_rows]] = bonus[bonus_rows].to(output_token_ids.dtype)


def sample_recovered_tokens_kernel_impl(
    output_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    inv_q: torch.Tensor,
    vocab_size,
    BLOCK_SIZE=None,
    NO_DRAFT_PROBS=False,
    USE_FP64_GUMBEL=False,
) -> None:
    """`sample_recovered_tokens_kernel`: for each draft position, argmax over the vocabulary of
    prob * inv_q[request] (first index on ties), where prob is the target distribution with the
    draft token zeroed (no draft probs, i.e. ngram) or max(target - draft, 0); products in
    inv_q's dtype (float64 with use_fp64_gumbel). NaN scores never win."""
    if cu_num_draft_tokens.numel() == 0:
        return
    _, _, req, _ = _segments(cu_num_draft_tokens)
    n = req.numel()
    if n == 0:
        return
    V = int(vocab_size)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for s in range(0, n, step):
        e = min(n, s + step)
        prob = target_probs[s:e, :V]
        if NO_DRAFT_PROBS or draft_probs is None:
            d = draft_token_ids[s:e].to(torch.int64)
            # The kernel zeroes column d; a padded (-1) draft matches no column, so zeroes nothing.
            col = torch.arange(V, device=prob.device)
            prob = prob.masked_fill(col.unsqueeze(0) == d.unsqueeze(1), 0.0)
        else:
            prob = torch.clamp_min(prob - draft_probs[s:e, :V], 0.0)
        score = prob.to(inv_q.dtype) * inv_q[req[s:e], :V]
        score = torch.nan_to_num(score, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        best = score.argmax(dim=1).clamp_(max=V - 1)
        output_token_ids[s:e] = best.to(output_token_ids.dtype)


# vLLM's kernel name -> (attribute in vllm.utils.cpu_triton_utils, our implementation)
_OVERRIDES = {
    "vllm.v1.sample.rejection_sampler.expand_kernel": (
        "_expand_kernel_impl", expand_kernel_impl),
    "vllm.v1.sample.rejection_sampler.rejection_random_sample_kernel": (
        "_rejection_random_sample_kernel_impl", rejection_random_sample_kernel_impl),
    "vllm.v1.sample.rejection_sampler.sample_recovered_tokens_kernel": (
        "_sample_recovered_tokens_kernel_impl", sample_recovered_tokens_kernel_impl),
}

_installed = False


def needed() -> bool:
    """True on vLLM builds that bind the C++ rejection-sampler wrappers: the CPU platform without
    a Triton CPU backend, with vllm.utils.cpu_triton_utils holding the three wrappers (0.32's V1
    sampler). False elsewhere (GPU builds, Triton-CPU, vLLM 0.34 where that module is gone)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.triton_utils import HAS_TRITON

        if HAS_TRITON:  # the CPU platform then keeps the Triton kernels (no overrides)
            return False
        import importlib

        cpu_tl = importlib.import_module("vllm.utils.cpu_triton_utils")
        return all(hasattr(cpu_tl, attr) for attr, _ in _OVERRIDES.values())
    except Exception:  # noqa: BLE001 - any other vLLM: nothing to fix
        return False


def install() -> bool:
    """Make vLLM's CPU build use this module's three implementations. Idempotent; never raises;
    returns whether the fix is in place.

    Where: `CpuPlatform.register_triton_kernel_overrides()` (vllm/platforms/cpu.py), which every
    worker runs in `WorkerWrapperBase.init_worker` right after the general plugins are loaded,
    reads the C++ wrappers as attributes of `vllm.utils.cpu_triton_utils` and binds them. Those
    module attributes are the one place patched here, from the plugin's `register()` (so before
    any worker binds them): vLLM's own registration then binds the corrected functions.
    """
    global _installed
    if _installed:
        return True
    if not needed():
        return False
    try:
        import importlib

        cpu_tl = importlib.import_module("vllm.utils.cpu_triton_utils")
        for attr, impl in _OVERRIDES.values():
            setattr(cpu_tl, attr, impl)
        _no_empty_top_k(importlib.import_module("vllm.v1.sample.rejection_sampler"))
        _installed = True
        return True
    except Exception as e:  # noqa: BLE001 - never take an engine down
        logger.warning("vllm-sgl: vLLM's CPU rejection sampler was not corrected: %r", e)
        return False


def _no_empty_top_k(rs) -> None:
    """vLLM's `apply_sampling_constraints` on a step whose draft tokens are all gone (the sampler
    still runs with 0 target rows) hands `apply_top_k_top_p` an empty top_k, whose PyTorch path
    (the CPU's) calls `k.max()` on it and kills the engine core ("max(): Expected reduction dim"),
    seen with a top_k request in a drafting batch. Nothing to constrain then: the rows are returned."""
    original = rs.apply_sampling_constraints
    if getattr(original, "_vllm_sgl", False):
        return

    def apply_sampling_constraints(logits, *args, **kwargs):
        if logits.shape[0] == 0:
            return logits
        return original(logits, *args, **kwargs)

    apply_sampling_constraints._vllm_sgl = True
    rs.apply_sampling_constraints = apply_sampling_constraints
