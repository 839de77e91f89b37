"""Train one checkpoint of the shapes pair from scratch, with transformers' own model class.

    python -m vllm_sgl.tasks.train --role guide  --steps 1600 --grids 2:500,4:1000,8 --max-turns 6 --out out/train
    python -m vllm_sgl.tasks.train --role target --steps 750 --grids 2:300,4:600,8 --max-turns 6 --out out/train
    python -m vllm_sgl.tasks.train --role target --device cuda --workers 7 --batch 32 --seconds 300 \
        --init vllm_sgl/tasks/weights/shapes_target.safetensors --steps 100000 --out out/train   # a GPU

Each run writes OUT/ROLE/ (a complete checkpoint), OUT/ROLE.safetensors (fp16 weights, what
vllm_sgl/tasks/weights holds) and OUT/ROLE.log.jsonl (loss and validation accuracy). The two roles
are independent processes (one thread each on a 2-core machine). Nothing here depends on a keep set:
both models see every visual token.

Besides the answers, an auxiliary head (dropped after training) reads each visual token as the
language model receives it (the vision tower's merged output) and predicts the colour and shape
of the object in its grid cell, or none: dense supervision from the scene itself, so the tower
learns what is where before the language model has to find it. Without it, 6000 images of answer
loss alone left both models at chance (validation exact match 0.17-0.27, the answer priors).

Each training image carries 1-N questions as turns of one conversation (the first turn is exactly
the evaluation prompt); the vision tower and the 256 visual tokens are paid once per image for all
of them. Loss on the answer tokens and their end-of-turn only. Validation: teacher-forced exact match
(every answer token the argmax), which equals greedy decoding's exact match.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from vllm_sgl.tasks import shapes
from vllm_sgl.tiny import SHAPES_SPEC, guide_family, pair_parts, save_checkpoint


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def conversation(example: shapes.Example, turns: list[tuple[str, str]]) -> list[dict]:
    """The image and the first question in one user turn, then one user/assistant pair per question."""
    msgs: list[dict] = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


class Batcher:
    """Tokenized batches with labels on the assistant turns (their answer and end-of-turn)."""

    def __init__(self, parts):
        self.processor = parts.processor
        tok = parts.tokenizer
        tok.padding_side = "right"
        self.header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.im_end = parts.ids["<|im_end|>"]

    def __call__(self, examples: list[shapes.Example], turns: list[list[tuple[str, str]]]):
        texts = [self.processor.apply_chat_template(conversation(e, t), tokenize=False) for e, t in zip(examples, turns)]
        enc = self.processor(text=texts, images=[e.image for e in examples], return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        labels = torch.full_like(ids, -100)
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        h = len(self.header)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            i = 0
            while i + h <= len(row):
                if row[i:i + h] == self.header:
                    j = i + h
                    while j < len(row) and row[j] != self.im_end:
                        j += 1
                    labels[b, i + h:j + 1] = ids[b, i + h:j + 1]
                    weights[b, i + h:j + 1] = (j + 1 - i - h) ** -0.5
                    i = j
                i += 1
        enc["labels"] = labels
        enc["weights"] = weights
        return enc


CELL_TOKENS = shapes.CELL // 28  # merged visual tokens per cell side (2 for Qwen2.5-VL)


def cell_labels(examples: list[shapes.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per visual token (images concatenated, row-major), the colour and shape class of the object
    in its cell (0: none)."""
    colors, shapes_ = list(shapes.COLORS), list(shapes.SHAPES)
    cols, shps = [], []
    for e in examples:
        side = e.image.width // 28  # merged tokens per image side (16 on the task's images)
        col = torch.zeros(side, side, dtype=torch.long)
        shp = torch.zeros_like(col)
        for o in e.objects:
            r, c = o.row * CELL_TOKENS, o.col * CELL_TOKENS
            col[r:r + CELL_TOKENS, c:c + CELL_TOKENS] = colors.index(o.color) + 1
            shp[r:r + CELL_TOKENS, c:c + CELL_TOKENS] = shapes_.index(o.shape) + 1
        cols.append(col.flatten())
        shps.append(shp.flatten())
    return torch.cat(cols), torch.cat(shps)


class CellHead(torch.nn.Module):
    """The auxiliary per-token reader (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.color = torch.nn.Linear(hidden, len(shapes.COLORS) + 1)
        self.shape = torch.nn.Linear(hidden, len(shapes.SHAPES) + 1)

    def loss(self, feats: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        f = feats.float()
        ce = torch.nn.functional.cross_entropy
        return ce(self.color(f), labels[0]) + ce(self.shape(f), labels[1])


def align_targets(cells: tuple[torch.Tensor, torch.Tensor], embed: torch.nn.Embedding, tokenizer,
                  pad_id: int) -> torch.Tensor:
    """Per visual token, the embedding of its cell's words (colour + shape) or of the pad token:
    visual tokens that look like the question's words to the language model, so one attention hop
    that finds "circle" in the question also finds the circle in the image. `cells`: cell_labels."""
    colors, shapes_ = cells
    ids = {w: tokenizer.encode(" " + w, add_special_tokens=False) for w in list(shapes.COLORS) + list(shapes.SHAPES)}
    assert all(len(v) == 1 for v in ids.values()), ids
    w = embed.weight.detach()
    color_rows = torch.stack([w[pad_id]] + [w[ids[c][0]] for c in shapes.COLORS])
    shape_rows = torch.stack([w[pad_id] * 0] + [w[ids[s][0]] for s in shapes.SHAPES])
    return color_rows[colors] + shape_rows[shapes_]


def weighted_loss(model, enc) -> torch.Tensor:
    """Cross-entropy on the answer tokens, each answer's tokens weighted 1/sqrt(its length): a
    20-token list answer would otherwise outweigh twenty one-word answers, and the one-word kinds
    are where the model first learns to find an object."""
    labels, weights = enc.pop("labels"), enc.pop("weights")
    logits = model(**enc).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    w = weights[:, 1:]
    return (ce * w).sum() / w.sum()


def make_turns(example: shapes.Example, max_turns: int, rng: random.Random) -> list[tuple[str, str]]:
    extra = shapes.extra_questions(example, rng.randint(0, max_turns - 1), rng.randrange(2**31))
    return [(example.question, example.answer)] + extra


class Steps(torch.utils.data.Dataset):
    """Step `i`'s batch, the same whichever process builds it (its examples, kinds and extra turns
    follow from the seed and the step alone): with --workers, DataLoader worker processes draw and
    tokenize the images while the model trains, which is what keeps a GPU busy."""

    def __init__(self, args, batcher: Batcher, steps: int):
        self.args, self.batcher, self.steps = args, batcher, steps
        self.grids = parse_grids(args.grids)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        a = self.args
        rng = random.Random(a.seed * 1_000_003 + step)
        max_objects, kinds = curriculum(step, self.steps, a.curriculum)
        kinds = a.kinds or kinds
        grid = grid_at(step, self.grids)
        index = a.seed * 10**7 + step * a.batch  # each seed trains on its own slice of the train split
        examples = [shapes.make_example(shapes.example_seed("train", index + i),
                                        rng.choice(kinds) if kinds else None, max_objects=max_objects, grid=grid)
                    for i in range(a.batch)]
        enc = dict(self.batcher(examples, [make_turns(e, a.max_turns, rng) for e in examples]))
        enc["cell_colors"], enc["cell_shapes"] = cell_labels(examples)
        enc["grid"] = torch.tensor(grid)
        return enc


def loader(dataset: Steps, start: int, workers: int):
    """Steps start.. in order; built ahead by `workers` processes (0: in this one)."""
    kw = dict(num_workers=workers, prefetch_factor=4, persistent_workers=False) if workers else {}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), **kw)


@torch.no_grad()
def exact_match(model, batcher: Batcher, examples: list[shapes.Example], batch: int = 16) -> dict:
    """Teacher-forced exact match per kind on single-turn prompts."""
    model.eval()
    right: dict[str, list[int]] = {}
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        enc = batcher(chunk, [[(e.question, e.answer)] for e in chunk]).to(model.device)
        labels = enc.pop("labels")
        enc.pop("weights")
        logits = model(**enc).logits[:, :-1]
        target = labels[:, 1:]
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(dim=1)
        for e, o in zip(chunk, ok.tolist()):
            right.setdefault(e.kind, []).append(int(o))
    model.train()
    per_kind = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    total = sum(sum(v) for v in right.values()) / max(1, sum(len(v) for v in right.values()))
    return {"all": total, **per_kind}


SIMPLE_KINDS = ("color", "shape", "exists", "where")


def curriculum(step: int, steps: int, fraction: float) -> tuple[int, tuple[str, ...] | None]:
    """(most objects per scene, kinds) at a step. For the first 40% of `fraction` of the steps,
    single-object scenes and one-word questions: the answer is wherever the one object is, so
    attention learns to find objects (measured: colour questions on single objects went from chance
    to loss 0.1 in 160 steps, where the full mixture, its loss dominated by long list answers, stayed
    at chance for 6000 images). Then scenes grow to the task's 2-6 objects and every kind."""
    if fraction <= 0:
        return 6, None
    t = step / (fraction * steps)
    if t < 0.4:
        return 1, SIMPLE_KINDS
    return (6 if t >= 1 else min(6, 2 + int((t - 0.4) / 0.6 * 5))), None


def parse_grids(spec: str) -> list[tuple[int, int]]:
    """`--grids "2:150,4:600,8"` -> [(2, 150), (4, 600), (8, inf)]: the grid side up to each step."""
    out = []
    for part in spec.split(","):
        grid, _, until = part.partition(":")
        if int(grid) not in (2, 4, 6, 8):
            raise ValueError(f"--grids: grid side {grid!r}; accepted: 2, 4, 6, 8")
        out.append((int(grid), int(until) if until else 10**12))
    return out


def grid_at(step: int, grids: list[tuple[int, int]]) -> int:
    """Small images first: with 16 or 64 visual tokens instead of 256, a question's object is one of
    few candidates, so the attention that finds it gets a gradient 4-16x stronger (each token's
    share of a uniform attention) and a step costs a fraction; the cells and objects are the
    task's own."""
    for grid, until in grids:
        if step < until:
            return grid
    return shapes.GRID


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    spec = SHAPES_SPEC
    parts = pair_parts(spec)
    fam = guide_family(parts.family) if args.role == "guide" else parts.family
    model = fam.hf_model_cls(parts.config(spec, args.role)).to(torch.float32)
    if args.init:
        load_weights(model, Path(args.init))
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = args.bf16 if args.bf16 is not None else (dev.type == "cuda" or torch.cpu._is_avx512_bf16_supported())
    _log(f"{args.role}: {n_params / 1e6:.1f}M parameters, {args.steps} steps x {args.batch} images, lr {args.lr}, "
         f"{dev}{' bf16' if bf16 else ''}, {args.workers} data workers")
    batcher = Batcher(parts)
    head = CellHead(model.config.text_config.hidden_size).to(dev)
    embed = model.get_input_embeddings()
    captured: list[torch.Tensor] = []
    # the merged visual tokens in image order, as the language model receives them
    model.model.visual.register_forward_hook(lambda mod, inp, out: captured.append(out.pooler_output))
    params = list(model.named_parameters()) + list(head.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2]
    other = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    val = shapes.split_examples("validation", args.val_examples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{args.role}.log.jsonl"
    log = log_path.open("w")
    steps = args.steps
    warmup = max(1, steps // 20)
    data = Steps(args, batcher, steps)
    batches = iter(loader(data, 0, args.workers))
    val_small: dict[int, list[shapes.Example]] = {}
    t0 = time.time()
    loss_avg = None
    step = 0
    while step < steps:
        enc = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
        cells = (enc.pop("cell_colors"), enc.pop("cell_shapes"))
        grid = int(enc.pop("grid"))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup)
        captured.clear()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            answer_loss = weighted_loss(model, enc)
            aux = head.loss(captured[0], cells) if args.aux_weight else answer_loss.new_zeros(())
            if args.align_weight:
                target = align_targets(cells, embed, parts.tokenizer, parts.ids["<|endoftext|>"])
                feats, target = captured[0].float(), target.float()
                # per token ||f - t||^2 / (||f||^2 + ||t||^2), background included: direction and
                # scale both, bounded in [0, 2] so it cannot swamp the answer loss while the
                # tower's features are still large
                err = (feats - target).pow(2).sum(-1) / (feats.pow(2).sum(-1) + target.pow(2).sum(-1)).clamp_min(1e-8)
                aux = aux + args.align_weight * err.mean()
            loss = answer_loss + args.aux_weight * aux
        captured.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = answer_loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * answer_loss.item()
        aux_avg = aux.item() if step == 0 else 0.95 * aux_avg + 0.05 * aux.item()
        if args.seconds and step + 1 == CALIBRATION_STEPS < steps:
            # a time budget: the schedule's length from the speed so far (the eval and the final
            # save inside the budget too); the data of the steps left is drawn for the new length
            per_step = (time.time() - t0) / (step + 1)
            fit = step + 1 + int((args.seconds * 0.92 - (time.time() - t0)) / per_step)
            if fit < steps:
                steps = max(step + 2, fit)
                warmup = min(warmup, max(1, steps // 20))
                data = Steps(args, batcher, steps)
                batches = iter(loader(data, step + 1, args.workers))
                _log(f"{args.role}: {per_step * 1e3:.0f} ms per step: {steps} steps fit in {args.seconds:.0f} s")
        last = step + 1 == steps
        if (step + 1) % args.log_every == 0 or last:
            rec = {"step": step + 1, "loss": round(loss_avg, 4), "aux_loss": round(aux_avg, 4), "lr": opt.param_groups[0]["lr"], "grid": grid,
                   "seconds": round(time.time() - t0, 1)}
            if (step + 1) % args.eval_every == 0 or last:
                if grid != shapes.GRID:  # what it has learnt on the images it trains on now
                    if grid not in val_small:
                        val_small[grid] = [shapes.make_example(shapes.example_seed("validation", i), grid=grid)
                                           for i in range(args.val_examples)]
                    rec[f"val_exact_grid{grid}"] = exact_match(model, batcher, val_small[grid])
                    _log(f"{args.role} step {step + 1} grid {grid} val {json.dumps(rec[f'val_exact_grid{grid}'])}")
                rec["val_exact"] = exact_match(model, batcher, val)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            eta = (time.time() - t0) / (step + 1) * (steps - step - 1)
            _log(f"{args.role} step {step + 1}/{steps} loss {loss_avg:.3f} aux {aux_avg:.3f} "
                 f"{'val ' + json.dumps(rec['val_exact']) + ' ' if 'val_exact' in rec else ''}"
                 f"({rec['seconds']:.0f} s, eta {eta / 60:.1f} min)")
        if args.save_every and (step + 1) % args.save_every == 0 and not last:
            save_weights(model, out / f"{args.role}.safetensors")
        step += 1
    model.eval()
    save_weights(model, out / f"{args.role}.safetensors")
    save_checkpoint(out / args.role, model.cpu(), parts, moe=fam.moe)
    model.to(dev)
    result = {"role": args.role, "steps": steps, "batch": args.batch, "seconds": round(time.time() - t0, 1),
              "parameters": n_params, "device": str(dev), "val_exact": exact_match(model, batcher, val)}
    log.write(json.dumps({"final": result}) + "\n")
    log.close()
    _log(f"done: {json.dumps(result)}")
    return result


CALIBRATION_STEPS = 30  # steps timed before --seconds sets the schedule's length


def load_weights(model, path: Path) -> None:
    """Start from an earlier run's OUT/ROLE.safetensors (the same spec and role): a run continues
    where a stopped one left off, with its own schedule (the auxiliary head starts afresh)."""
    from safetensors.torch import load_file

    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a checkpoint of this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _log(f"initialised from {path}")


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"weights overflow fp16: {bad[:3]}")
    save_file(weights, str(path), metadata={"format": "pt"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("guide", "target"), required=True)
    p.add_argument("--out", default="out/train")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--max-turns", type=int, default=4, help="questions per image, 1..N")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate. Measured on colour questions over 2 x 2 cells: 5e-4 learnt "
                        "them (loss 0.50 -> 0.10 in 1000 steps), 1.5e-3 did not in 2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from these weights (an earlier run's OUT/ROLE.safetensors)")
    p.add_argument("--kinds", type=lambda s: s.split(","), default=None, help="train on these kinds only")
    p.add_argument("--curriculum", type=float, default=0.5,
                   help="fraction of the steps over which scenes grow from 1 object (simple kinds) to the "
                        "task's 2-6 objects and every kind (0: off)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-token cell loss (0: off)")
    p.add_argument("--align-weight", type=float, default=1.0,
                   help="weight of the loss that aligns each visual token with its cell's word embeddings (0: off)")
    p.add_argument("--grids", default="8",
                   help="image sizes over the run as GRID:UNTIL_STEP,...; e.g. 2:150,4:600,8 trains on 2 x 2 "
                        "cells (112 px) to step 150, then 4 x 4 (224 px) to step 600, then the task's 8 x 8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw and tokenize the batches ahead of the model (0: the training process)")
    p.add_argument("--seconds", type=float, default=0,
                   help="time budget: after the first steps the schedule (learning rate, curriculum, grids) is "
                        "shortened to the steps that fit, --steps at most (0: run --steps)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (fp32 weights and optimizer). Default: on CUDA, and on a CPU with "
                        "AVX512-BF16 (measured 58 vs 8.6 GFLOP/s fp32 on one Xeon core); off elsewhere, where it "
                        "is emulated (a guide step took 68 s against 3 s in fp32 on an AVX2 EPYC)")
    p.add_argument("--val-examples", type=int, default=160)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.max_turns < 1 or args.workers < 0 or args.seconds < 0:
        p.error("--steps, --batch and --max-turns must be >= 1, --workers and --seconds >= 0")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
