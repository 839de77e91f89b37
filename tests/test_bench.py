"""benchmarks/throughput.py, serving.py, bench_parallel.py --smoke and draft.py end to end (real engines, one at a
time), its helpers, and bench_guide.py --tiny. throughput.py's smoke run compiles its engines as users' runs do;
the others run eager (--enforce-eager: torch.compile is most of an engine's start here)."""

from __future__ import annotations

import csv
import math
import importlib.util
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "throughput.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_image_size_for_gives_exact_token_counts():
    bench = _load_bench()
    for n in (1, 7, 64, 100, 1024, 1280):
        w, h = bench.image_size_for(n)
        assert w % 28 == 0 and h % 28 == 0
        assert (w // 28) * (h // 28) == n
        assert w >= h
    assert bench.image_size_for(1024) == (896, 896)
    assert bench.image_size_for(1024, cell=32) == (1024, 1024)  # Qwen3-VL: 16 px patches


def test_model_cost_counts_active_experts(tiny_pair_qwen3_vl_moe):
    """An MoE target costs its active parameters per token: top-k of the experts."""
    from safetensors import safe_open
    from transformers import AutoConfig

    bench = _load_bench()
    target = tiny_pair_qwen3_vl_moe[1]
    text = AutoConfig.from_pretrained(target).text_config
    experts = other = 0
    with safe_open(str(target / "model.safetensors"), "pt") as st:
        for name in st.keys():
            n = math.prod(st.get_slice(name).get_shape())
            if ".mlp.experts." in name:
                experts += n
            elif "language_model" in name and "embed_tokens" not in name:
                other += n
    assert experts > 0
    assert bench.model_cost(target).body == other + round(experts * text.num_experts_per_tok / text.num_experts)


def test_model_cost(tiny_pair):
    from transformers import AutoConfig

    bench = _load_bench()
    guide, target = tiny_pair
    t, g = bench.model_cost(target), bench.model_cost(guide)
    assert t.body > g.body > 0 and t.head > 0 and g.head > 0
    assert t.vision_per_patch > 0 and t.vision_per_token > 0
    text = AutoConfig.from_pretrained(target).text_config
    # body = decoder layers + final norm: hidden * (q + k + v + o) + 3 * hidden * intermediate, biases, norms
    h, i = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * h // text.num_attention_heads  # k (and v) projection width
    per_layer = h * h * 2 + h * kv * 2 + (h + 2 * kv) + 3 * h * i + 2 * h
    assert t.body == text.num_hidden_layers * per_layer + h
    assert t.lm_attention(4, 0) == 2 * t.layers * t.q_dim * 10  # 1 + 2 + 3 + 4 rows x keys
    assert t.lm_attention(4, 2) == 2 * t.layers * t.q_dim * (10 + 5 + 6)


def test_smoke_run_writes_rows_for_vanilla_and_sgl(tiny_pair, tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--see-threshold", "0", "--downscale", "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "throughput.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vanilla", "sgl@0.25", "sgl@0.25+see@0", "vanilla-small@0.25"}, rows
    van, sgl, see, small = rows["vanilla"], rows["sgl@0.25"], rows["sgl@0.25+see@0"], rows["vanilla-small@0.25"]
    for r in (van, sgl, see, small):
        assert int(r["requests"]) == 4
        assert float(r["req_per_s"]) > 0 and float(r["out_tok_per_s"]) > 0
        assert int(r["kv_blocks"]) >= 4 and int(r["block_size"]) > 0
    for r in (van, sgl, small):
        assert float(r["ttft_mean_s"]) > 0 and float(r["ttft_p90_s"]) >= 0
    # SGL's target sees 64 -> 16 visual tokens per image: 4 requests x 48 fewer prompt tokens
    assert int(van["prompt_tokens"]) - int(sgl["prompt_tokens"]) == 4 * 48
    # the downscaled images give the target about as few visual tokens as SGL keeps (16 of 64)
    assert int(small["prompt_tokens"]) <= int(sgl["prompt_tokens"]) + 4 * 8
    assert 0.0 <= float(see["exit_rate"]) <= 1.0 and float(see["speedup_vs_sgp"]) > 0
    assert float(see["see_threshold"]) == 0.0 and float(see["ideal_speedup"]) >= float(sgl["ideal_speedup"]) * 0.99
    assert float(sgl["ideal_speedup"]) > 1.0 and float(sgl["ideal_speedup_lm"]) > float(sgl["ideal_speedup"])
    assert float(sgl["ideal_speedup_attn"]) > 1.0
    assert float(sgl["cpu_s_per_req"]) > 0 and float(sgl["cpu_speedup"]) > 0
    assert int(sgl["guide_answer_tokens"]) >= 4  # from the engine trace, at least one token each
    assert (out / "throughput.png").stat().st_size > 0
    assert "vanilla" in proc.stdout and "sgl@0.25" in proc.stdout and "ideal" in proc.stdout


def test_serving_smoke_runs_vllm_bench_client_against_both_servers(tiny_pair, tmp_path):
    """benchmarks/serving.py --smoke: a vanilla and an SGL server, vLLM's own client at a Poisson
    rate and all at once against each; every request completes and SGL's prompts are the pruned ones."""
    out = tmp_path / "serving"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--smoke", "--enforce-eager",
                           "--out-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "serving.csv") as f:
        rows = {(r["rate"], r["metric"]): r for r in csv.DictReader(f)}
    for rate in ("2", "inf"):
        assert float(rows[(rate, "req/s")]["vanilla"]) > 0 and float(rows[(rate, "req/s")]["sgl"]) > 0
        assert float(rows[(rate, "TTFT p50 ms")]["sgl/vanilla"]) > 0
        tokens = rows[(rate, "prompt tokens")]
        assert float(tokens["sgl"]) < float(tokens["vanilla"]), tokens  # 64 -> 6 visual tokens per image
    for name in ("vanilla-2", "vanilla-inf", "sgl-2", "sgl-inf"):
        assert (out / f"{name}.json").exists()
    assert (out / "serving.png").stat().st_size > 0
    assert "sgl/vanilla" in proc.stdout


def test_bench_guide_tiny_on_cpu(tiny_pair, tmp_path):
    """benchmarks/bench_guide.py --tiny: every phase timed, the target's saved prefill, the ideal,
    and the decode step's op and host-sync counts (no sync: the step a GPU captures as a graph)."""
    out = tmp_path / "bench_guide.csv"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_guide.py"), "--tiny", "--device", "cpu", "--iters", "1",
         "--batches", "1,4", "--csv", str(out), "--plot", str(tmp_path / "bench_guide.png")],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "host syncs per decode step: 0" in proc.stdout, proc.stdout
    ops = int(proc.stdout.split("ops per decode step: ")[1].split()[0])
    assert ops > 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch"]) for r in rows] == [1, 4]
    for r in rows:
        phases = [float(r[f"{p}_ms"]) for p in ("vision", "prefill", "decode", "importance")]
        assert all(p > 0 for p in phases) and float(r["total_ms"]) > 0
        assert 0 < float(r["ideal_ms"]) and float(r["pct_of_ideal"]) > 0
        assert int(r["host_syncs_per_decode_step"]) == 0 and int(r["ops_per_decode_step"]) == ops
        assert int(r["answer_tokens"]) == 8 and int(r["visual_tokens"]) == 256
        assert "saved_tiny_ms" in r
    assert (tmp_path / "bench_guide.png").stat().st_size > 0


def test_bench_parallel_smoke(tiny_pair, tmp_path):
    """benchmarks/bench_parallel.py --smoke: vanilla and SGL at TP=2 and the guide's steps and time
    from the trace. (TP=1 is throughput.py's smoke run above, the same engines: not run twice; the
    TP=2 / TP=1 columns are then empty.)"""
    out = tmp_path / "parallel"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_parallel.py"), "--smoke", "--tensor-parallel", "2",
         "--enforce-eager", "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "parallel.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vanilla tp2", "sgl@0.25 tp2"}, rows
    r = rows["sgl@0.25 tp2"]
    assert int(r["requests"]) == 4 and float(r["req_per_s"]) > 0 and float(r["speedup"]) > 0
    assert int(r["guide_steps"]) >= 1 and float(r["guide_s"]) > 0 and float(r["guide_step_ms"]) > 0
    assert (out / "parallel.png").stat().st_size > 0
    assert "guide s / TP1" in proc.stdout


def test_draft_bench_smoke(shapes_pair, tmp_path):
    """benchmarks/draft.py on a few questions of the trained pair: drafting off and on in one run,
    greedy outputs the same, drafts accepted, and each accepted token one target step saved."""
    out = tmp_path / "draft"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "draft.py"), "--pairs", "shapes", "--examples", "10",
         "--latency-requests", "1", "--draft-tokens", "4", "--enforce-eager", "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "draft.csv") as f:
        off, on = list(csv.DictReader(f))
    assert (off["draft_tokens"], on["draft_tokens"]) == ("0", "4") and on["same"] == "True"
    assert float(on["accepted"]) > 0 and float(on["tok_s_ratio"]) > 0 and float(on["tpot_ms"]) > 0
    assert int(on["target_steps"]) == int(float(on["ideal_steps"])), on
    assert "| shapes | 4 |" in proc.stdout


def test_internvl_workload_and_cost(tiny_pair_internvl):
    """InternVL: an image of s x s 448 px tiles plus a thumbnail is 256 (s^2 + 1) tokens; its
    vision tower and projector count as vision, attending within each tile."""
    import argparse

    bench = _load_bench()
    target = tiny_pair_internvl[1]
    args = argparse.Namespace(visual_tokens=1280, num_requests=2, warmup=1, images_per_request=1, seed=0, video_frames=0)
    work = bench.build_workload(args, target)
    assert work.visual_tokens == 1280 and work.image_size == (896, 896)
    assert work.patches_per_image == 5 * 32 * 32
    cost = bench.model_cost(target)
    assert cost.vision_per_patch > 0 and cost.vision_per_token > 0
    assert cost.vision_window_patches == 1024 and cost.vision_full_blocks == 0
