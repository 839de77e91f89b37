"""vllm-sgl: SGL (small VLM guidance of a large VLM) for vLLM."""

__version__ = "0.1.0"
