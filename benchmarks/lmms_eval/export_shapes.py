"""Write the shapes task's test split as a local Hugging Face dataset for lmms-eval.

    python benchmarks/lmms_eval/export_shapes.py OUT_DIR [--count 200] [--split test] [--start 0]

OUT_DIR is a `datasets.DatasetDict` with one split (the `--split` name) written by `save_to_disk`,
the format lmms-eval reads with `dataset_kwargs: {load_from_disk: true}` (`benchmarks/lmms_eval/
shapes/shapes.yaml` points at it). Columns: id (the example's seed), image (PIL, 448 x 448), question,
answer, kind (color / shape / exists / where / list). Needs `datasets`, Pillow and numpy, not vLLM:
it runs in the lmms-eval venv as well as the project's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # vllm_sgl/__init__.py and vllm_sgl/tasks/__init__.py import nothing heavy

from vllm_sgl.tasks import shapes  # noqa: E402


def build(split: str, count: int, start: int = 0):
    import datasets

    examples = shapes.split_examples(split, count, start)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "kind": datasets.Value("string"),
        }
    )
    rows = {
        "id": [e.seed for e in examples],
        "image": [e.image for e in examples],
        "question": [e.question for e in examples],
        "answer": [e.answer for e in examples],
        "kind": [e.kind for e in examples],
    }
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features)})


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--split", choices=list(shapes.SPLITS), default="test")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--start", type=int, default=0)
    a = p.parse_args(argv)
    dd = build(a.split, a.count, a.start)
    dd.save_to_disk(str(a.out_dir))
    kinds = {}
    for k in dd[a.split]["kind"]:
        kinds[k] = kinds.get(k, 0) + 1
    print(f"{a.out_dir}: {a.split} x {a.count} (seeds {shapes.example_seed(a.split, a.start)}..); kinds {kinds}")
    return a.out_dir


if __name__ == "__main__":
    main()
