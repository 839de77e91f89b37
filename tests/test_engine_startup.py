"""Invalid SGL configuration fails when the engine is configured (LLM(...)), before any request,
with a message naming the field. These raise in the front end, so no engine process starts."""

from __future__ import annotations

import json
import shutil

import pytest

from engine_utils import ENGINE_KW


def _llm(target, sgl=None, **kw):
    from vllm import LLM

    extra = {} if sgl is None else {"additional_config": {"sgl": sgl}}
    return LLM(model=str(target), model_impl="sgl", **extra, **{**ENGINE_KW, **kw})


@pytest.fixture(scope="module")
def mismatched_guide(tiny_pair, tmp_path_factory):
    """The guide with a different spatial merge size: same family, different image tokenization."""
    guide = tmp_path_factory.mktemp("bad") / "guide"
    shutil.copytree(tiny_pair[0], guide)
    cfg = json.loads((guide / "config.json").read_text())
    cfg["vision_config"]["spatial_merge_size"] = 1
    (guide / "config.json").write_text(json.dumps(cfg))
    return guide


@pytest.fixture(scope="module")
def text_only_model(tiny_pair, tmp_path_factory):
    """A tiny Qwen2ForCausalLM: a valid vLLM model that SGL does not support."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("text") / "qwen2"
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    cfg = Qwen2Config(vocab_size=576, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "sgl, message",
    [
        (None, "missing additional_config.sgl"),
        ({}, "guide_model is required"),
        ({"guide_model": "GUIDE", "keep_ratio": 0.5, "keep_ration": 0.2}, "unknown SGL setting.*keep_ration"),
        ({"guide_model": "GUIDE", "keep_ratio": 0.0}, r"keep_ratio must be a number in \(0, 1\], got 0.0"),
        ({"guide_model": "GUIDE", "keep_ratio": 1.5}, r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        ({"guide_model": "GUIDE", "keep_ratio": "half"}, "keep_ratio must be a number"),
        ({"guide_model": "GUIDE", "guide_max_tokens": 0}, "guide_max_tokens must be an integer >= 1"),
        ({"guide_model": "GUIDE", "importance_backend": "cuda"}, "importance_backend must be auto, torch or triton"),
        ({"guide_model": "GUIDE", "importance": "topk"}, "importance must be one of 'sgl', 'sgl-sdpp', got 'topk'"),
        ({"guide_model": "GUIDE", "guide_max_batch": 0}, "guide_max_batch must be an integer >= 1"),
        ({"guide_model": "GUIDE", "guide_step_tokens": 0}, "guide_step_tokens must be an integer >= 1"),
        ({"guide_model": "/nonexistent/guide"}, "guide_model.*not found"),
        ({"guide_model": "GUIDE", "trace_path": "/nonexistent/dir/t.jsonl"}, "trace_path"),
    ],
)
def test_bad_settings_fail_at_startup(tiny_pair, sgl, message):
    if sgl is not None and sgl.get("guide_model") == "GUIDE":
        sgl = {**sgl, "guide_model": str(tiny_pair[0])}
    with pytest.raises(Exception, match=message):
        _llm(tiny_pair[1], sgl)


def test_guide_config_not_json_names_file_and_setting(tiny_pair, tmp_path):
    guide = tmp_path / "guide"
    shutil.copytree(tiny_pair[0], guide)
    (guide / "config.json").write_text('{"model_type": "qwen2_5_vl",')  # truncated
    with pytest.raises(Exception, match=r"guide_model: .*guide/config.json is not valid JSON") as e:
        _llm(tiny_pair[1], {"guide_model": str(guide)})
    assert "JSONDecodeError" not in type(e.value).__name__


def test_incompatible_guide_names_the_field(tiny_pair, mismatched_guide):
    with pytest.raises(Exception, match="spatial_merge_size"):
        _llm(tiny_pair[1], {"guide_model": str(mismatched_guide)})


def test_unsupported_target_lists_supported(tiny_pair, text_only_model):
    with pytest.raises(Exception, match=r"does not support architecture.*supported targets: Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"):
        _llm(text_only_model, {"guide_model": str(tiny_pair[0])})


def test_foreign_scheduler_class_is_refused(tiny_pair):
    # The guide phase lives in SGL's scheduler; another scheduler class would silently drop it.
    with pytest.raises(Exception, match=r"scheduler_cls='my.Scheduler' is not supported"):
        _llm(tiny_pair[1], {"guide_model": str(tiny_pair[0])}, scheduler_cls="my.Scheduler")


def test_untested_vllm_version_warns(caplog):
    from vllm_sgl.engine.plugin import warn_if_untested_vllm
    from vllm_sgl.engine.runners import TESTED_VLLM

    with caplog.at_level("WARNING", logger="vllm_sgl"):
        for version in TESTED_VLLM:
            assert not warn_if_untested_vllm(version)
            assert not warn_if_untested_vllm(version + "+cpu")
        assert warn_if_untested_vllm("0.99.0")
    assert f"tested with vLLM {', '.join(TESTED_VLLM)}, this is vLLM 0.99.0" in caplog.text
    assert "README" not in caplog.text  # the message is self-contained: it names the version to install
    assert f"vllm=={TESTED_VLLM[-1]}" in caplog.text


NEVER_BREAK = """
import importlib, json, logging, sys
from vllm_sgl.engine import runners
adapter = runners.select()
module, paths = next(iter(adapter._HOOK_POINTS.items()))
owner, attr = paths[0].rsplit(".", 1)
delattr(getattr(importlib.import_module(module), owner), attr)  # a hook point this vLLM "lacks"
records = []
logging.getLogger("vllm_sgl").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
from vllm.engine.arg_utils import EngineArgs
guide, target = sys.argv[1:3]
vanilla = EngineArgs(model=target, dtype="float32").create_engine_config()  # loads the plugin
try:
    EngineArgs(model=target, model_impl="sgl", dtype="float32",
               additional_config={"sgl": {"guide_model": guide}}).create_engine_config()
    error = None
except Exception as exc:
    error = str(exc)
print(json.dumps({"removed": f"{module}:{owner}.{attr}", "runner": adapter.NAME,
                  "vanilla": vanilla.model_config.architecture, "error": error, "log": records}))
"""


@pytest.mark.both
def test_plugin_never_breaks_vllm(tiny_pair):
    """A vLLM that lacks a hook point SGL needs (one removed here): the plugin installs nothing that
    can fail, logs one line naming the installed and the tested releases, vanilla vLLM configures
    as without it, and --model-impl sgl is a start-up error saying the same (real engines of the
    installed vLLM run with the plugin loaded in every other engine test)."""
    import json
    import subprocess
    import sys

    import vllm

    from vllm_sgl.engine.runners import TESTED_VLLM

    proc = subprocess.run([sys.executable, "-c", NEVER_BREAK, str(tiny_pair[0]), str(tiny_pair[1])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["vanilla"] == "Qwen2_5_VLForConditionalGeneration"
    assert out["error"] and "--model-impl sgl is unavailable" in out["error"]
    for text in (out["error"], *out["log"]):
        assert out["removed"] in text and vllm.__version__ in text and ", ".join(TESTED_VLLM) in text
    assert len(out["log"]) == 1, out["log"]


def test_encoder_cudagraphs_are_refused(tiny_pair):
    """Encoder CUDA graphs bypass the wrapper's embed_multimodal (where images are pruned)."""
    with pytest.raises(Exception, match="cudagraph_mm_encoder"):
        _llm(tiny_pair[1], {"guide_model": str(tiny_pair[0])}, compilation_config={"cudagraph_mm_encoder": True})


def test_video_pruning_is_refused(tiny_pair):
    """vLLM's video pruning (EVS) and SGL prune the same video tokens and do not compose (EVS picks
    them from the target's features after the guide phase): a start-up error naming both."""
    with pytest.raises(Exception, match=r"model-impl sgl cannot combine with video_pruning_rate=0.5 .*EVS"):
        _llm(tiny_pair[1], {"guide_model": str(tiny_pair[0])}, video_pruning_rate=0.5)
