"""One call of a Qwen-Image-Edit pipeline: inputs checked up front, seed to generator, per-step
progress and cancellation through ``callback_on_step_end``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from PIL import Image

from pipelines import geometry
from pipelines.errors import PipelineInputError
from pipelines.lora import LoraManager, LoraRequest
from pipelines.registry import Variant


class RunCancelled(Exception):
    """The step callback asked the run to stop."""


@dataclass
class EditInputs:
    images: list[Image.Image]
    prompt: str
    seed: int
    num_inference_steps: int
    true_cfg_scale: float = 4.0
    negative_prompt: str | None = " "
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    loras: list[LoraRequest] = field(default_factory=list)  # -lora endpoints: active for this run only


@dataclass
class EditResult:
    images: list[Image.Image]
    seconds: float  # the pipeline call alone


# Plus and 2511 name each input picture in the prompt (diffusers' QwenImageEditPlusPipeline).
_PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

# Called after each denoising step with (steps done, total); returning False cancels the run.
StepCallback = Callable[[int, int], bool]

# Edit resizes every input to about this many pixels before encoding it (fixed in diffusers).
CONDITION_AREA = 1024 * 1024


def _bytes_bound_tokens(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` makes at most one token per byte of its NFC-normalized input: a fast
    tokenizer whose pre-tokenizer is byte-level and whose normalizer is NFC or none (Qwen2's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre = backend.normalizer, backend.pre_tokenizer
    if normalizer is not None and not isinstance(normalizer, normalizers.NFC):
        return False
    parts: list[Any] = list(cast("Iterable[Any]", pre)) if isinstance(pre, pre_tokenizers.Sequence) else [pre]
    return any(isinstance(part, pre_tokenizers.ByteLevel) for part in parts)


def _most_nfc_bytes(text: str) -> int:
    """At most how many UTF-8 bytes ``text`` has once NFC-normalized: ASCII is left as it is, and
    canonical decomposition grows UTF-8 at most threefold (Unicode UAX #15)."""
    return len(text) if text.isascii() else 3 * len(text.encode())


def condition_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) the Edit pipeline resizes ``image`` to before encoding it."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(CONDITION_AREA, image.size[0] / image.size[1])
    return int(width), int(height)


class EditRunner:
    def __init__(self, pipe: Any, variant: Variant, device: str, loras: LoraManager | None = None) -> None:
        self.pipe = pipe
        self.variant = variant
        self.device = device
        self.loras = loras

    def check_inputs(self, inputs: EditInputs) -> None:
        if not inputs.images:
            raise PipelineInputError("at least one input image is required")
        if len(inputs.images) > self.variant.max_images:
            raise PipelineInputError(f"{self.variant.name} takes at most {self.variant.max_images} images")
        if not inputs.prompt.strip():
            raise PipelineInputError("prompt must not be empty")
        if inputs.num_inference_steps < 1:
            raise PipelineInputError("num_inference_steps must be at least 1")
        if (inputs.width is None) != (inputs.height is None):
            raise PipelineInputError("give both width and height, or neither")
        if inputs.num_images < 1:
            raise PipelineInputError("num_images must be at least 1")
        if inputs.loras and self.loras is None:
            raise PipelineInputError("this worker does not load LoRAs")
        if len(inputs.loras) > 3:
            raise PipelineInputError("at most 3 LoRAs")
        sizes = [image.size for image in inputs.images]
        geometry.check_images(self.variant, sizes, inputs.width, inputs.height)
        self.check_prompt_fits(inputs, sizes)

    def _templated(self, text: str, images: int) -> str:
        """``text`` as the pipeline encodes it: in its template, after Plus's pictures."""
        if self.variant.multi_image:
            text = "".join(_PLUS_PICTURE.format(i + 1) for i in range(images)) + text
        return str(self.pipe.prompt_template_encode.format(text))

    def prompt_tokens(self, text: str, sizes: list[tuple[int, int]]) -> int:
        """The length of ``text``'s encoding with these images, as the pipeline encodes it: the
        template, Qwen2.5-VL's image tokens, minus the template's head that the pipeline drops."""
        ids = self.pipe.tokenizer(self._templated(text, len(sizes)), add_special_tokens=False).input_ids
        pads = ids.count(self.pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        vision = geometry.vision_tokens(self.variant, sizes)
        return len(ids) - pads + vision - int(self.pipe.prompt_template_encode_start_idx)

    @functools.cached_property
    def _tokens_within_bytes(self) -> bool:
        return _bytes_bound_tokens(self.pipe.tokenizer)

    def token_ceiling(self, text: str, sizes: list[tuple[int, int]]) -> int | None:
        """An upper bound of ``prompt_tokens(text, sizes)`` found without tokenizing; None where the
        tokenizer gives no such bound. A byte-level BPE (Qwen2's) gives each token at least one byte
        of the normalized text (``_most_nfc_bytes``); the image pads that the count drops are left in,
        which only raises the bound."""
        if not self._tokens_within_bytes:
            return None
        # The template around an empty prompt has the bytes of the one around ``text``, less its own.
        # NFC of a whole is at most the sum of its parts' decompositions (composing only shortens).
        # And one for the space a byte-level pre-tokenizer may put in front (``add_prefix_space``).
        most_bytes = _most_nfc_bytes(self._templated("", len(sizes))) + _most_nfc_bytes(text) + 1
        vision = geometry.vision_tokens(self.variant, sizes)
        return most_bytes + vision - int(self.pipe.prompt_template_encode_start_idx)

    def check_prompt_fits(self, inputs: EditInputs, sizes: list[tuple[int, int]]) -> None:
        """The transformer lays text after the image positions on a 4096-row rotary table, and
        fails deep inside with a shape mismatch when the encoding runs past it: say so up front.

        A prompt whose ``token_ceiling`` fits is not tokenized: on the 2-core test machine the
        tokenizer call took 0.9 ms of every job, cold after the previous job's pipeline call."""
        budget = geometry.text_budget(self.variant, sizes, inputs.width, inputs.height)
        use_cfg = inputs.true_cfg_scale > 1.0 and inputs.negative_prompt is not None
        for name, text in (("prompt", inputs.prompt), ("negative_prompt", inputs.negative_prompt if use_cfg else None)):
            if text is None:
                continue
            ceiling = self.token_ceiling(text, sizes)
            if ceiling is not None and ceiling <= budget:
                continue
            tokens = self.prompt_tokens(text, sizes)
            if tokens > budget:
                raise PipelineInputError(
                    f"the {name} is too long for this model: it encodes to {tokens} tokens with its image(s), "
                    f"and at most {budget} fit at this size; shorten it"
                )

    def batch_signature(self, inputs: EditInputs) -> tuple[Any, ...] | None:
        """Runs with equal signatures can share one pipeline call; None: this run must go alone.

        Only the single-image Edit pipeline batches (the multi-image ones read a list of images as
        one prompt's pictures), and only runs whose every tensor has the same shape: the same
        output size, the same condition size (from the input's aspect ratio), steps and guidance.
        """
        if self.variant.multi_image or len(inputs.images) != 1 or inputs.num_images != 1 or inputs.loras:
            return None
        use_cfg = inputs.true_cfg_scale > 1.0 and inputs.negative_prompt is not None
        return (
            condition_size(inputs.images[0]),
            inputs.width,
            inputs.height,
            inputs.num_inference_steps,
            inputs.true_cfg_scale if use_cfg else 1.0,
            inputs.negative_prompt if use_cfg else None,
        )

    def run_batch(self, batch: list[EditInputs], on_step: StepCallback | None = None) -> list[EditResult]:
        """Run compatible edits as one pipeline call: each keeps its own prompt, image and seed.

        Each input is resized to its condition size here, exactly as the pipeline resizes a lone
        input, and draws its noise from its own generator, so a job's output does not depend on
        its batch beyond floating-point rounding.
        """
        import torch

        if len(batch) == 1:
            return [self(batch[0], on_step)]
        for inputs in batch:
            self.check_inputs(inputs)
        signature = self.batch_signature(batch[0])
        if signature is None or any(self.batch_signature(inputs) != signature for inputs in batch[1:]):
            raise ValueError("these runs cannot share one pipeline call")
        first = batch[0]
        cond_w, cond_h = signature[0]
        images = [self.pipe.image_processor.resize(inputs.images[0], cond_h, cond_w) for inputs in batch]
        use_cfg = signature[5] is not None
        total = first.num_inference_steps
        cancelled = False

        def callback(pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal cancelled
            if on_step is not None and not on_step(step + 1, total) and not cancelled:
                cancelled = True
                pipe._interrupt = True
            return kwargs

        generators = [torch.Generator(device="cpu").manual_seed(inputs.seed) for inputs in batch]
        if on_step is not None:
            on_step(0, total)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(
                image=images,
                prompt=[inputs.prompt for inputs in batch],
                negative_prompt=[first.negative_prompt] * len(batch) if use_cfg else None,
                true_cfg_scale=first.true_cfg_scale if use_cfg else 1.0,
                width=first.width,
                height=first.height,
                num_inference_steps=total,
                generator=generators,
                callback_on_step_end=callback,
                output_type="pil",
            )
        seconds = time.perf_counter() - started
        if cancelled:
            raise RunCancelled()
        return [EditResult(images=self._exact_size(first, [image]), seconds=seconds) for image in out.images]

    def __call__(self, inputs: EditInputs, on_step: StepCallback | None = None) -> EditResult:
        import torch

        self.check_inputs(inputs)
        total = inputs.num_inference_steps
        cancelled = False

        def callback(pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal cancelled
            if on_step is not None and not on_step(step + 1, total) and not cancelled:
                cancelled = True
                pipe._interrupt = True  # diffusers skips the remaining steps
            return kwargs

        # A CPU generator draws the same noise whatever the device: seeds reproduce across machines.
        generator = torch.Generator(device="cpu").manual_seed(inputs.seed)
        use_cfg = inputs.true_cfg_scale > 1.0 and inputs.negative_prompt is not None
        image_arg: Any = inputs.images if self.variant.multi_image else inputs.images[0]
        if on_step is not None:
            on_step(0, total)
        started = time.perf_counter()
        applied = self.loras.applied(inputs.loras) if self.loras is not None else contextlib.nullcontext()
        with applied, torch.inference_mode():
            out = self.pipe(
                image=image_arg,
                prompt=inputs.prompt,
                negative_prompt=inputs.negative_prompt if use_cfg else None,
                true_cfg_scale=inputs.true_cfg_scale if use_cfg else 1.0,
                width=inputs.width,
                height=inputs.height,
                num_inference_steps=total,
                num_images_per_prompt=inputs.num_images,
                generator=generator,
                callback_on_step_end=callback,
                output_type="pil",
            )
        seconds = time.perf_counter() - started
        if cancelled:
            raise RunCancelled()
        return EditResult(images=self._exact_size(inputs, list(out.images)), seconds=seconds)

    @staticmethod
    def _exact_size(inputs: EditInputs, images: list[Image.Image]) -> list[Image.Image]:
        if not (inputs.width and inputs.height):
            return images
        # The pipeline rounds sizes down to multiples of 16; the client asked for exact pixels.
        size = (inputs.width, inputs.height)
        return [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
