"""pipelines/geometry.py against the code it mirrors (diffusers' calculate_dimensions, transformers'
smart_resize, the real prompt encoding), and the checks built on it: an image too thin to edit and a
prompt too long for the rotary table are clear input errors before any tensor moves."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from PIL import Image

from pipelines import geometry
from pipelines.errors import PipelineInputError
from pipelines.registry import get_variant
from pipelines.runner import EditInputs, EditRunner
from weights.tiny import build_tiny_pipeline

SIZES = [1, 7, 31, 64, 255, 480, 640, 1023, 1024, 1536, 2047, 4000, 5000]


def test_calculate_dimensions_and_smart_resize_match_the_originals() -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for w, h in itertools.product(SIZES, SIZES):
        for area in (geometry.VAE_AREA, geometry.PLUS_VL_AREA):
            assert geometry.calculate_dimensions(area, w / h) == calculate_dimensions(area, w / h)[:2]
        if max(w, h) / min(w, h) <= geometry.VL_MAX_RATIO:
            rh, rw = smart_resize(h, w, 28, geometry.VL_MIN_PIXELS, geometry.VL_MAX_PIXELS)
            assert geometry.smart_resize(h, w) == (rw, rh)


@pytest.fixture(scope="module")
def runners() -> dict[str, EditRunner]:
    return {v: EditRunner(build_tiny_pipeline(v), get_variant(v), "cpu") for v in ("edit", "edit-plus")}


@pytest.mark.parametrize("variant", ["edit", "edit-plus"])
def test_prompt_tokens_are_the_length_the_pipeline_encodes(runners: dict[str, EditRunner], variant: str) -> None:
    runner = runners[variant]
    pipe: Any = runner.pipe
    images = [Image.new("RGB", (96, 64)), Image.new("RGB", (64, 128))][: 2 if variant == "edit-plus" else 1]
    for prompt in ("make it blue", "a much longer instruction, with punctuation; and 123 numbers " * 5):
        if variant == "edit-plus":
            vl = [
                pipe.image_processor.resize(im, h, w)
                for im, (w, h) in zip(images, geometry.vl_sizes(runner.variant, [i.size for i in images]), strict=True)
            ]
            embeds, _ = pipe._get_qwen_prompt_embeds(prompt, vl, device="cpu")
        else:
            (w, h) = geometry.vae_sizes([images[0].size])[0]
            embeds, _ = pipe._get_qwen_prompt_embeds(prompt, pipe.image_processor.resize(images[0], h, w), device="cpu")
        assert runner.prompt_tokens(prompt, [im.size for im in images]) == embeds.shape[1]


@pytest.mark.e2e  # a whole diffusers pipeline run on the tiny model: seconds on a CPU
def test_a_prompt_too_long_is_an_input_error_and_one_that_fits_runs(runners: dict[str, EditRunner]) -> None:
    runner = runners["edit"]
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    budget = geometry.text_budget(runner.variant, [image.size], 256, 256)
    base = runner.prompt_tokens("", [image.size])
    # A prompt of repeated words, just past the table, then just within it.
    per_word = (runner.prompt_tokens(" x" * 10, [image.size]) - base) // 10
    words = (budget - base) // per_word

    def inputs(n: int) -> EditInputs:
        return EditInputs(
            images=[image], prompt=" x" * n, seed=1, num_inference_steps=1, width=256, height=256, true_cfg_scale=1.0
        )

    with pytest.raises(PipelineInputError, match=r"prompt is too long for this model: it encodes to \d+ tokens"):
        runner(inputs(words + 1))
    fits = inputs(words)
    assert runner(fits).images[0].size == (256, 256)


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (2, 4000)])
def test_images_too_thin_to_resize_are_input_errors(runners: dict[str, EditRunner], size: tuple[int, int]) -> None:
    for runner in runners.values():
        inputs = EditInputs(images=[Image.new("RGB", size)], prompt="x", seed=1, num_inference_steps=1)
        with pytest.raises(PipelineInputError, match="elongated"):
            runner(inputs)


def test_elongated_but_workable_images_pass_the_check() -> None:
    for size in ((1, 100), (100, 1), (64, 3000)):
        geometry.check_images(get_variant("edit"), [size])
        geometry.check_images(get_variant("edit-plus"), [size])


# ASCII, CJK, combining marks, characters NFC decomposes (composition exclusions), an emoji, the
# image pad's own text, a combining mark that could compose with the template before it.
TRICKY_PROMPTS = [
    "make it blue",
    "把天空变成蓝色\uff0c保留人物",  # with a full-width comma
    "e\u0301" * 50,
    "\u0958\ufb2c\u2126" * 30,
    "😀 ok 🎨",
    "<|image_pad|>" * 5,
    "\u0301make",
    "x" * 3000,
]


@pytest.mark.parametrize("variant", ["edit", "edit-plus"])
def test_token_ceiling_is_never_below_the_encoding(runners: dict[str, EditRunner], variant: str) -> None:
    runner = runners[variant]
    sizes = [(64, 64), (96, 32)][: 2 if variant == "edit-plus" else 1]
    for prompt in TRICKY_PROMPTS:
        ceiling = runner.token_ceiling(prompt, sizes)
        assert ceiling is not None  # Qwen2's tokenizer: byte-level BPE, NFC
        assert ceiling >= runner.prompt_tokens(prompt, sizes), prompt


def test_a_prompt_whose_ceiling_fits_is_not_tokenized(
    runners: dict[str, EditRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runners["edit"]
    image = Image.new("RGB", (64, 64))
    inputs = EditInputs(images=[image], prompt="make it blue", seed=1, num_inference_steps=1, width=256, height=256)
    called: list[str] = []
    real = runner.prompt_tokens

    def counting(text: str, sizes: list[tuple[int, int]]) -> int:
        called.append(text)
        return real(text, sizes)

    monkeypatch.setattr(runner, "prompt_tokens", counting)
    runner.check_inputs(inputs)
    assert called == []
    # Near the budget the bound is not enough: the exact count decides.
    budget = geometry.text_budget(runner.variant, [image.size], 256, 256)
    ceiling = runner.token_ceiling("", [image.size])
    assert ceiling is not None
    inputs.prompt = "x" * (budget - ceiling + 1)
    runner.check_inputs(inputs)
    assert called == [inputs.prompt]


def test_a_tokenizer_without_the_bytes_bound_is_always_counted(runners: dict[str, EditRunner]) -> None:
    from tokenizers import normalizers

    runner = EditRunner(runners["edit"].pipe, get_variant("edit"), "cpu")
    backend = runner.pipe.tokenizer.backend_tokenizer
    saved = backend.normalizer
    backend.normalizer = normalizers.NFKC()  # may grow a text elevenfold: no bound from bytes
    try:
        assert runner.token_ceiling("make it blue", [(64, 64)]) is None
    finally:
        backend.normalizer = saved
