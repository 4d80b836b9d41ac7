"""What is sent: a dataset of ``{"prompt", "image", "size"?}`` lines, or the built-in set.

The built-in set is generated (no download, the same bytes every run): images of several sizes and
aspect ratios, drawn so that they do not compress to nothing, and prompts from a few words to a
paragraph, because a server's cost depends on both (the condition image's tokens, the prompt's).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Input:
    name: str
    prompt: str
    image: str  # an http(s) URL or a data: URI
    size: str | None  # "W*H"; None: the server follows the input
    image_bytes: bytes | None = None  # the raw file, for backends that upload it (OpenAI's multipart)


PROMPTS = [
    "make it blue",
    "turn the sky purple and add a few clouds",
    "replace the background with a beach at sunset, keep the subject sharp and its colours unchanged",
    "add a small red hat",
    (
        "restyle the whole picture as a watercolour painting with soft edges, muted greens and browns, "
        "visible paper texture, and a thin ink outline around every object; keep the composition, the "
        "proportions and the lighting direction exactly as they are in the original photograph"
    ),
    "remove the text",
]
SIZES = [(512, 512), (640, 480), (480, 640), (768, 432), (256, 256), (1024, 576)]


def generated_image(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    for _ in range(24):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, width // 2), y0 + rng.randrange(8, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)  # type: ignore[arg-type]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def square_image(size: int = 64) -> bytes:
    """A small striped PNG: the one input of benchmarks that send the same image every job
    (overhead.py, batching.py: their direct rows decode the same bytes)."""
    img = Image.new("RGB", (size, size), (200, 40, 40))
    draw = ImageDraw.Draw(img)
    for x in range(0, size, 8):
        draw.line((x, 0, x, size - 1), fill=(20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def builtin() -> list[Input]:
    out = []
    for i, (w, h) in enumerate(SIZES):
        raw = generated_image(w, h, seed=i)
        out.append(Input(f"builtin-{i}-{w}x{h}", PROMPTS[i % len(PROMPTS)], data_uri(raw, "image/jpeg"), None, raw))
    return out


def load_dataset(path: Path) -> list[Input]:
    """JSONL lines ``{"prompt": ..., "image": URL | data URI | file path (relative to the file), "size"?}``."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, image = str(row["prompt"]), str(row["image"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a {{'prompt', 'image', 'size'?}} object ({exc})") from None
        raw = None
        if not image.startswith(("http://", "https://", "data:")):
            file = (path.parent / image).resolve()
            if not file.is_file():
                raise ValueError(f"{path}:{n}: image {image!r} is not a URL, a data URI or a file")
            raw = file.read_bytes()
            image = data_uri(raw, mimetypes.guess_type(file.name)[0] or "image/png")
        elif image.startswith("data:"):
            raw = base64.b64decode(image.split(",", 1)[1])
        size = row.get("size")
        out.append(Input(f"{path.stem}-{n}", prompt, image, str(size) if size else None, raw))
    if not out:
        raise ValueError(f"{path}: no requests in it")
    return out


def sequence(inputs: list[Input], count: int, seed: int) -> list[Input]:
    """``count`` inputs in a seeded order (each used in turn, reshuffled every round)."""
    rng = random.Random(seed)
    out: list[Input] = []
    while len(out) < count:
        round_ = list(inputs)
        rng.shuffle(round_)
        out += round_
    return out[:count]
