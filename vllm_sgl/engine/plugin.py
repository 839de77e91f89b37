"""vLLM general plugin: routes `--model-impl sgl` to the SGL wrappers. Loaded by the front end,
the engine core and every worker, so everything here is idempotent.

vLLM's registry knows nothing of "sgl" (it falls through to the checkpoint's own architecture), so
the plugin wraps the registry's two lookups and, for model_impl == "sgl", answers with the SGL
wrapper of the checkpoint's family. Settings are checked in VllmConfig.__post_init__, i.e. when
the engine is configured, before any weights load or request arrives.

vLLM calls every general plugin without a guard, so a plugin that raises takes every `vllm serve`
down, SGL or not. register() never raises: on a vLLM that lacks a hook point SGL needs it installs
nothing else, logs one line naming the installed and the tested releases, and `--model-impl sgl`
becomes a start-up error saying the same; vanilla serving is untouched.
"""

from __future__ import annotations

import functools
import logging

from vllm_sgl.engine import runners
from vllm_sgl.engine.runners import TESTED_VLLM
from vllm_sgl.families import FAMILIES

logger = logging.getLogger("vllm_sgl")

MODEL_IMPL = "sgl"
# SGL wrapper architecture name per supported target architecture (one place: families.py).
SGL_ARCHS = {f.architecture: f"SGL{f.architecture}" for f in FAMILIES.values()}

_PATCHED = "__vllm_sgl_patched__"
# Why SGL is off in this process (None: on): set by register() when this vLLM cannot run it.
_UNAVAILABLE: str | None = None


def _sgl_architectures(architectures, model_config):
    """The SGL wrapper for a supported target; anything else unchanged (the wrappers build their
    inner language model through the registry with the same model_impl)."""
    if getattr(model_config, "model_impl", None) != MODEL_IMPL:
        return architectures
    archs = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for arch in archs:
        if arch in SGL_ARCHS:
            return [SGL_ARCHS[arch]]
    return architectures


def check_supported_target(model_config) -> None:
    archs = list(getattr(model_config, "architectures", None) or [])
    if not any(a in SGL_ARCHS or a in SGL_ARCHS.values() for a in archs):
        raise ValueError(
            f"--model-impl sgl does not support architecture(s) {archs}; "
            f"supported targets: {', '.join(SGL_ARCHS)}"
        )


def _positions_through_mrope(model_config) -> None:
    """A 1D-RoPE target (InternVL): its kept tokens keep their unpruned positions, which vLLM only
    takes from a model through the M-RoPE channel. A top-level `mrope_section` on its config turns
    that channel on (ModelConfig.uses_mrope) without touching the language model's RoPE; the
    wrapper hands the language model one row of three equal ones."""
    hf_config = model_config.hf_config
    family = _target_family(model_config)
    if family is not None and not family.mrope and getattr(hf_config, "mrope_section", None) is None:
        text = hf_config.get_text_config()
        half = (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) // 2
        hf_config.mrope_section = [half, 0, 0]  # every frequency rotates with the first row


def _target_family(model_config):
    archs = list(getattr(model_config.hf_config, "architectures", None) or [])
    return next((f for f in FAMILIES.values() if f.architecture in archs), None)


def _no_video_pruning(model_config) -> None:
    """vLLM's video pruning (video_pruning_rate: EVS, VidCom2) and SGL do not compose: EVS picks a
    video's tokens from the target's own vision features inside embed_multimodal, after the guide
    phase, which must know the tokens it ranks before the target encodes anything. Both prune the
    same video tokens, so the combination is a start-up error naming both (SGL prunes videos itself
    at keep_ratio; docs/VIDEO.md)."""
    from vllm_sgl.engine.config import SGLConfigError

    mm = getattr(model_config, "multimodal_config", None)
    if mm is not None and mm.is_multimodal_pruning_enabled():
        raise SGLConfigError(f"--model-impl sgl cannot combine with video_pruning_rate={mm.video_pruning_rate} "
                             "(vLLM's EVS video token pruning): SGL prunes video tokens itself, by the guide's "
                             "ranking at keep_ratio; use one of the two (leave video_pruning_rate unset for SGL)")


def _check_encoder_cudagraphs(vllm_config) -> None:
    """vLLM's encoder CUDA graphs replace the model's embed_multimodal, where the kept rows are
    gathered and their positions appended: refused rather than silently unpruned."""
    from vllm_sgl.engine.config import SGLConfigError

    if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
        raise SGLConfigError("--model-impl sgl cannot use compilation_config.cudagraph_mm_encoder=True (encoder CUDA "
                             "graphs bypass the wrapper's embed_multimodal, where images are pruned); leave it off")


def _drafts_from_settings() -> None:
    """draft_tokens > 0 is vLLM's speculative decoding with the guide's answer as the proposer
    (vllm_sgl.engine.draft; the runner adapter names vLLM's method for it): the engine arguments get
    its speculative_config, so everything vLLM derives from one (KV slots, sampler, metrics)
    follows."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        if getattr(target_model_config, "model_impl", None) == MODEL_IMPL and _UNAVAILABLE is None:
            from vllm_sgl.engine.config import SGLConfig, SGLConfigError

            cfg = SGLConfig.from_additional_config(self.additional_config)
            wanted = runners.select().speculative_config(cfg.draft_tokens)
            if wanted is not None:
                given = self.speculative_config
                if given == wanted:
                    given = None  # ours, from an earlier call
                if given is not None or self.spec_method or self.spec_model or self.spec_tokens:
                    raise SGLConfigError(
                        "the SGL setting draft_tokens drafts with the guide's answer through vLLM's "
                        "speculative decoding; leave speculative_config (--spec-*) unset with it, or set draft_tokens to 0"
                    )
                self.speculative_config = dict(wanted)
        return original(self, target_model_config, target_parallel_config)

    setattr(create_speculative_config, _PATCHED, True)
    EngineArgs.create_speculative_config = create_speculative_config


def _drafts_stay_in_the_scheduler() -> None:
    """vLLM's engine core fetches every step's drafts from the workers (an RPC in post_step) when
    speculative decoding is on. Where the runner adapter makes the guide's drafts in the scheduler
    (V1: vllm_sgl.engine.draft) the workers hold nothing to fetch, so those SGL drafting engines
    skip it; on Model Runner V2 the worker's drafts are the ones vLLM schedules and verifies, and
    the fetch stays. (post_step, not __init__: the engine core loads plugins inside its own __init__.)"""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.post_step
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def post_step(self, *args, **kwargs):
        adapter = runners.select()
        if (self.check_for_draft_tokens and adapter.SCHEDULER_DRAFTS
                and adapter.is_guide_drafting(self.vllm_config.speculative_config)):
            self.check_for_draft_tokens = False
        return original(self, *args, **kwargs)

    setattr(post_step, _PATCHED, True)
    EngineCore.post_step = post_step


def _check_drafting(vllm_config, cfg) -> None:
    """A VllmConfig built without EngineArgs must still match draft_tokens."""
    from vllm_sgl.engine.config import SGLConfigError

    adapter = runners.select()
    spec = vllm_config.speculative_config
    ours = adapter.is_guide_drafting(spec)
    if cfg.draft_tokens and not (ours and spec.num_speculative_tokens == cfg.draft_tokens):
        raise SGLConfigError(
            f"the SGL setting draft_tokens={cfg.draft_tokens} needs speculative_config="
            f"{adapter.speculative_config(cfg.draft_tokens)} (EngineArgs sets it), got {spec}"
        )
    if ours and not cfg.draft_tokens:
        raise SGLConfigError(f"speculative_config {spec} drafts with the guide's answer: set the SGL setting "
                             "draft_tokens instead")


def check_parallel(vllm_config) -> None:
    """Pipeline parallelism needs the guide phase: a kept token's position must be known when the
    request reaches the workers, since later stages never run the encoder. KV and encoder-cache
    connectors take the encode-time fallback instead, so they are refused together with it."""
    from vllm_sgl.engine.config import SGLConfigError

    pp = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp > 1 and runners.select().is_guide_drafting(vllm_config.speculative_config):
        raise SGLConfigError(
            f"--model-impl sgl with pipeline_parallel_size={pp} cannot draft with the guide's answer "
            "(draft_tokens): untested with vLLM's pipeline batch queue. Set draft_tokens to 0, or use "
            "tensor parallelism"
        )
    connectors = [name for name in ("kv_transfer_config", "ec_transfer_config")
                  if getattr(vllm_config, name, None) is not None]
    if pp > 1 and connectors:
        raise SGLConfigError(
            f"--model-impl sgl with pipeline_parallel_size={pp} cannot use {' or '.join(connectors)}: "
            "with a connector the guide runs when images are encoded, on the first pipeline stage only. "
            "Use pipeline_parallel_size=1 (tensor or data parallelism) or no connector"
        )


def warn_if_untested_vllm(version: str | None = None) -> bool:
    """Logs a start-up warning when the running vLLM is not a release vllm-sgl was tested with.
    Returns whether it warned."""
    if version is None:
        import vllm

        version = vllm.__version__
    base = version.split("+", 1)[0]
    if base in TESTED_VLLM:
        return False
    logger.warning(
        "vllm-sgl is tested with vLLM %s, this is vLLM %s: --model-impl sgl may fail or misbehave "
        "(pip install vllm==%s)", ", ".join(TESTED_VLLM), version, TESTED_VLLM[-1],
    )
    return True


def warn_if_no_stat_logger() -> bool:
    """SGL's metrics reach /metrics through a stat logger plugin, found by its entry point: an
    install made before that entry point existed serves without them. Returns whether it warned."""
    from importlib.metadata import entry_points

    from vllm.plugins import STAT_LOGGER_PLUGINS_GROUP

    if any(ep.value.startswith("vllm_sgl.") for ep in entry_points(group=STAT_LOGGER_PLUGINS_GROUP)):
        return False
    logger.warning(
        "vllm-sgl's stat logger (entry point %s) is not installed: the vllm_sgl: metrics will be missing "
        "from /metrics; reinstall the package (pip install -e .)", STAT_LOGGER_PLUGINS_GROUP,
    )
    return True


def _is_inner_config(model_config) -> bool:
    """True for the configs vLLM derives from the top one (with_hf_config: the wrapper's inner
    language model), which are already checked."""
    if hasattr(model_config, "_vllm_sgl_config"):
        return True
    return getattr(getattr(model_config, "hf_config", None), "base_config_key", "") == "text_config"


SGL_SCHEDULERS = {False: "vllm_sgl.engine.scheduler.SGLScheduler", True: "vllm_sgl.engine.scheduler.SGLAsyncScheduler"}


def _use_sgl_scheduler(scheduler_config) -> None:
    """The guide phase lives in the scheduler (vllm_sgl.engine.scheduler), on top of vLLM's own."""
    from vllm_sgl.engine.config import SGLConfigError

    current = scheduler_config.scheduler_cls
    if current is not None and current not in SGL_SCHEDULERS.values():
        raise SGLConfigError(
            f"--model-impl sgl runs its own scheduler (guide phase); scheduler_cls={current!r} "
            "is not supported with it (leave scheduler_cls unset)"
        )
    scheduler_config.scheduler_cls = SGL_SCHEDULERS[bool(scheduler_config.async_scheduling)]


def _wrap_registry_lookup(cls, name: str) -> None:
    original = getattr(cls, name)
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def lookup(self, architectures, model_config, *args, **kwargs):
        return original(self, _sgl_architectures(architectures, model_config), model_config, *args, **kwargs)

    setattr(lookup, _PATCHED, True)
    setattr(cls, name, lookup)


def _wrap_vllm_config() -> None:
    from vllm.config import VllmConfig

    original_post_init = VllmConfig.__post_init__
    if getattr(original_post_init, _PATCHED, False):
        return

    @functools.wraps(original_post_init)
    def __post_init__(self, *args, **kwargs):
        original_post_init(self, *args, **kwargs)
        model_config = getattr(self, "model_config", None)
        if (
            model_config is not None
            and getattr(model_config, "model_impl", None) == MODEL_IMPL
            and not _is_inner_config(model_config)
        ):
            from vllm_sgl.engine.config import SGLConfig, SGLConfigError

            if _UNAVAILABLE is not None:
                raise SGLConfigError(f"--model-impl sgl is unavailable: {_UNAVAILABLE}")
            check_supported_target(model_config)
            _positions_through_mrope(model_config)
            _no_video_pruning(model_config)
            check_parallel(self)
            _check_encoder_cudagraphs(self)
            warn_if_untested_vllm()
            warn_if_no_stat_logger()
            cfg = SGLConfig.from_additional_config(self.additional_config)
            cfg.check_pair(model_config.model)
            _check_drafting(self, cfg)
            runners.select().configure(self, cfg)
            # The front end's multimodal processor sees only the model config; it needs the
            # keep ratio to emit k placeholders per image.
            object.__setattr__(model_config, "_vllm_sgl_config", cfg)
            # ... and the guide's per-step token budget, to refuse a request the guide cannot read in
            # one step (the scheduler's guide phase and the worker's workspace use the same number)
            object.__setattr__(model_config, "_vllm_sgl_guide_tokens", cfg.step_tokens(self.scheduler_config))
            _use_sgl_scheduler(self.scheduler_config)
            from vllm_sgl.engine.serve import install_request_error_fixes

            install_request_error_fixes()  # same answers under `vllm serve` and `vllm-sgl serve`

    setattr(__post_init__, _PATCHED, True)
    VllmConfig.__post_init__ = __post_init__


def _engine_cache_skips_sgl_images() -> None:
    """The engine core's side of vLLM's processor cache (the LRU receiver) stores every item it
    receives under the item's hash, for the front end to send a reference to next time. SGL image
    and video requests skip the front end's cache (their hash is salted with the prompt,
    SGLProcessorMixin.apply), so no reference to such an item ever comes: storing them only holds
    up to mm_processor_cache_gb of pixels per engine. For `--model-impl sgl` engines the receiver
    passes salted items through unstored; other items keep vLLM's caching."""
    from vllm.multimodal.cache.base import MultiModalCacheMissError
    from vllm.multimodal.cache.lru import LruKeyReplicatedReceiverCache
    from vllm.v1.engine import core

    from vllm_sgl.engine.protocol import HASH_MARK

    class SGLReceiverCache(LruKeyReplicatedReceiverCache):
        def get_and_update_item(self, mm_item, mm_hash):
            if HASH_MARK not in mm_hash:
                return super().get_and_update_item(mm_item, mm_hash)
            if mm_item is None:  # the front end never sends one without data: vLLM's retry path
                raise MultiModalCacheMissError([mm_hash])
            return mm_item

        def touch_receiver_cache_item(self, mm_hash, mm_item=None):
            if HASH_MARK not in mm_hash:
                super().touch_receiver_cache_item(mm_hash, mm_item)

    original = core.engine_receiver_cache_from_config
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def engine_receiver_cache_from_config(vllm_config):
        cache = original(vllm_config)
        if type(cache) is LruKeyReplicatedReceiverCache and getattr(vllm_config.model_config, "model_impl", None) == MODEL_IMPL:
            return SGLReceiverCache(vllm_config.model_config)
        return cache

    setattr(engine_receiver_cache_from_config, _PATCHED, True)
    core.engine_receiver_cache_from_config = engine_receiver_cache_from_config


def unavailable_reason() -> str | None:
    """Why this vLLM cannot run SGL (None: it can): a hook point its runner adapter needs is gone."""
    import vllm

    missing = runners.select().missing()
    if not missing:
        return None
    return (f"vLLM {vllm.__version__} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, which "
            f"vllm-sgl needs (tested with vLLM {', '.join(TESTED_VLLM)}); vLLM runs as without the plugin")


def register() -> None:
    """vLLM's general-plugin entry point. Never raises (module docstring)."""
    global _UNAVAILABLE
    from vllm_sgl.engine import cpu_rejection_sampler, cpu_video_pruning

    # vLLM's CPU build garbles speculative decoding in batches with a sampled request (its C++
    # rejection-sampler wrappers; docs/UPSTREAM_cpu_rejection_sampler.md): corrected in every
    # process before a worker binds them, for any engine (no-op on other builds; never raises).
    cpu_rejection_sampler.install()
    # vLLM's CPU runner never enables its video-pruning (EVS) path, so vanilla EVS crashes there
    # (vllm_sgl/engine/cpu_video_pruning.py): corrected for any engine, never raises.
    cpu_video_pruning.install()
    try:
        _wrap_vllm_config()  # first: it also refuses --model-impl sgl when the rest cannot install
        _UNAVAILABLE = unavailable_reason()
        if _UNAVAILABLE is None:
            _install()
    except Exception as exc:  # noqa: BLE001 - a plugin error would take vanilla vLLM down with it
        _UNAVAILABLE = (f"its plugin failed to install on this vLLM ({type(exc).__name__}: {exc}; tested with "
                        f"vLLM {', '.join(TESTED_VLLM)}); vLLM runs as without the plugin")
    if _UNAVAILABLE is not None and not getattr(register, "_logged", False):
        register._logged = True
        logger.warning("vllm-sgl: --model-impl sgl is unavailable: %s", _UNAVAILABLE)


def _install() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _ModelRegistry

    for arch, sgl_arch in SGL_ARCHS.items():
        if sgl_arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(sgl_arch, f"vllm_sgl.engine.model:{sgl_arch}")
    _wrap_registry_lookup(_ModelRegistry, "inspect_model_cls")
    _wrap_registry_lookup(_ModelRegistry, "resolve_model_cls")
    _drafts_from_settings()
    _drafts_stay_in_the_scheduler()
    from vllm_sgl.engine import metrics

    metrics.add_stats_field()
    _engine_cache_skips_sgl_images()
    runners.select().install()
