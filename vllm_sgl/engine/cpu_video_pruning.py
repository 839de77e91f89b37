"""vLLM's CPU model runner never turns on its multimodal-pruning path, so vanilla vLLM with EVS
(`video_pruning_rate`) crashes on the CPU at the first video: Qwen2.5-VL's embed_multimodal appends
each kept token's positions as 4 extra embedding columns, which only that path strips
("shape mismatch: value tensor of shape [64, 516] cannot be broadcast to ... [64, 512]").
`GPUModelRunner.load_model` sets `is_multimodal_pruning_enabled`; `CPUModelRunner.load_model`
(vLLM 0.32 `vllm/v1/worker/cpu_model_runner.py`) overrides it without doing so. Corrected here the
way the GPU runner does it, for any engine (SGL refuses EVS itself): this is what lets the
throughput benchmark's EVS baseline run on these machines. No-op where the CPU runner is absent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_sgl")
_PATCHED = "_vllm_sgl_evs"


def install() -> bool:
    """Idempotent; never raises; returns whether the fix is in place."""
    try:
        from vllm.v1.worker import cpu_model_runner
        from vllm.v1.worker.gpu_model_runner import supports_multimodal_pruning
    except Exception:  # noqa: BLE001 - not the CPU build, or a vLLM without the V1 CPU runner
        return False
    runner = cpu_model_runner.CPUModelRunner
    original = runner.load_model
    if getattr(original, _PATCHED, False):
        return True

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm = self.model_config.multimodal_config
        if mm is not None and mm.is_multimodal_pruning_enabled() and supports_multimodal_pruning(self.get_model()):
            self.is_multimodal_pruning_enabled = True

    setattr(load_model, _PATCHED, True)
    runner.load_model = load_model
    return True
