"""The guide runtime: the small VLM's answers, importance and keep sets for a batch of requests.
Imports torch and transformers only (never vLLM), so it runs and is timed on a bare GPU machine."""

from vllm_sgl.guide.runtime import Guide, GuideRequest, GuideResult

__all__ = ["Guide", "GuideRequest", "GuideResult"]
