"""What one decode step costs the host, counted with torch's profiler (on the CPU too): the ops it
launches, the host synchronisations in it and the attention kernel SDPA picks for it. The step
must have no sync: a sync stalls the host until the device catches up, which is what makes an
eager decode launch-bound on a GPU. Its attention should be a fused kernel, not SDPA's math
fallback (vllm_sgl.guide.decode.attend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sgl.guide.decode import decode_step

# Profiler events that make the host wait for the device (or for a data-dependent size).
SYNC_EVENTS = (
    "aten::_local_scalar_dense",  # .item(), .tolist(), bool(tensor)
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)


STEP_RANGE = "sgl_decode_step"  # the profiled step's own range in the trace

# The op each SDPA backend dispatches to (the name says which kernel ran).
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_attention_math": "math",
}


@dataclass
class StepProfile:
    ops: int  # top-level aten ops one eager step launches
    syncs: int  # host synchronisations in one step
    sync_names: list[str]
    sdpa_backends: list[str]  # the SDPA kernels the step's attention ran (one per layer), by name


def sdpa_backends(events) -> list[str]:
    """The SDPA backends that profiler events show ran (SDPA_BACKENDS' names), sorted."""
    return sorted({SDPA_BACKENDS[e.name] for e in events if e.name in SDPA_BACKENDS})


@torch.inference_mode()
def profile_decode_step(guide, batch: int = 1) -> StepProfile:
    """Profiles one eager decode step of `guide` at `batch` rows (a scratch state of the smallest
    capacity bucket; the step's work does not depend on the values in it)."""
    guide.reserve(batch * 256, batch * guide.max_tokens + guide.max_tokens)
    st = guide._state(batch, 256)
    st.done.zero_()
    st.lens.fill_(1)
    st.step.zero_()
    decode_step(guide.text, st)  # warm-up (allocator, lazy inits)
    st.step.zero_()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if st.tokens.is_cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            decode_step(guide.text, st)
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::") and _top_level(e)]
    # Only syncs inside the step: on CUDA the profiler's own exit synchronises the device, which the
    # trace records as one cudaDeviceSynchronize after the step (seen on the H200, 2026-12-04).
    step = next(e.time_range for e in events if e.name == STEP_RANGE)
    syncs = [e.name for e in events if any(e.name.startswith(s) for s in SYNC_EVENTS)
             and step.start <= e.time_range.start <= step.end]
    return StepProfile(ops=len(top), syncs=len(syncs), sync_names=sorted(set(syncs)),
                       sdpa_backends=sdpa_backends(events))


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True
