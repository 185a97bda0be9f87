"""Encoded image files -> the model's uint8 pixels, by training's own `tasks.preprocess.load_image`, inside the
server's limits: each image's declared size is checked first (MAX_IMAGE_PIXELS -> 413), then its pixels are
reserved from the decode budget (MAX_DECODE_PIXELS), so the memory that decoding takes is bounded however many
requests arrive at once. Decoding runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import warnings

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from deploy.budget import Budget
from deploy.errors import ServeError, bad
from tasks.preprocess import PreprocessingCard, decode_rgb, load_image

# The server checks sizes itself (MAX_IMAGE_PIXELS, 413); Pillow's warning above its own limit is noise here.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def return_big_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make glibc give a decoded image's memory back to the OS when it is freed.

    glibc serves each decoding thread from its own arena and, past its adaptive mmap threshold (which
    grows to 32 MiB as big blocks are freed), keeps freed blocks there for reuse by that thread only: six
    threads that each decoded one 40 M pixel image once hold ~2 GiB between them, whatever the pixel
    budget lets run at once. A fixed threshold maps every allocation over it on its own and unmaps it on
    free. False where the C library is not glibc (nothing to do there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def image_size(data: bytes, max_pixels: int, what: str) -> tuple[int, int]:
    """(width, height) from the file's header (nothing decoded), turned by its EXIF orientation as Pillow's
    getexif reads it before decoding; 400 if unreadable, 413 if over max_pixels. decode_images_sized refines it
    with the decode's own size (a PNG may carry its orientation after the pixel data)."""
    if not data:
        raise bad(f"{what}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            try:  # the base class's getexif: PngImageFile's own would decode the whole image to look past IDAT
                orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: decoding says what is wrong, if anything
                orientation = 1
    except Image.DecompressionBombError as e:  # over Pillow's own limit (2 x its MAX_IMAGE_PIXELS): too big, not bad
        raise ServeError(413, f"{what}: image is over the limit of {max_pixels} pixels (MAX_IMAGE_PIXELS): {e}") from None
    except UnidentifiedImageError:
        raise bad(f"{what}: cannot decode image: not a recognised image format "
                  f"({len(data)} bytes, starting {data[:8]!r})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ServeError(413, f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: transposed, or turned by 90 degrees


def image_pixels(data: bytes, max_pixels: int, what: str) -> int:
    """width x height as the file declares it (only the header is read); 400 if unreadable, 413 if over max_pixels."""
    w, h = image_size(data, max_pixels, what)
    return w * h


def decode_image(data: bytes, card: PreprocessingCard, max_pixels: int, what: str) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] (no budget: for callers that hold one, or tests)."""
    image_pixels(data, max_pixels, what)
    return _load(data, card, what)


def _load(data: bytes, card: PreprocessingCard, what: str) -> np.ndarray:
    # bytes, not an opened Image: load_image then holds the only reference to the full-size decode,
    # and it is freed as soon as the next step has copied what it needs
    try:
        return load_image(data, card)
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


def draft_side(card: PreprocessingCard) -> int:
    """The shorter side load_image asks decode_rgb to keep (JPEG draft) for this card: as tasks.preprocess does."""
    return min(card.input_size) if getattr(card, "resize_mode", "center_crop") == "stretch" else card.resize_size


def _load_sized(data: bytes, card: PreprocessingCard, header_size: tuple[int, int],
                what: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(load_image's pixels, the original image's (width, height) after EXIF orientation), from one decode.

    decode_rgb decodes and turns the image as load_image would; load_image then only resizes it (a decoded RGB
    image has no format, so no second draft, and no orientation left to apply): the same pixels as
    load_image(data). Undrafted, the decode's own size is the original size. A drafted JPEG decodes at 1/2..1/8
    of it: then the header's size, turned by the EXIF orientation that a JPEG carries in its header."""
    try:
        img = decode_rgb(data, draft_side(card))
        w, h = img.size
        size = (w, h) if w * h == header_size[0] * header_size[1] else header_size
        return load_image(img, card), size
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"{what}: {e}") from None
    except ServeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


def decode_full(data: bytes, what: str) -> Image.Image:
    """The whole image in RGB at its own size, EXIF orientation applied (no JPEG draft): what an overlay is drawn
    on. The caller holds the image's pixels from the decode budget."""
    try:
        return decode_rgb(data, 1 << 30)
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


async def decode_images(items: list[tuple[str, bytes]], card: PreprocessingCard, max_pixels: int,
                        budget: Budget, queue_timeout_s: float) -> np.ndarray:
    """[(what, encoded bytes)] -> uint8 [N, H, W, 3]. All headers are checked before any pixel is decoded, so a
    bad last image costs no decoding; then one image at a time holds its pixels from the budget."""
    sizes = await asyncio.to_thread(lambda: [image_size(data, max_pixels, what) for what, data in items])
    return np.stack([await budgeted(budget, w * h, queue_timeout_s, _load, data, card, what)
                     for (what, data), (w, h) in zip(items, sizes)])


async def decode_images_sized(items: list[tuple[str, bytes]], card: PreprocessingCard, max_pixels: int,
                              budget: Budget, queue_timeout_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """As decode_images, and each original image's (width, height) after EXIF orientation, from the same decode."""
    sizes = await asyncio.to_thread(lambda: [image_size(data, max_pixels, what) for what, data in items])
    done = [await budgeted(budget, w * h, queue_timeout_s, _load_sized, data, card, (w, h), what)
            for (what, data), (w, h) in zip(items, sizes)]
    return np.stack([p for p, _ in done]), [wh for _, wh in done]


async def budgeted(budget: Budget, n: int, queue_timeout_s: float, fn, *args):
    """fn(*args) in a thread while it holds n from the budget."""
    await budget.acquire(n, queue_timeout_s)
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    # what it holds goes back to the budget when the thread is done, even if this request is cancelled first
    work.add_done_callback(lambda _: budget.release(n))
    return await asyncio.shield(work)
