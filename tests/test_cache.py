"""pipelines/cache.py on the tiny model: repeated inputs reuse their encodings, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.cache import ConditionCache
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from pipelines.speed import BatchedCFG
from weights.tiny import build_tiny_pipeline


def _inputs(prompt: str, seed: int, color: tuple[int, int, int] = (200, 40, 40)) -> EditInputs:
    return EditInputs(
        images=[Image.new("RGB", (64, 48), color)],
        prompt=prompt,
        seed=seed,
        num_inference_steps=2,
        negative_prompt="blurry",
        width=64,
        height=64,
    )


def _pixels(runner: EditRunner, inputs: EditInputs) -> np.ndarray:
    return np.asarray(runner(inputs).images[0])


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_cached_encodings_give_identical_images() -> None:
    reference = build_tiny_pipeline("edit")
    BatchedCFG.install(reference)
    plain = EditRunner(reference, get_variant("edit"), "cpu")
    pipe = build_tiny_pipeline("edit")
    cache = ConditionCache.install(pipe, max_entries=8)
    BatchedCFG.install(pipe)  # as apply_speed stacks them
    cached = EditRunner(pipe, get_variant("edit"), "cpu")

    first = _pixels(cached, _inputs("make it blue", 1))
    assert (cache.hits, cache.misses) == (0, 3)  # VAE, prompt, negative prompt
    # A seed sweep on the same image and prompt: everything from the cache, same pixels as uncached.
    again = _pixels(cached, _inputs("make it blue", 2))
    assert (cache.hits, cache.misses) == (3, 3)
    assert np.array_equal(again, _pixels(plain, _inputs("make it blue", 2)))
    assert np.array_equal(first, _pixels(plain, _inputs("make it blue", 1)))
    # Another instruction on the same image: the image's latents and the negative prompt are reused.
    other = _pixels(cached, _inputs("make it green", 1))
    assert (cache.hits, cache.misses) == (5, 4)
    assert np.array_equal(other, _pixels(plain, _inputs("make it green", 1)))
    # Another image: nothing reused.
    _pixels(cached, _inputs("make it blue", 1, color=(10, 200, 10)))
    assert (cache.hits, cache.misses) == (5, 7)


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_lru_keeps_at_most_max_entries_and_batches_reuse_per_image() -> None:
    pipe = build_tiny_pipeline("edit")
    cache = ConditionCache.install(pipe, max_entries=2)
    assert ConditionCache.install(pipe, max_entries=99) is cache  # once per pipeline
    runner = EditRunner(pipe, get_variant("edit"), "cpu")
    runner(_inputs("a", 1))  # prompt, negative prompt, then latents: the prompt's is evicted
    assert len(cache._entries) == 2
    assert [key[0] for key in cache._entries] == ["prompt", "vae"]
    # A batch encodes its images one by one: the one seen before comes from the cache.
    cache.max_entries = 8
    cache.clear()
    runner(_inputs("a", 1))
    hits = cache.hits
    runner.run_batch([_inputs("a", 1), _inputs("b", 2, color=(1, 2, 3))])
    assert cache.hits == hits + 1  # the first image's latents
