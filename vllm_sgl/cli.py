"""`vllm-sgl` command line: make-tiny-pair, reference (and later the engine front ends)."""

from __future__ import annotations

import argparse
import sys


def _cmd_make_tiny_pair(args: argparse.Namespace) -> int:
    from vllm_sgl.tiny import BENCH_SPEC, TinyPairSpec, make_tiny_pair

    base = BENCH_SPEC if args.size == "bench" else TinyPairSpec()
    spec = TinyPairSpec(**{**base.__dict__, "family": args.family, "seed": args.seed})
    guide, target = make_tiny_pair(args.out_dir, spec)
    print(f"guide:  {guide}\ntarget: {target}")
    return 0


class CLIError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _load_images(paths: list[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except FileNotFoundError:
            raise CLIError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise CLIError(f"cannot read image {path}: {e}") from None
    return images


def _ratio(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {value}")
        return value

    return parse


def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prune-layer must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--prune-layer must be in [0, 1), got {value}")
    return value


def _cmd_reference(args: argparse.Namespace) -> int:
    import json
    import os

    if args.importance_backend == "triton":
        import torch

        # No Triton CPU backend: run the kernel in Triton's interpreter. This process starts no
        # vLLM engine, so setting it here (before triton is imported) affects nothing else.
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")

    from vllm_sgl.pair import PairError, resolve_model_dir

    try:
        guide = resolve_model_dir(args.guide, "guide")
        target = resolve_model_dir(args.target, "target")
    except PairError as e:
        raise CLIError(str(e)) from None
    images = _load_images(args.image)

    from vllm_sgl.reference import SGLReference, SGLSettings

    settings = SGLSettings(
        keep_ratio=args.keep_ratio,
        consistency_ratio=args.consistency_ratio,
        max_new_tokens=args.max_new_tokens,
        prune_layer=args.prune_layer,
        exit_threshold=args.exit_threshold,
        fuse=args.fuse,
    )
    try:
        settings.validate()
        ref = SGLReference(guide, target)
    except (PairError, ValueError) as e:
        raise CLIError(str(e)) from None
    importance_fn = None
    if args.importance_backend != "eager":
        from vllm_sgl.capture import importance_from_capture

        def importance_fn(prep, capture):
            return importance_from_capture(prep, capture, backend=args.importance_backend)

    result = ref.run(images, args.prompt, settings, importance_fn=importance_fn)
    out = result.to_json()
    out["importance_backend"] = args.importance_backend
    if args.json:
        print(json.dumps(out))
    else:
        tok = ref.processor.tokenizer
        for i, (n, keep) in enumerate(zip(result.num_visual_tokens, result.keep_indices)):
            print(f"image {i}: kept {len(keep)}/{n} visual tokens: {keep}")
        print(f"guide answer:  {tok.decode(result.guide_answer_ids)!r} (finished={result.guide_finished})")
        print(f"confidence {result.confidence:.4f}  consistency {result.consistency:.4g}  "
              f"exit score {result.exit_score:.4f}  exit={result.exit}")
        print(f"target (pruned): {tok.decode(result.target_pruned_answer_ids)!r}")
        print(f"target (full):   {tok.decode(result.target_full_answer_ids)!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vllm-sgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-pair", help="write a tiny random guide/target checkpoint pair")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_5_vl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["test", "bench"], default="test",
                   help="test: smallest pair; bench: target >= 8x the guide's per-token cost")
    p.set_defaults(func=_cmd_make_tiny_pair)

    p = sub.add_parser("reference", help="run the SGL reference (PyTorch, explicit attention) on one prompt")
    p.add_argument("--guide", required=True, help="guide checkpoint (directory or cached hub name)")
    p.add_argument("--target", required=True, help="target checkpoint (directory or cached hub name)")
    p.add_argument("--image", required=True, action="append", help="image file; repeat for several images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--keep-ratio", type=_ratio("--keep-ratio"), default=0.25)
    p.add_argument("--consistency-ratio", type=_ratio("--consistency-ratio"), default=0.05)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prune-layer", type=_rho, default=0.0, help="rho: drop pruned tokens after this fraction of the target's layers")
    p.add_argument("--exit-threshold", type=float, default=0.6)
    p.add_argument("--fuse", choices=["mean", "product", "confidence", "consistency"], default="mean")
    p.add_argument("--importance-backend", choices=["eager", "torch", "triton"], default="eager",
                   help="eager: explicit probabilities; torch/triton: kernel definition / fused kernel on captured q, k")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_reference)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"vllm-sgl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
