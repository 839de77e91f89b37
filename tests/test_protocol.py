"""The engine's own bookkeeping that needs no engine (milliseconds)."""

from types import SimpleNamespace

from vllm_sgl.engine.protocol import ResultsByImages


def _images(*ids):
    return [SimpleNamespace(identifier=i) for i in ids]


def test_results_by_images_identical_requests_only():
    cache = ResultsByImages(entries=3)
    a, b = object(), object()
    cache.put(_images("x1", "x2"), a)
    cache.put(_images("y1"), b)
    assert cache.get(_images("x1", "x2")) is a and cache.get(_images("y1")) is b
    # images of two different requests are not one request; nothing is not a request
    assert cache.get(_images("x1", "y1")) is None and cache.get(_images("z")) is None and cache.get([]) is None
    # the least recently used image goes first: x1, x2 were read after y1, so y1 is evicted
    cache.get(_images("x1", "x2"))
    cache.put(_images("w1"), object())
    assert len(cache) == 3 and cache.get(_images("y1")) is None and cache.get(_images("x1", "x2")) is a
