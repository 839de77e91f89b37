"""Is vLLM's speculative decoding exact on the CPU build? (issue 34; no SGL involved)

Plain vLLM (general plugins off), the shapes pair's target, ngram drafting vs none: three engines,
one at a time, each in a fresh process of this script with VLLM_ENABLE_V1_MULTIPROCESSING=0, so
the engine core and its worker run in that process and `cpu_rejection_sampler.install()`, called there
before `LLM(...)`, is what the worker's kernel registration binds. (A second engine in one process
fails at start-up on vLLM 0.32: `register_kernels` scans sys.modules and raises once llvmlite is
imported.)

  1. no drafts:  the reference greedy answers (alone, and batched with sampled companions)
  2. ngram, vLLM as shipped
  3. ngram, after vllm_sgl.engine.cpu_rejection_sampler.install()

and counts (a) temperature-0.01 seeded requests sent alone whose text differs from the greedy
answer, (b) greedy requests batched with a sampled and an n=2 request whose text differs from
the same batch without drafts.

    vllm-sgl make-tiny-pair /tmp/shapes --task shapes
    .venv/bin/python benchmarks/spec_exactness.py --target /tmp/shapes/target --examples 8 --kind list
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_PLUGINS", "")  # plain vLLM: no vllm-sgl plugin
os.environ.pop("TRITON_INTERPRET", None)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


def run_engine(target: str, prompts: list[dict], max_tokens: int, spec: dict | None) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=target, dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 * 2**20,
              enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 1, "video": 0},
              speculative_config=spec)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    out: dict = {}
    # (a) each temperature-0.01 seeded request alone
    out["cold_alone"] = [
        llm.generate([p], SamplingParams(temperature=0.01, seed=1000 + i, max_tokens=max_tokens),
                     use_tqdm=False)[0].outputs[0].text
        for i, p in enumerate(prompts)]
    # (b) all greedy requests with a sampled and an n=2 companion in one batch
    companions = [SamplingParams(temperature=0.8, seed=7, max_tokens=max_tokens),
                  SamplingParams(temperature=0.8, n=2, max_tokens=max_tokens)]
    res = llm.generate(prompts + prompts[:2], [greedy] * len(prompts) + companions, use_tqdm=False)
    out["greedy_mixed"] = [r.outputs[0].text for r in res[: len(prompts)]]
    out["greedy_alone"] = [r.outputs[0].text for r in llm.generate(prompts, greedy, use_tqdm=False)]
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    return out


PHASES = {"no_drafts": (None, False), "ngram_vllm": (NGRAM, False), "ngram_fixed": (NGRAM, True)}


def prompts_for(target: str, count: int, kind: str | None) -> list[dict]:
    from transformers import AutoProcessor

    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.tasks import shapes

    processor = AutoProcessor.from_pretrained(target)
    return [{"prompt": build_prompt_text(processor, 1, e.question), "multi_modal_data": {"image": e.image}}
            for e in shapes.split_examples("test", count, kind=kind)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="/tmp/shapes/target")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kind", help="only questions of this kind (`list` answers repeat, so ngram drafts)")
    ap.add_argument("--json", help="write the counts and texts here")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:  # one engine in this process
        spec, fix = PHASES[args.phase]
        installed = None
        if fix:
            from vllm_sgl.engine import cpu_rejection_sampler

            installed = cpu_rejection_sampler.install()
        r = run_engine(args.target, prompts_for(args.target, args.examples, args.kind), args.max_tokens, spec)
        r["installed"] = installed
        with open(args.out, "w") as f:
            json.dump(r, f)
        return

    import subprocess
    import sys
    import tempfile

    runs = {}
    for phase in PHASES:
        out = os.path.join(tempfile.mkdtemp(prefix="spec-exact-"), f"{phase}.json")
        cmd = [sys.executable, __file__, "--target", args.target, "--examples", str(args.examples),
               "--max-tokens", str(args.max_tokens), "--phase", phase, "--out", out]
        if args.kind:
            cmd += ["--kind", args.kind]
        print(f"[{phase}] starting", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"[{phase}] failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
        with open(out) as f:
            runs[phase] = json.load(f)

    ref = runs["no_drafts"]
    n = args.examples
    summary: dict = {"examples": n, "installed": runs["ngram_fixed"]["installed"]}
    for name, r in runs.items():
        summary[name] = {
            "cold_alone_differs_from_greedy": sum(a != b for a, b in zip(r["cold_alone"], ref["greedy_alone"])),
            "greedy_mixed_differs_from_no_drafts": sum(a != b for a, b in zip(r["greedy_mixed"], ref["greedy_mixed"])),
            "greedy_alone_differs_from_no_drafts": sum(a != b for a, b in zip(r["greedy_alone"], ref["greedy_alone"])),
        }
    for name in runs:
        print(f"{name:12s} first request: T=0.01 {runs[name]['cold_alone'][0]!r}, "
              f"greedy (mixed batch) {runs[name]['greedy_mixed'][0]!r}")
    print(f"\n{'run':12s} {'(a) T=0.01 alone != greedy':>27s} {'(b) greedy mixed != no drafts':>30s}"
          f" {'greedy alone != no drafts':>26s}")
    for name in runs:
        s = summary[name]
        print(f"{name:12s} {s['cold_alone_differs_from_greedy']:>25d}/{n}"
              f" {s['greedy_mixed_differs_from_no_drafts']:>28d}/{n}"
              f" {s['greedy_alone_differs_from_no_drafts']:>24d}/{n}")
    print("cpu_rejection_sampler.install() in the fixed run ->", summary["installed"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
