"""The quality benchmark's tools (no engine): the significance tests on known values, and the
baselines on one captured example of the trained pair, against the definitions they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_paired_statistics_on_known_values():
    import quality

    # 10 questions only a gets right, 2 only b: two-sided exact binomial 2 x P(X <= 2 | 12, 1/2)
    a = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 8
    b = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 8
    only_a, only_b, p = quality.mcnemar_exact(a, b)
    assert (only_a, only_b) == (10, 2) and p == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert quality.mcnemar_exact(a, a) == (0, 0, 1.0)
    lo, hi = quality.bootstrap_diff(a, b)
    assert 0 < lo < 8 / 50 < hi  # the difference is 8 of 50 questions, and it is significant
    # Wilson's interval of 0 / 10 and 5 / 10 (standard tables)
    assert quality.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert quality.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


@pytest.fixture(scope="module")
def runner_and_capture(shapes_pair, tmp_path_factory, monkeypatch_module):
    import baselines as bl
    from vllm_sgl.tasks import shapes

    monkeypatch_module.setattr(bl, "CACHE", tmp_path_factory.mktemp("baselines"))
    runner = bl.Runner(*shapes_pair)
    e = shapes.split_examples("test", 1)[0]
    return runner, runner.capture("test", 0, e), e


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_baselines_keep_what_they_define(runner_and_capture, shapes_pair):
    import baselines as bl
    from vllm_sgl.pruning import keep_count, keep_set, top_k_keep
    from vllm_sgl.reference import SGLReference

    runner, c, e = runner_and_capture
    n = c["n"]
    k = keep_count(n, 0.1)
    for name in bl.METHODS:
        kp = bl.keep(name, c, k)
        assert kp.indices.numel() == k and kp.indices.unique().numel() == k, name
    # SGL's reference rows are the engine's keep sets: the method's importance, the pruning module's rules
    ref_imp = torch.tensor(SGLReference(*shapes_pair).run([e.image], e.question).importance[0])
    assert torch.allclose(c["g_importance"], ref_imp, rtol=1e-5, atol=1e-6)
    assert torch.equal(bl.keep("sgl", c, k).indices, keep_set(c["g_importance"], 0.1))
    assert torch.equal(bl.keep("sgl-sdpp", c, k).indices, keep_set(c["g_importance"], 0.1, "sgl-sdpp", (16, 256)))
    # FastV: the last prompt row's attention in layer K - 1, dropped from layer K on
    fv = bl.keep("fastv", c, k, {"K": 2, "rows": "last"})
    assert fv.drop_at == 2 and torch.equal(fv.indices, top_k_keep(c["t_last"][1], k))
    assert c["t_last"].sum(-1).le(1 + 1e-5).all()  # one row's probabilities over the visual keys
    # VisionZip: merged contextual tokens replace their centres' embeddings
    vz = bl.keep("visionzip", c, k)
    assert vz.new_rows and set(vz.new_rows) <= set(vz.indices.tolist())
    # keeping every token at the input answers as the target does on the full image
    assert runner.reply(c, bl.Keep(torch.arange(n))) == c["target_reply"]
    # equal target compute: K full layers plus the rest at k' cost what the input pruning costs
    assert bl.target_flops_keep(256, 128, 1, 4) == 85 and bl.target_flops_keep(256, 25, 2, 4) == 0


def test_caches_belong_to_one_pair(shapes_pair, tiny_pair):
    import baselines as bl

    assert bl.pair_id(*shapes_pair) == bl.pair_id(*shapes_pair) != bl.pair_id(*tiny_pair)
