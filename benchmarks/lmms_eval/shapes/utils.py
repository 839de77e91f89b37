"""doc_to_* and metrics of the lmms-eval `shapes` task (shapes.yaml beside this file).

The prompt is the question alone after the image, as the shapes pair was trained
(`Example.messages()` in vllm_sgl/tasks/shapes.py); the score is the task page's exact match, copied
here so that lmms-eval's venv needs nothing from this project.
"""

from __future__ import annotations

KINDS = ("color", "shape", "exists", "where", "list")


def normalize(reply: str) -> str:
    """vllm_sgl.tasks.shapes.normalize: stripped, one final period dropped, lowercase."""
    s = (reply or "").strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s.lower()


def shapes_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def shapes_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def shapes_process_results(doc, results):
    reply = results[0] if results else ""
    item = {"kind": doc["kind"], "correct": normalize(reply) == normalize(doc["answer"])}
    # Every metric gets every item; each per-kind aggregation keeps its own kind.
    return {"exact_match": item, **{k: item for k in KINDS}}


def _accuracy(items, kind=None):
    kept = [it for it in items if kind is None or it["kind"] == kind]
    if not kept:
        return float("nan")
    return sum(it["correct"] for it in kept) / len(kept)


def shapes_aggregate_all(items):
    return _accuracy(items)


def shapes_aggregate_color(items):
    return _accuracy(items, "color")


def shapes_aggregate_shape(items):
    return _accuracy(items, "shape")


def shapes_aggregate_exists(items):
    return _accuracy(items, "exists")


def shapes_aggregate_where(items):
    return _accuracy(items, "where")


def shapes_aggregate_list(items):
    return _accuracy(items, "list")
