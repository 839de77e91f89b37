"""SGL engine settings: `--additional-config '{"sgl": {...}}'`, parsed and checked at start-up."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_sgl.pruning import FUSES, IMPORTANCES

CONFIG_KEY = "sgl"


class SGLConfigError(ValueError):
    """Invalid SGL settings; the message names the field and what is accepted."""


def parse_see_threshold(value: object, name: str, error=ValueError) -> float:
    """An exit-score threshold: a number in [0, 1] (scores are probabilities or their mean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise error(f"{name} must be a number in [0, 1] (or null: SEE off), got {value!r}")
    return float(value)


REQUEST_RATIO_KWARG = "sgl_keep_ratio"  # per request, through mm_processor_kwargs
MAX_DRAFT_TOKENS = 128  # vLLM's rejection sampler asserts at most this many draft tokens (MAX_SPEC_LEN)
# Per request, through mm_processor_kwargs: the request's own SEE threshold (null: SEE off for it).
SEE_THRESHOLD_KWARG = "sgl_see_threshold"
# Per request, through mm_processor_kwargs: how many guide-answer tokens to draft per step for it
# (0 = none; at most the engine's draft_tokens).
DRAFT_TOKENS_KWARG = "sgl_draft_tokens"
# Per request, through mm_processor_kwargs: the keep rule of the request's images (IMPORTANCES).
IMPORTANCE_KWARG = "sgl_importance"
# The per-request fields the scheduler reads from a request's image items (not the encoder's).
SCHEDULER_KWARGS = (SEE_THRESHOLD_KWARG, DRAFT_TOKENS_KWARG)
REQUEST_KWARGS = (REQUEST_RATIO_KWARG, IMPORTANCE_KWARG, *SCHEDULER_KWARGS)
# The fields the front end puts on image items for the scheduler and the guide: never the encoder's.
ITEM_KWARGS = (*SCHEDULER_KWARGS, IMPORTANCE_KWARG)


def parse_importance(value: object, name: str, error=ValueError) -> str:
    if value not in IMPORTANCES or not isinstance(value, str):
        raise error(f"{name} must be one of {', '.join(repr(i) for i in IMPORTANCES)}, got {value!r}")
    return value


def parse_request_ratio(value: object, error=ValueError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise error(f"mm_processor_kwargs.{REQUEST_RATIO_KWARG} must be a number in (0, 1], got {value!r}")
    return float(value)


def parse_draft_tokens(value: object, name: str, error=ValueError, most: int | None = None) -> int:
    """A draft length: an integer >= 0 (and <= `most`, the engine's draft_tokens, when given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{name} must be an integer >= 0 (0: no drafts), got {value!r}")
    if most is not None and value > most:
        raise error(
            f"{name} must be at most the server's draft_tokens ({most}), got {value}"
            + (": drafting is off on this server (start it with the SGL setting draft_tokens > 0)" if most == 0 else "")
        )
    return value


def parse_request_fields(mm_kwargs, error=ValueError, draft_most: int | None = None) -> dict[str, float | int | None]:
    """The per-request SGL fields present in a request's mm_processor_kwargs, parsed (the SEE
    threshold may be None: SEE off for that request). The same check for every request, with or
    without images; `error` builds the exception from the message (a ValueError is a 400)."""
    out: dict[str, float | None] = {}
    if not mm_kwargs:
        return out
    for name in (REQUEST_RATIO_KWARG, IMPORTANCE_KWARG, DRAFT_TOKENS_KWARG):  # null: refused, not ignored
        if name in mm_kwargs and mm_kwargs[name] is None:
            raise error(f"mm_processor_kwargs.{name} is null; give a value, or leave the field out for the "
                        "server's setting (only sgl_see_threshold takes null: SEE off for that request)")
    if REQUEST_RATIO_KWARG in mm_kwargs:
        out[REQUEST_RATIO_KWARG] = parse_request_ratio(mm_kwargs[REQUEST_RATIO_KWARG], error)
    if IMPORTANCE_KWARG in mm_kwargs:
        out[IMPORTANCE_KWARG] = parse_importance(mm_kwargs[IMPORTANCE_KWARG], f"mm_processor_kwargs.{IMPORTANCE_KWARG}",
                                                 error)
    if SEE_THRESHOLD_KWARG in mm_kwargs:
        see = mm_kwargs[SEE_THRESHOLD_KWARG]
        out[SEE_THRESHOLD_KWARG] = (
            None if see is None else parse_see_threshold(see, f"mm_processor_kwargs.{SEE_THRESHOLD_KWARG}", error)
        )
    if DRAFT_TOKENS_KWARG in mm_kwargs:
        out[DRAFT_TOKENS_KWARG] = parse_draft_tokens(
            mm_kwargs[DRAFT_TOKENS_KWARG], f"mm_processor_kwargs.{DRAFT_TOKENS_KWARG}", error, draft_most
        )
    return out


@dataclass(frozen=True)
class SGLConfig:
    guide_model: str
    """Guide checkpoint (path or cached hub name); must tokenize images like the target."""
    keep_ratio: float = 0.25
    """Fraction of each image's visual tokens the target sees: k = max(1, floor(r * N))."""
    importance: str = "sgl"
    """Which visual tokens the guide's importance keeps: "sgl" (the paper's: the k most important)
    or "sgl-sdpp" (importance as the quality of a spatial DPP: the kept tokens spread over every
    region the guide attends to; docs/importance.md). Per request: mm_processor_kwargs.sgl_importance."""
    guide_max_tokens: int = 32
    """The guide's greedy answer budget; its decode rows count toward importance."""
    guide_max_batch: int = 32
    """Most requests the guide runs together in one engine step; with guide_step_tokens it sizes
    the guide's KV and query workspace (README: memory)."""
    guide_step_tokens: int | None = None
    """Most guide prompt tokens (each image at its full N visual tokens) the guide reads in one
    engine step, and so the largest request an SGL engine admits (a larger one is a 400 naming it):
    the guide reads a request whole. It sizes the guide's workspace. None: max_num_batched_tokens
    (the target's own per-step budget; set this higher to admit larger images while the target's
    prefill stays chunked smaller)."""
    importance_backend: str = "auto"
    """auto: fused Triton kernel on CUDA, its PyTorch definition elsewhere; or torch / triton."""
    trace_path: str | None = None
    """Append one JSON line per finished request (keep sets, guide answer, prompt lengths, SEE)."""
    see_threshold: float | None = None
    """Early exit (SEE): a request whose fused exit score reaches this answers with the guide's
    answer and the target does no work for it. None: SEE off."""
    see_consistency_ratio: float = 0.05
    """The guide's consistency pass keeps the top max(1, floor(r * N)) visual tokens of its ranking."""
    see_fuse: str = "mean"
    """How confidence and consistency make the exit score: mean, product, confidence, consistency."""
    see_score_only: bool = False
    """Score every request that could exit (trace: see_*), but let none exit: the target answers
    all of them (`vllm-sgl calibrate` runs this way to choose a threshold)."""

    draft_tokens: int = 0
    """Speculative decoding with the guide's answer as the draft: up to this many of its tokens are
    proposed per step while the target's output still equals the answer's prefix, and the target
    verifies them in one forward (vllm_sgl.engine.draft). 0: off."""

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "SGLConfig":
        if isinstance(additional_config, str):
            additional_config = json.loads(additional_config)
        raw = (additional_config or {}).get(CONFIG_KEY)
        if raw is None:
            raise SGLConfigError(
                '--model-impl sgl needs --additional-config \'{"sgl": {"guide_model": PATH}}\' '
                "(missing additional_config.sgl)"
            )
        if not isinstance(raw, dict):
            raise SGLConfigError(f"additional_config.sgl must be an object, got {type(raw).__name__}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "SGLConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise SGLConfigError(
                f"unknown SGL setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields))}"
            )
        if "guide_model" not in raw or not raw["guide_model"]:
            raise SGLConfigError("SGL setting guide_model is required (path or name of the guide VLM)")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
            raise SGLConfigError(f"SGL setting keep_ratio must be a number in (0, 1], got {r!r}")
        parse_importance(self.importance, "SGL setting importance", SGLConfigError)
        m = self.guide_max_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise SGLConfigError(f"SGL setting guide_max_tokens must be an integer >= 1, got {m!r}")
        b = self.guide_max_batch
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise SGLConfigError(f"SGL setting guide_max_batch must be an integer >= 1, got {b!r}")
        t = self.guide_step_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise SGLConfigError(f"SGL setting guide_step_tokens must be an integer >= 1 (or null: "
                                 f"max_num_batched_tokens), got {t!r}")
        if self.importance_backend not in ("auto", "torch", "triton"):
            raise SGLConfigError(
                f"SGL setting importance_backend must be auto, torch or triton, got {self.importance_backend!r}"
            )
        if self.see_threshold is not None:
            parse_see_threshold(self.see_threshold, "SGL setting see_threshold", SGLConfigError)
        c = self.see_consistency_ratio
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < c <= 1.0):
            raise SGLConfigError(f"SGL setting see_consistency_ratio must be a number in (0, 1], got {c!r}")
        if not isinstance(self.see_score_only, bool):
            raise SGLConfigError(f"SGL setting see_score_only must be true or false, got {self.see_score_only!r}")
        if self.see_fuse not in FUSES:
            raise SGLConfigError(f"SGL setting see_fuse must be one of {', '.join(FUSES)}, got {self.see_fuse!r}")
        parse_draft_tokens(self.draft_tokens, "SGL setting draft_tokens", SGLConfigError)
        if self.draft_tokens > MAX_DRAFT_TOKENS:
            raise SGLConfigError(
                f"SGL setting draft_tokens must be at most {MAX_DRAFT_TOKENS} (vLLM's rejection sampler), got {self.draft_tokens}"
            )
        if self.draft_tokens > self.guide_max_tokens:
            raise SGLConfigError(
                f"SGL setting draft_tokens ({self.draft_tokens}) must be at most guide_max_tokens "
                f"({self.guide_max_tokens}): the guide's answer is the draft"
            )
        if self.trace_path is not None:
            parent = Path(self.trace_path).expanduser().resolve().parent
            if not parent.is_dir():
                raise SGLConfigError(f"SGL setting trace_path: directory {parent} does not exist")

    def check_pair(self, target_model: str) -> Path:
        """Resolve the guide and check it against the target; returns the guide's directory."""
        from vllm_sgl.pair import PairError, check_pair, resolve_model_dir

        try:
            guide = resolve_model_dir(self.guide_model, "guide_model")
            target = resolve_model_dir(target_model, "target")
            check_pair(guide, target)
        except PairError as e:
            raise SGLConfigError(f"SGL setting guide_model: {e}") from None
        return guide

    def step_tokens(self, scheduler_config) -> int:
        """guide_step_tokens, or the engine's max_num_batched_tokens."""
        return int(self.guide_step_tokens or scheduler_config.max_num_batched_tokens)

    def hash_salt(self) -> str:
        """What, besides the prompt and images, decides a keep set (for cache keys)."""
        return f"{os.path.realpath(self.guide_model)}|{self.guide_max_tokens}"
