"""Where a keep set's budget goes on the shapes task: the share of kept tokens on objects, the
coverage of the objects the answer needs (and, for lists, of every object), and the kept share by
token row, for SGL's keep sets, the baselines (benchmarks/baselines.py) and an oracle that keeps
every object token. A diagnostic of keep sets only (no answers; benchmarks/quality.py measures
accuracy); it reads baselines.py's captures of the pair given, keyed by its weights.

    .venv/bin/python benchmarks/ranking_study.py --split test --examples 200 --ratios 0.1,0.05 \
        --methods sgl,sgl-sdpp,fastv,divprune,cdpruner,visionzip,random,oracle-objects-spread --out out/budget

(It was a wider study of rankings while issue 33 ran: its candidate rankings, their search and
evaluation were removed once the shipped rule and quality.py covered them; see git history before
this file's rewrite for them and benchmarks/figures/ranking-study-2026-12-0{4,5}/ for their results.)
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import baselines as bl  # noqa: E402

from vllm_sgl.pruning import keep_count  # noqa: E402
from vllm_sgl.tasks import shapes  # noqa: E402

GRID_TOKENS = bl.GRID_TOKENS


def log(msg: str) -> None:
    print(f"[budget] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Geometry of the task: which visual tokens an object covers


def cell_tokens(row: int, col: int, side: int = GRID_TOKENS) -> list[int]:
    """The 2 x 2 merged visual tokens of one 56 px cell (row-major token order)."""
    return [(2 * row + dr) * side + 2 * col + dc for dr in (0, 1) for dc in (0, 1)]


def object_mask(objects, n: int = GRID_TOKENS * GRID_TOKENS) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    for r, c, *_ in objects:
        m[cell_tokens(r, c)] = True
    return m


def asked_objects(c: dict) -> list[tuple]:
    """The objects the answer depends on: every object for lists, the one named for the others
    (exists: the matching object if there is one, else none)."""
    objs, q, kind = c["objects"], c["question"].lower().rstrip("?."), c["kind"]
    if kind == "list":
        return list(objs)
    if kind == "color":  # What color is the {shape}
        shape = q.split()[-1]
        return [o for o in objs if o[3] == shape]
    if kind == "shape":  # What shape is the {color} object
        color = q.split()[-2]
        return [o for o in objs if o[2] == color]
    color, shape = q.split()[-2:]  # exists / where: ... {color} {shape}
    return [o for o in objs if o[2] == color and o[3] == shape]



# ----------------------------------------------------------------------------------------------
# Keep sets: the baselines', SGL's, and the oracle's


def oracle_objects(c, k, spread):
    """A diagnostic, not a ranking anyone can deploy: the ground-truth object tokens first (every
    token of every object in the image, by the guide's importance if they do not all fit), the rest
    spread evenly over the image (spread=True) or by the guide's importance. Asks whether any
    choice of 25 tokens lets this target answer, e.g. lists, when pruned at its input."""
    imp = c["g_importance"]
    on = object_mask(c["objects"], c["n"])
    objs = sorted(torch.nonzero(on).flatten().tolist(), key=lambda j: -float(imp[j]))[:k]
    taken = set(objs)
    rest = [j for j in range(c["n"]) if j not in taken]
    r = k - len(objs)
    if r <= 0:
        return sorted(objs)
    if spread:
        extra = [rest[int(len(rest) * t / r)] for t in range(r)]
    else:
        extra = sorted(rest, key=lambda j: -float(imp[j]))[:r]
    return sorted(objs + extra)


ORACLES = {"oracle-objects": False, "oracle-objects-spread": True}


def keep_for(name: str, c: dict, k: int) -> torch.Tensor:
    if name in ORACLES:
        return torch.as_tensor(oracle_objects(c, k, ORACLES[name]))
    return bl.keep(name, c, k).indices


# ----------------------------------------------------------------------------------------------
# Budget: where the kept tokens go


def budget_stats(cs: list[dict], name: str, ratio: float) -> dict:
    """Share of kept tokens on object cells (all, per kind), kept tokens per token row (share of
    the k), and coverage of the objects the answer needs (>= 1 token, all 4 tokens; lists: every
    object with >= 1 token)."""
    rows = torch.zeros(GRID_TOKENS)
    on = defaultdict(lambda: [0, 0])
    cov1 = defaultdict(lambda: [0, 0])
    cov4 = defaultdict(lambda: [0, 0])
    list_all = [0, 0]
    for c in cs:
        k = keep_count(c["n"], ratio)
        keep = keep_for(name, c, k)
        m = object_mask(c["objects"])
        kept = set(keep.tolist())
        for j in kept:
            rows[j // GRID_TOKENS] += 1
        for kind in ("all", c["kind"]):
            on[kind][0] += int(m[keep].sum())
            on[kind][1] += k
        for o in asked_objects(c):
            n_in = sum(t in kept for t in cell_tokens(o[0], o[1]))
            for kind in ("all", c["kind"]):
                cov1[kind][0] += n_in >= 1
                cov1[kind][1] += 1
                cov4[kind][0] += n_in == 4
                cov4[kind][1] += 1
        if c["kind"] == "list":
            list_all[0] += all(any(t in kept for t in cell_tokens(o[0], o[1])) for o in c["objects"])
            list_all[1] += 1
    frac = lambda a: a[0] / a[1] if a[1] else float("nan")  # noqa: E731
    res = {"method": name, "ratio": ratio, "on_object": frac(on["all"])}
    for kind in shapes.KINDS:
        res[f"on_object_{kind}"] = frac(on[kind])
    res["object_token_share"] = sum(4 * len(c["objects"]) for c in cs) / sum(c["n"] for c in cs)
    res["asked_covered_1"] = frac(cov1["all"])
    res["asked_covered_4"] = frac(cov4["all"])
    for kind in shapes.KINDS:
        res[f"asked_covered_1_{kind}"] = frac(cov1[kind])
    res["list_every_object"] = frac(list_all)
    for r in range(GRID_TOKENS):
        res[f"row{r}"] = float(rows[r] / rows.sum())
    return res




def cmd_budget(args) -> None:
    from vllm_sgl.demo import resolve_pair

    runner = bl.Runner(*resolve_pair(str(args.pair_dir) if args.pair_dir else None), threads=args.threads)
    cs = [runner.capture(args.split, i, e) for i, e in enumerate(shapes.split_examples(args.split, args.examples))]
    rows = [budget_stats(cs, m, r) for m in args.methods for r in args.ratios]
    args.out.mkdir(parents=True, exist_ok=True)
    f = args.out / f"budget-{args.split}.csv"
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    print(f"{'method':<18}{'ratio':>6}{'on obj':>8}{'asked>=1':>9}{'asked=4':>8}{'list all':>9}  kept share by token row 0..15")
    for r in rows:
        print(f"{r['method']:<18}{r['ratio']:>6g}{r['on_object']:>8.3f}{r['asked_covered_1']:>9.3f}{r['asked_covered_4']:>8.3f}"
              f"{r['list_every_object']:>9.3f}  " + " ".join(f"{r[f'row{i}']:.2f}" for i in range(GRID_TOKENS)))
    log(f"wrote {f}")



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--pair-dir", type=Path, default=None, help="a guide/target pair (default: the trained shapes pair)")
    p.add_argument("--ratios", default="0.1,0.05")
    p.add_argument("--methods", default="sgl,sgl-sdpp,fastv,divprune,cdpruner,visionzip,random,oracle-objects-spread")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/budget"))
    args = p.parse_args(argv)
    args.ratios = sorted({float(x) for x in args.ratios.split(",")}, reverse=True)
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in bl.METHODS and m not in ORACLES]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {sorted(bl.METHODS) + sorted(ORACLES)}")
    cmd_budget(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
