"""How much of the target's greedy answer the guide's answer already holds: the ceiling of using
the guide's answer as a speculative-decoding draft (issue 21), before any drafting exists.

    .venv/bin/python benchmarks/draft_ceiling.py                 # the trained shapes pair, 200 test examples

Per request: the longest common prefix of the guide's greedy answer (from the SGL trace) and the
target's greedy output, in tokens. A draft that proposes the guide's answer while the target still
agrees with it would have the target accept exactly that prefix, so `prefix / target tokens` is the
share of the target's decode steps a perfect verifier could save (ideal: steps saved = accepted
tokens). Printed per question kind at keep 1.0 (the target sees every visual token) and at the
keep ratio SGL runs at (--keep-ratio).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair-dir", type=Path, default=None, help="guide/ and target/ (default: the trained shapes pair)")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_sgl.engine.trace import read_trace, user_request_id
    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.tasks import shapes
    from vllm_sgl.tiny import SHAPES_SPEC, default_pair_dir, ensure_tiny_pair

    if args.pair_dir:
        guide, target = args.pair_dir / "guide", args.pair_dir / "target"
    else:
        guide, target = ensure_tiny_pair(default_pair_dir("shapes-pair"), SHAPES_SPEC)
    processor = AutoProcessor.from_pretrained(target)
    examples = shapes.split_examples("test", args.examples)
    trace = Path(tempfile.mkdtemp(prefix="sgl-draft-")) / "trace.jsonl"
    sgl = {"guide_model": str(guide), "keep_ratio": args.keep_ratio, "guide_max_tokens": args.max_tokens,
           "trace_path": str(trace)}
    llm = LLM(model=str(target), model_impl="sgl", additional_config={"sgl": sgl}, dtype="float32",
              max_model_len=2048, kv_cache_memory_bytes=512 * 2**20, limit_mm_per_prompt={"image": 1}, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"{'keep':>5} {'kind':>7} {'requests':>8} {'target tokens':>13} {'guide prefix':>12} {'ceiling':>8}")
    for ratio in (1.0, args.keep_ratio):
        outs = llm.generate([{"prompt": build_prompt_text(processor, 1, e.question), "multi_modal_data": {"image": e.image},
                              "mm_processor_kwargs": {"sgl_keep_ratio": ratio}} for e in examples], params, use_tqdm=False)
        lines = read_trace(trace)
        stats = defaultdict(lambda: [0, 0, 0])  # requests, target tokens, accepted prefix tokens
        for e, o in zip(examples, outs):
            t = list(o.outputs[0].token_ids)
            n = common_prefix(lines[user_request_id(o.request_id)]["guide_answer_ids"], t)
            for kind in (e.kind, "all"):
                stats[kind][0] += 1
                stats[kind][1] += len(t)
                stats[kind][2] += n
        for kind in (*shapes.KINDS, "all"):
            r, tok, acc = stats[kind]
            print(f"{ratio:>5g} {kind:>7} {r:>8} {tok / r:>13.1f} {acc / r:>12.1f} {acc / tok:>8.3f}")
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
