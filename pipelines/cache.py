"""Reuse the encodings of repeated inputs: the condition cache.

Before denoising, an edit encodes its input image twice: the VAE turns it into condition latents,
and the Qwen2.5-VL text encoder reads it with the prompt (and again with the negative prompt under
true CFG). Both are deterministic: the pipeline takes the VAE's mode (``sample_mode="argmax"``),
and the text encoder runs in eval mode. So a job that repeats an image (a seed sweep, several
instructions on one picture, a chain of edits in the playground, the negative prompt of every job
on that image) can take them from a small LRU instead, with bit-identical results.

Keys are digests of the exact inputs (the preprocessed image tensor for the VAE; the prompt text
and the pixels of the resized image for the text encoder), never names or URLs.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image


def _digest_tensor(tensor: Any) -> str:
    import torch

    flat = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{tuple(flat.shape)}|{flat.dtype}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest_images(images: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    for image in images if isinstance(images, list | tuple) else [images]:
        if isinstance(image, Image.Image):
            h.update(f"{image.mode}|{image.size}".encode())
            h.update(image.tobytes())
        elif image is None:
            h.update(b"none")
        else:
            h.update(_digest_tensor(image).encode())
    return h.hexdigest()


class ConditionCache:
    """An LRU of VAE condition latents and prompt encodings, installed on one pipeline."""

    def __init__(self, pipe: Any, max_entries: int) -> None:
        self.max_entries = max_entries
        self._encode_prompt = pipe.encode_prompt
        self._encode_vae = pipe._encode_vae_image
        self._entries: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def install(cls, pipe: Any, max_entries: int) -> ConditionCache:
        existing = getattr(pipe, "_condition_cache", None)
        if isinstance(existing, ConditionCache):
            return existing
        cache = cls(pipe, max_entries)
        pipe.encode_prompt = cache.encode_prompt
        pipe._encode_vae_image = cache.encode_vae_image
        pipe._condition_cache = cache
        return cache

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _get(self, key: tuple[str, ...]) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def _put(self, key: tuple[str, ...], value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def encode_vae_image(self, image: Any, generator: Any) -> Any:
        """Per image of the batch: cached latents where the exact same tensor was encoded before."""
        import torch

        parts = []
        for i in range(image.shape[0]):
            one = image[i : i + 1]
            key = ("vae", _digest_tensor(one))
            latents = self._get(key)
            if latents is None:
                gen = generator[i] if isinstance(generator, list) else generator
                latents = self._encode_vae(one, gen)
                self._put(key, latents)
            parts.append(latents)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def encode_prompt(self, prompt: Any = None, image: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("prompt_embeds") is not None or prompt is None:
            return self._encode_prompt(prompt, image, *args, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        key = (
            "prompt",
            hashlib.blake2b("\x00".join(prompts).encode(), digest_size=20).hexdigest(),
            _digest_images(image),
            str(sorted((k, str(v)) for k, v in kwargs.items())),
        )
        hit = self._get(key)
        if hit is None:
            hit = self._encode_prompt(prompt, image, **kwargs)
            self._put(key, hit)
        return hit
