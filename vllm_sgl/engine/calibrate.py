"""`vllm-sgl calibrate`: choose a SEE threshold on your own data.

A threshold only means something on the user's data, so this runs the engine once over a JSONL of
image(s) + question (+ optional reference answer) with SEE scoring on but no exits (the target
answers every request, `see_score_only`), then, for a range of thresholds, reports what SEE would
have done:
- exit rate: share of requests that would exit (greedy, guide finished, answer fits the stop
  rules, score >= threshold);
- agreement: share of those whose guide answer equals the target's (same text);
- with reference answers: accuracy of the guide and of the target on those requests, and of the
  whole set with SEE (exits answered by the guide, the rest by the target) against the target alone;
- expected speed-up over SGP without SEE: 1 / (1 - exit rate x (1 - guide s / SGP s)), with the
  run's own seconds per request and the guide's share of them (engine trace).
It recommends the lowest threshold whose agreement reaches --min-agreement. CSV, plot, JSON.

JSONL line: {"images": ["a.png", ...], "question": "...", "answer": "..."}; image paths are
relative to the JSONL file, at least one per line (SEE scores image requests only). Every image is
opened and verified before the engine starts, so a bad line fails in a second, not after start-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Item:
    images: list[str]
    question: str
    answer: str | None


@dataclass
class Scored:
    item: Item
    score: float | None  # None: could not exit (not a SEE candidate)
    fits: bool
    guide_text: str
    target_text: str


def load_items(path: Path) -> list[Item]:
    """The JSONL's requests; every image is opened and verified here, before any engine starts,
    and a bad line is named with the reason."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read --data {path}: {e.strerror or e}") from None
    items = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
            paths, question = rec["images"], str(rec["question"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: each line needs \"images\" (a list of paths) and \"question\" ({e})") from None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: \"images\" must be a list of image paths, got {json.dumps(paths)}")
        if not paths:
            raise ValueError(f"{where}: no image: SEE scores image requests only, so a line without an image "
                             "cannot be calibrated (give it an image or remove it)")
        images = [str((path.parent / p).resolve()) for p in paths]
        for p in images:
            check_image(p, where)
        items.append(Item(images, question, rec.get("answer")))
    if not items:
        raise ValueError(f"{path}: no requests")
    return items


def check_image(p: str, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if Path(p).is_dir():
        raise ValueError(f"{where}: image {p} is a directory, not an image file")
    if not Path(p).is_file():
        raise ValueError(f"{where}: image {p} not found")
    try:
        with Image.open(p) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: {p} is not an image PIL can read ({e})") from None


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: how answers are compared."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def run_engine(args, items: list[Item]) -> tuple[list[Scored], float, float]:
    """(scored requests, seconds per request, guide seconds per request)."""
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_sgl.engine.trace import read_trace, user_request_id
    from vllm_sgl.reference import build_prompt_text

    trace = Path(tempfile.mkdtemp(prefix="sgl-calibrate-")) / "trace.jsonl"
    sgl = {"guide_model": str(args.guide), "keep_ratio": args.keep_ratio, "guide_max_tokens": args.guide_max_tokens,
           "see_score_only": True, "see_fuse": args.fuse, "see_consistency_ratio": args.consistency_ratio,
           "trace_path": str(trace)}
    engine = dict(dtype=args.dtype, seed=0, limit_mm_per_prompt={"image": max(len(i.images) for i in items)})
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    if args.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    llm = LLM(model=str(args.target), model_impl="sgl", additional_config={"sgl": sgl}, **engine)
    try:
        processor = AutoProcessor.from_pretrained(args.target)
        tokenizer = processor.tokenizer
        prompts = [{"prompt": build_prompt_text(processor, len(it.images), it.question),
                    "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in it.images]}} for it in items]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=True)
        elapsed = time.perf_counter() - t0
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort
            pass
    lines = read_trace(trace)
    scored, guide_steps = [], {}
    for it, out in zip(items, outs):
        line = lines[user_request_id(out.request_id)]
        if line.get("guide_step_seconds") is not None:
            guide_steps[line["guide_step_seconds"]] = None  # one entry per batched guide call
        scored.append(Scored(it, line["see_score"], bool(line["see_fits"]),
                             tokenizer.decode(line["guide_answer_ids"], skip_special_tokens=True),
                             out.outputs[0].text))
    n = len(items)
    return scored, elapsed / n, sum(guide_steps) / n


def thresholds(spec: str) -> list[float]:
    """--thresholds: LO:HI:STEP or a comma list, every value in [0, 1] (argparse type)."""
    accepted = "LO:HI:STEP with 0 <= LO <= HI <= 1 and STEP > 0, or a comma list of numbers in [0, 1]"
    try:
        if ":" in spec:
            lo, hi, step = (float(x) for x in spec.split(":"))
            if not (step > 0 and lo <= hi):
                raise ValueError
            out, t = [], lo
            while t <= hi + 1e-12:
                out.append(round(t, 10))
                t += step
        else:
            out = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {spec!r}") from None
    if not out or not all(0.0 <= t <= 1.0 for t in out):
        raise argparse.ArgumentTypeError(f"must be {accepted}, got {spec!r}")
    return sorted(out)


def unit_interval(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def table(scored: list[Scored], grid: list[float], sec_per_req: float, guide_sec: float) -> list[dict]:
    n = len(scored)
    has_ref = any(s.item.answer is not None for s in scored)
    rows = []
    for t in grid:
        exits = [s for s in scored if s.score is not None and s.fits and s.score >= t]
        rate = len(exits) / n
        row = {"threshold": t, "exits": len(exits), "exit_rate": rate,
               "agreement": (sum(normalize(s.guide_text) == normalize(s.target_text) for s in exits) / len(exits)
                             if exits else None),
               "expected_speedup": 1.0 / (1.0 - rate * (1.0 - min(1.0, guide_sec / sec_per_req)))}
        if has_ref:
            def right(text, s):
                return s.item.answer is not None and normalize(text) == normalize(s.item.answer)

            judged = [s for s in exits if s.item.answer is not None]
            row["guide_accuracy"] = sum(right(s.guide_text, s) for s in judged) / len(judged) if judged else None
            row["target_accuracy"] = sum(right(s.target_text, s) for s in judged) / len(judged) if judged else None
            total = [s for s in scored if s.item.answer is not None]
            exited = {id(s) for s in exits}
            row["accuracy_with_see"] = sum(right(s.guide_text if id(s) in exited else s.target_text, s)
                                           for s in total) / len(total)
            row["accuracy_target_only"] = sum(right(s.target_text, s) for s in total) / len(total)
        rows.append(row)
    return rows


def recommend(rows: list[dict], min_agreement: float) -> dict | None:
    for row in rows:  # ascending thresholds: the lowest that meets it exits the most
        if row["exits"] and row["agreement"] is not None and row["agreement"] >= min_agreement:
            return row
    return None


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def write(rows: list[dict], best: dict | None, args, out: Path, sec_per_req: float, guide_sec: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "calibrate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (out / "calibrate.json").write_text(json.dumps({
        "recommended_threshold": best["threshold"] if best else None, "min_agreement": args.min_agreement,
        "fuse": args.fuse, "seconds_per_request": sec_per_req, "guide_seconds_per_request": guide_sec, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out / 'calibrate.csv'} and {out / 'calibrate.json'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ts = [r["threshold"] for r in rows]
    ax.plot(ts, [r["exit_rate"] for r in rows], label="exit rate")
    ax.plot(ts, [r["agreement"] if r["agreement"] is not None else float("nan") for r in rows], label="agreement")
    ax.axhline(args.min_agreement, color="grey", ls="--", lw=1, label=f"min agreement {args.min_agreement:g}")
    if best:
        ax.axvline(best["threshold"], color="C3", lw=1, label=f"recommended {best['threshold']:g}")
    ax.set_xlabel(f"SEE threshold ({args.fuse} of confidence and consistency)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibrate.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'calibrate.png'}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_sgl.args import ratio_arg

    p.add_argument("--target", required=True, help="target checkpoint")
    p.add_argument("--guide", required=True, help="guide checkpoint")
    p.add_argument("--data", required=True, type=Path, help="JSONL: images, question, optional answer")
    p.add_argument("--keep-ratio", type=ratio_arg("--keep-ratio"), default=0.25)
    p.add_argument("--guide-max-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="the target's answer budget")
    p.add_argument("--fuse", default="mean", choices=["mean", "product", "confidence", "consistency"])
    p.add_argument("--consistency-ratio", type=ratio_arg("--consistency-ratio"), default=0.05)
    p.add_argument("--thresholds", type=thresholds, default="0:1:0.05",
                   help="LO:HI:STEP or a comma list, in [0, 1] (default 0:1:0.05)")
    p.add_argument("--min-agreement", type=unit_interval, default=0.95,
                   help="agreement in [0, 1] a recommended threshold must reach (default 0.95)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--out-dir", type=Path, default=Path("out/calibrate"))


def main(args) -> int:
    items = load_items(args.data)
    grid = args.thresholds
    scored, sec_per_req, guide_sec = run_engine(args, items)
    rows = table(scored, grid, sec_per_req, guide_sec)
    best = recommend(rows, args.min_agreement)
    print(f"{len(items)} requests, {sum(s.score is not None for s in scored)} SEE candidates; "
          f"{sec_per_req:.3f} s/request, the guide {guide_sec:.3f} s of it")
    ref = "guide_accuracy" in rows[0]
    print(f"{'threshold':>9} {'exit rate':>9} {'agreement':>9} {'speed-up':>8}"
          + (f" {'guide acc':>9} {'target acc':>10} {'acc w/ SEE':>10} {'acc target':>10}" if ref else ""))
    for r in rows:
        line = (f"{r['threshold']:>9.3g} {r['exit_rate']:>9.2f} {_fmt(r['agreement'], '>9.2f')} "
                f"{r['expected_speedup']:>7.2f}x")
        if ref:
            line += (f" {_fmt(r['guide_accuracy'], '>9.2f')} {_fmt(r['target_accuracy'], '>10.2f')} "
                     f"{r['accuracy_with_see']:>10.2f} {r['accuracy_target_only']:>10.2f}")
        print(line)
    if best:
        print(f"recommended see_threshold: {best['threshold']:g} (exit rate {best['exit_rate']:.2f}, agreement "
              f"{best['agreement']:.2f} >= {args.min_agreement:g}, expected speed-up {best['expected_speedup']:.2f}x)")
    else:
        print(f"no threshold reaches agreement {args.min_agreement:g} with any exit: keep SEE off for this data")
    write(rows, best, args, args.out_dir, sec_per_req, guide_sec)
    return 0
