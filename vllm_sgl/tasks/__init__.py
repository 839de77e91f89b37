"""Tools around the method: the shapes task, training its guide/target pair, its trained weights.

The engine never imports this package; the trained pair is written by `vllm-sgl make-tiny-pair OUT
--task shapes` and loads like any checkpoint.
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
TASKS = ("shapes",)


def trained_weights(task: str, role: str) -> Path:
    """The repo's fp16 weights of one trained checkpoint (written by vllm_sgl/tasks/train.py)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    path = WEIGHTS / f"{task}_{role}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the {task} pair has not been trained into the repo yet "
                                f"(python -m vllm_sgl.tasks.train --role {role}, then copy OUT/{role}.safetensors there)")
    return path


def has_trained_weights(task: str) -> bool:
    return all((WEIGHTS / f"{task}_{role}.safetensors").exists() for role in ("guide", "target"))
