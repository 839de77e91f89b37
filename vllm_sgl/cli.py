"""`vllm-sgl` command line: make-tiny-pair, reference, serve, bench serve, calibrate, visualize."""

from __future__ import annotations

import argparse
import sys

from vllm_sgl.args import ratio_arg


def _cmd_make_tiny_pair(args: argparse.Namespace) -> int:
    from vllm_sgl.tiny import BENCH_SPEC, SHAPES_SPEC, TinyPairSpec, make_tiny_pair

    if args.task:
        if args.family != SHAPES_SPEC.family or args.size != "test" or args.seed:
            raise CLIError(f"--task {args.task} writes the trained {SHAPES_SPEC.family} pair; "
                           "it takes no --family, --size or --seed")
        spec = SHAPES_SPEC
    else:
        base = BENCH_SPEC if args.size == "bench" else TinyPairSpec()
        spec = TinyPairSpec(**{**base.__dict__, "family": args.family, "seed": args.seed})
    try:
        guide, target = make_tiny_pair(args.out_dir, spec)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
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


# -- serve ---------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from vllm_sgl.engine.serve import ServeUsageError, exec_server

    try:
        exec_server(args.server_args)  # replaces this process
    except ServeUsageError as e:
        raise CLIError(str(e)) from None
    return 0  # not reached


# -- bench serve ---------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    """vLLM's serving benchmark client (`vllm bench serve`), unchanged: the CPU build's `vllm` script
    cannot start, so this runs the same client from vllm.benchmarks.serve."""
    if args.bench_args[:1] != ["serve"]:
        raise CLIError("vllm-sgl bench runs vLLM's serving benchmark client: vllm-sgl bench serve [vllm bench serve args]; "
                       f"got {' '.join(args.bench_args) or 'nothing'}")
    from vllm.benchmarks.serve import add_cli_args, main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm-sgl bench serve", description="vLLM's serving benchmark client")
    add_cli_args(parser)
    bench_main(parser.parse_args(args.bench_args[1:]))
    return 0


# -- visualize -----------------------------------------------------------------------------------


def _trace_line(path: str, request_id: str) -> dict:
    """The trace line of one request. The engine's ids may carry a suffix (`ID-xxxx`) after the id
    the client saw; an exact match wins, else the one line whose id starts with `ID-`."""
    import json

    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise CLIError(f"trace not found: {path}") from None
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read trace {path}: {e}") from None
    exact = [line for line in lines if str(line.get("request_id")) == request_id]
    if exact:
        return exact[-1]
    prefixed = [line for line in lines if str(line.get("request_id", "")).startswith(request_id + "-")]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise CLIError(f"request id {request_id!r} matches {len(prefixed)} trace lines in {path}; give the full id")
    raise CLIError(f"request id {request_id!r} not in trace {path} ({len(lines)} lines)")


def _image_grids(processor_dir, images) -> tuple[list[list[int]], int]:
    """Each image's (t, h, w) patch grid and the merge size, from the target's image processor."""
    from transformers import AutoProcessor

    from vllm_sgl.pair import PairError, resolve_model_dir

    try:
        path = resolve_model_dir(processor_dir, "processor")
    except PairError as e:
        raise CLIError(str(e)) from None
    processor = AutoProcessor.from_pretrained(path)
    image_processor = getattr(processor, "image_processor", processor)
    enc = image_processor(images=list(images), return_tensors="pt")
    if "image_grid_thw" not in enc:  # InternVL's tiles have no single token grid to draw on
        raise CLIError(f"visualize draws keep sets on a token grid (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); {path} "
                       f"tiles its images ({type(image_processor).__name__}), which it cannot draw yet")
    merge = int(getattr(image_processor, "merge_size", 2))
    return [[int(x) for x in row] for row in enc["image_grid_thw"].tolist()], merge


def _cmd_visualize(args: argparse.Namespace) -> int:
    import textwrap

    from vllm_sgl.visualize import save_keep_sets

    from_trace = args.trace is not None
    if from_trace == (args.guide is not None):
        raise CLIError("give either --trace TRACE.jsonl --request-id ID, or --guide DIR --target DIR")
    if from_trace and not args.request_id:
        raise CLIError("--trace needs --request-id")
    if not from_trace and (not args.target or not args.prompt):
        raise CLIError("--guide needs --target and --prompt")
    processor_dir = args.processor or args.target
    if processor_dir is None:
        raise CLIError("--trace needs --processor DIR or --target DIR (the target's image processor gives the grids)")
    images = _load_images(args.image)

    if from_trace:
        line = _trace_line(args.trace, args.request_id)
        keeps = line.get("keep_indices") or []
        counts = line.get("num_visual_tokens") or []
        if not keeps:
            raise CLIError(f"trace line for {line.get('request_id')!r} has no keep sets (a request without images?)")
        source = f"trace {line.get('request_id')}"
    else:
        from vllm_sgl.pair import PairError, resolve_model_dir
        from vllm_sgl.reference import SGLReference, SGLSettings

        settings = SGLSettings(keep_ratio=args.keep_ratio, max_new_tokens=args.max_new_tokens)
        try:
            settings.validate()
            ref = SGLReference(resolve_model_dir(args.guide, "guide"), resolve_model_dir(args.target, "target"))
        except (PairError, ValueError) as e:
            raise CLIError(str(e)) from None
        result = ref.run(images, args.prompt, settings)
        keeps, counts = result.keep_indices, result.num_visual_tokens
        keeps = [k.tolist() if hasattr(k, "tolist") else list(k) for k in keeps]
        source = f"reference, keep ratio {args.keep_ratio:g}"

    if len(keeps) != len(images):
        raise CLIError(f"{len(images)} image(s) given but {len(keeps)} keep set(s) in the {source}")
    grids, merge = _image_grids(processor_dir, images)
    for i, (grid, n) in enumerate(zip(grids, counts)):
        expected = grid[0] * grid[1] * grid[2] // (merge * merge)
        if int(n) != expected:
            raise CLIError(
                f"image {i + 1} gives {expected} visual tokens with this processor but the {source} "
                f"has {n}: not the image(s) of that request?"
            )
    prompt = textwrap.shorten(args.prompt, 60) if args.prompt else ""
    titles = [f"image {i + 1}" + (f": {prompt}" if prompt and i == 0 else "") for i in range(len(images))]
    try:
        picture = save_keep_sets(images, grids, keeps, args.out, titles=titles, merge_size=merge)
    except ValueError as e:
        raise CLIError(str(e)) from None
    kept = ", ".join(f"{len(k)}/{n}" for k, n in zip(keeps, counts))
    print(f"wrote {args.out} ({picture.width}x{picture.height}); kept {kept} visual tokens ({source})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from vllm_sgl.engine import calibrate

    try:
        return calibrate.main(args)
    except ValueError as e:
        raise CLIError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from vllm_sgl.families import FAMILIES

    parser = _Parser(prog="vllm-sgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-pair", help="write a tiny guide/target checkpoint pair (random, or trained with --task)")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=list(FAMILIES), default="qwen2_5_vl",
                   help="the target's family (an MoE target gets the dense guide of its lineage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["test", "bench"], default="test",
                   help="test: smallest pair; bench: target >= 8x the guide's per-token cost")
    p.add_argument("--task", choices=["shapes"], default=None,
                   help="the pair trained on that task (vllm_sgl/tasks) instead of random weights")
    p.set_defaults(func=_cmd_make_tiny_pair)

    p = sub.add_parser("reference", help="run the SGL reference (PyTorch, explicit attention) on one prompt")
    p.add_argument("--guide", required=True, help="guide checkpoint (directory or cached hub name)")
    p.add_argument("--target", required=True, help="target checkpoint (directory or cached hub name)")
    p.add_argument("--image", required=True, action="append", help="image file; repeat for several images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--keep-ratio", type=ratio_arg("--keep-ratio"), default=0.25)
    p.add_argument("--consistency-ratio", type=ratio_arg("--consistency-ratio"), default=0.05)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prune-layer", type=_rho, default=0.0, help="rho: drop pruned tokens after this fraction of the target's layers")
    p.add_argument("--exit-threshold", type=float, default=0.6)
    p.add_argument("--fuse", choices=["mean", "product", "confidence", "consistency"], default="mean")
    p.add_argument("--importance-backend", choices=["eager", "torch", "triton"], default="eager",
                   help="eager: explicit probabilities; torch/triton: kernel definition / fused kernel on captured q, k")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_reference)

    # Everything after `serve` goes to vLLM's server unchanged (--help included): prefix_chars that
    # no argument uses makes argparse treat every word as a positional.
    p = sub.add_parser(
        "serve", add_help=False, prefix_chars="\x00",
        help="vLLM's OpenAI-compatible server (vllm serve) on any vLLM install: serve MODEL [vLLM serve args]",
    )
    p.add_argument("server_args", nargs="*")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "bench", add_help=False, prefix_chars="\x00",
        help="vLLM's serving benchmark client (vllm bench serve) on any vLLM install: bench serve [args]",
    )
    p.add_argument("bench_args", nargs="*")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("calibrate", help="choose a SEE threshold on your data: exit rate, agreement and expected "
                       "speed-up per threshold (runs the engine once, the target answers every request)")
    from vllm_sgl.engine.calibrate import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("visualize", help="draw an image's kept visual tokens (from an engine trace or the reference)")
    p.add_argument("--image", required=True, action="append", help="image file; repeat for several images, in prompt order")
    p.add_argument("--prompt", help="the request's question (required with --guide; a caption with --trace)")
    p.add_argument("--trace", help="engine trace (additional_config sgl.trace_path), JSON lines")
    p.add_argument("--request-id", help="with --trace: the request's id (a prefix before '-' is enough)")
    p.add_argument("--guide", help="guide checkpoint: compute the keep set with the reference")
    p.add_argument("--target", help="target checkpoint (reference mode; also the processor for --trace)")
    p.add_argument("--processor", help="directory with the target's image processor (default: --target)")
    p.add_argument("--keep-ratio", type=ratio_arg("--keep-ratio"), default=0.25, help="reference mode (default 0.25)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="reference mode: the guide's answer budget (default 32, the engine's guide_max_tokens)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_cmd_visualize)
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
