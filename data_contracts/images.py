"""Images of vision-language rows: where a row's images come from, their checks, their fingerprints
and the content-addressed store the validated data references them in.

A row has an ``image`` column (one) or an ``images`` column (a list). Each image is a local path
(relative paths are read from the data file's folder, then the working directory), raw bytes, a
``{"bytes": ..., "path": ...}`` dict as Hugging Face datasets stores an ``Image`` feature (bytes
first), or a PIL image (an in-memory dataset). Every image is read once, checked and written to
``<split folder>/images/<sha256[:2]>/<sha256>.<ext>`` (its own bytes; a PIL image is written as
PNG); ``valid.parquet`` keeps only references ``{sha256, path, format, width, height}`` (path relative
to the split folder; :func:`resolve_refs` makes them absolute when the split is read), and the
sha256 goes into the row's example id. What a model needs per row (pixel values, grid sizes ...) is
produced from these files by the model's processor when a batch is built, never stored.

Rejects: IMAGE_MISSING (no such file, a null entry), IMAGE_EMPTY (zero bytes or a zero side),
IMAGE_TOO_LARGE (over ``data.max_image_bytes`` bytes or ``data.max_image_pixels`` pixels: checked from
the file size and the header, before anything is decoded), IMAGE_TRUNCATED (the data stops early),
IMAGE_UNREADABLE (not an image PIL can decode), IMAGE_COUNT_MISMATCH (``{"type": "image"}``
placeholders in the prompt that do not match the images), IMAGE_IN_COMPLETION, IMAGE_NEEDS_CHAT
(images on a row whose prompt is plain text), IMAGE_NEEDS_VISION_MODEL (images for a model without
an image processor). A conversational prompt with images and no placeholder at all gets them at the
start of its first user turn (as TRL's ``prepare_multimodal_messages`` does).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.examples import Example, RowError
from data_contracts.helpers import atomic_write

IMAGE_COLUMNS = ("image", "images")
STORE = "images"  # the store's folder, inside a split's folder
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 50_000_000
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def has_images(row: Any) -> bool:
    """Whether a raw row carries an image column with something in it."""
    return isinstance(row, dict) and any(row.get(c) not in (None, []) for c in IMAGE_COLUMNS)


def image_entries(row: dict) -> list:
    """The row's image entries, in order: ``image`` (one) or ``images`` (a list; one entry alone is
    taken as a list of one). Both set: WRONG_TYPE."""
    one, many = row.get("image"), row.get("images")
    if one is not None and many not in (None, []):
        raise RowError("WRONG_TYPE", "images", "a row has either an 'image' or an 'images' column, not both")
    if one is not None:
        return [one]
    if many is None:
        return []
    return list(many) if isinstance(many, (list, tuple)) else [many]


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "save") and hasattr(x, "size")


class ImageStore:
    """The content-addressed image files of one validated split, and how entries are read into it."""

    def __init__(self, folder: Path, base_dir: Path | None = None, max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.root = Path(folder)  # the split folder: references are relative to it
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def _read_path(self, p: str, field: str) -> bytes:
        if "://" in p:  # validation reads local files only (no network): say what to do
            raise RowError("IMAGE_MISSING", field, f"image {p} is a URL: download the images and give their "
                           "local paths (or bytes); images are never fetched")
        path = Path(p).expanduser()
        if not path.is_absolute() and self.base_dir is not None and (self.base_dir / path).exists():
            path = self.base_dir / path
        try:
            size = path.stat().st_size
        except OSError:
            raise RowError("IMAGE_MISSING", field, f"image file not found: {p}") from None
        if not path.is_file():
            raise RowError("IMAGE_MISSING", field, f"image path is not a file: {p}")
        if size > self.max_bytes:
            raise RowError("IMAGE_TOO_LARGE", field, f"image file {p} has {size:,} bytes, more than "
                           f"data.max_image_bytes ({self.max_bytes:,})")
        try:
            return path.read_bytes()
        except OSError as e:
            raise RowError("IMAGE_UNREADABLE", field, f"image file {p} cannot be read ({e.strerror})") from None

    def read(self, entry: Any, field: str) -> bytes:
        """The encoded bytes of one image entry (RowError for a missing or oversized one)."""
        if isinstance(entry, dict):
            if entry.get("bytes") is not None:
                entry = entry["bytes"]
            elif entry.get("path") is not None:
                entry = str(entry["path"])
            else:
                raise RowError("IMAGE_MISSING", field, "image entry has neither 'bytes' nor 'path'")
        if _is_pil(entry):
            buf = io.BytesIO()
            try:
                entry.save(buf, format="PNG")
            except Exception as e:
                raise RowError("IMAGE_UNREADABLE", field, f"in-memory image cannot be encoded ({e})"[:300]) from None
            return buf.getvalue()
        if isinstance(entry, (bytes, bytearray, memoryview)):
            data = bytes(entry)
            if len(data) > self.max_bytes:
                raise RowError("IMAGE_TOO_LARGE", field, f"image has {len(data):,} bytes, more than "
                               f"data.max_image_bytes ({self.max_bytes:,})")
            return data
        if isinstance(entry, str) and entry.strip():
            return self._read_path(entry, field)
        if entry is None:
            raise RowError("IMAGE_MISSING", field, "image entry is null")
        raise RowError("WRONG_TYPE", field, f"an image must be a path, bytes, a {{bytes, path}} dict or a PIL "
                       f"image, got {type(entry).__name__}")

    def check(self, data: bytes, field: str) -> tuple[str, int, int]:
        """(format, width, height) of encoded image bytes, fully decoded once (RowError otherwise)."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise RowError("IMAGE_EMPTY", field, "image has zero bytes")
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                (w, h), fmt = im.size, im.format or "PNG"
                if w == 0 or h == 0:
                    raise RowError("IMAGE_EMPTY", field, f"image is {w}x{h} pixels")
                if w * h > self.max_pixels:
                    raise RowError("IMAGE_TOO_LARGE", field, f"image is {w}x{h} = {w * h:,} pixels, more than "
                                   f"data.max_image_pixels ({self.max_pixels:,})")
                im.load()  # decode it all: a truncated or corrupt file fails here, not in training
        except RowError:
            raise
        except UnidentifiedImageError:
            raise RowError("IMAGE_UNREADABLE", field, "not an image file PIL can read") from None
        except Image.DecompressionBombError as e:
            raise RowError("IMAGE_TOO_LARGE", field, f"decompression bomb: {e}"[:300]) from None
        except (OSError, SyntaxError, ValueError) as e:
            text = str(e)
            code = "IMAGE_TRUNCATED" if "truncated" in text or "broken data stream" in text else "IMAGE_UNREADABLE"
            raise RowError(code, field, f"image cannot be decoded ({text})"[:300]) from None
        return fmt, w, h

    def put(self, data: bytes, field: str) -> dict:
        """Check one image's bytes, store them once under their sha256, return the reference."""
        fmt, w, h = self.check(data, field)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{STORE}/{sha[:2]}/{sha}.{EXTENSIONS.get(fmt, 'img')}"
        dest = self.root / rel
        if not dest.is_file() or dest.stat().st_size != len(data):
            atomic_write(dest, lambda tmp: tmp.write_bytes(data))
        return {"sha256": sha, "path": rel, "format": fmt, "width": w, "height": h}


def _parts(content: Any) -> list:
    return content if isinstance(content, list) else []


def place_images(ex: Example, n_images: int) -> None:
    """Check (and, with none given, insert) the ``{"type": "image"}`` placeholders of ``ex`` for
    ``n_images`` images, in place."""
    if not ex.is_conversational:
        if n_images:
            raise RowError("IMAGE_NEEDS_CHAT", "prompt", "a row with images needs a conversational prompt (the "
                           "chat template places the image tokens); give the prompt as messages")
        return
    for key in ("chosen", "rejected"):
        if any(p.get("type") == "image" for m in getattr(ex, key) for p in _parts(m["content"])):
            raise RowError("IMAGE_IN_COMPLETION", key, f"'{key}' holds an image placeholder; images belong "
                           "in the prompt")
    found = sum(p.get("type") == "image" for m in ex.prompt for p in _parts(m["content"]))
    if found == 0 and n_images:
        user = next((m for m in ex.prompt if m["role"] == "user"), None)
        if user is None:
            raise RowError("IMAGE_COUNT_MISMATCH", "prompt", f"{n_images} image(s) and no user turn to put them in")
        text = user["content"]
        user["content"] = [{"type": "image"} for _ in range(n_images)] + (
            _parts(text) or ([{"type": "text", "text": text}] if text else []))
        return
    if found != n_images:
        raise RowError("IMAGE_COUNT_MISMATCH", "prompt", f"the prompt has {found} image placeholder(s) "
                       f"({{\"type\": \"image\"}}) for {n_images} image(s)")


def attach_images(ex: Example, raw: dict, store: ImageStore | None) -> None:
    """Read, check and store the images of ``raw`` into ``ex.images`` (references), and check its
    placeholders. ``store`` None: the model has no image processor."""
    entries = image_entries(raw)
    if entries and store is None:
        raise RowError("IMAGE_NEEDS_VISION_MODEL", IMAGE_COLUMNS[0] if "image" in raw else "images",
                       "the row has images but the model has no image processor (a text-only model)")
    place_images(ex, len(entries))
    if entries:
        field = "image" if raw.get("image") is not None else "images"
        ex.images = [store.put(store.read(e, field), field) for e in entries]


def without_image_parts(messages: list[dict]) -> list[dict]:
    """``messages`` with their image parts removed (what the prompt renders as before its images)."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": [p for p in m["content"] if p.get("type") != "image"]}
        out.append(m)
    return out


def image_truncation_error(prompt_len: int, keep_from: int, max_length: int, dropped_to: int) -> RowError | None:
    """The IMAGE_TOKENS_TRUNCATED reject when truncating a prompt of ``prompt_len`` tokens (image
    tokens and their markers from position ``keep_from`` on) to ``max_length`` would cut them: the
    prompt alone does not fit, or keep_end drops its tokens up to position ``dropped_to``."""
    if prompt_len < max_length and dropped_to <= keep_from:
        return None
    return RowError("IMAGE_TOKENS_TRUNCATED", "prompt", f"the prompt has {prompt_len} tokens with image tokens from "
                    f"position {keep_from}; max_length {max_length} would cut them; raise data.max_length, "
                    "use smaller images or shorten the text")


def summarize(raw: Any) -> Any:
    """A raw row for rejects.parquet with its image payloads (bytes, PIL images) named, not copied."""
    if not isinstance(raw, dict) or not any(c in raw for c in IMAGE_COLUMNS):
        return raw

    def one(e):
        if isinstance(e, dict) and e.get("bytes") is not None:
            return {**e, "bytes": f"<{len(e['bytes']):,} bytes>"}
        if isinstance(e, (bytes, bytearray, memoryview)):
            return f"<{len(e):,} bytes>"
        return f"<PIL image {getattr(e, 'size', '')}>" if _is_pil(e) else e

    out = dict(raw)
    for c in IMAGE_COLUMNS:
        if isinstance(out.get(c), (list, tuple)):
            out[c] = [one(e) for e in out[c]]
        elif c in out:
            out[c] = one(out[c])
    return out


def base_dir(source: Any) -> Path | None:
    """The folder relative image paths of a source are read from: a data file's folder, a data
    folder itself; None for in-memory and hub sources (the working directory)."""
    if not isinstance(source, (str, Path)) or str(source).startswith("builtin:"):
        return None
    p = Path(str(source)).expanduser()
    return p if p.is_dir() else p.parent if p.is_file() else None


@dataclass
class VisionRows:
    """What validation needs for the images of a split: the store and the model's processor (any
    object with a Hugging Face processor's ``__call__(text=, images=)``, e.g. ``AutoProcessor``)."""

    store: ImageStore
    processor: Any

    def expanded_prompt(self, text: str, refs: list[dict]) -> list[int]:
        """The token ids of a rendered prompt with each image placeholder expanded by the processor."""
        images = [open_image(self.store.root / r["path"]) for r in refs]
        try:
            out = self.processor(text=[text], images=[images], add_special_tokens=False)
        except Exception as e:  # the processor's own checks (placeholders vs images, sizes)
            raise RowError("IMAGE_PROCESSOR_ERROR", "prompt", f"the processor refused the row: {e}"[:300]) from None
        return [int(x) for x in out["input_ids"][0]]


def open_image(path: Path, sha256: str | None = None):
    """The stored image at ``path`` as an RGB PIL image; ``sha256`` given: its bytes are checked
    against it first (a changed or damaged store file is a ValueError naming it)."""
    from PIL import Image

    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"image {path} does not match its sha256 {sha256[:16]}...: the validated data's image "
                         "store changed; re-run validate")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def resolve_refs(value: Any, root: Path) -> Any:
    """A valid.parquet ``images`` cell (JSON list of references) with absolute paths under ``root``."""
    if not value:
        return value
    refs = json.loads(value)
    for r in refs:
        r["path"] = os.fspath(Path(root) / r["path"])
    return json.dumps(refs)


def row_refs(row: dict) -> list[dict]:
    """The image references of a valid.parquet row (a record or namedtuple field ``images``)."""
    value = row.get("images") if isinstance(row, dict) else getattr(row, "images", None)
    return json.loads(value) if isinstance(value, str) and value else []
