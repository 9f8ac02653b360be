"""Decode encoded image bytes into the model's input array.

Training, labeling and predict all go through `decode_image`, so the model sees exactly the same
pixels at train and at inference time. Any change here changes what a trained model expects.

Choices that matter for the pixels:

- Resize is a plain squash to (size, size) with BILINEAR, like keras `image_dataset_from_directory`
  (which the seed notebook used). Pillow's bilinear is antialiased when shrinking, TF's is not, so
  values differ slightly from the notebook's; that is fine because every job uses this function.
- Transparency is composited onto white: a transparent background is white paper, not the black
  that dropping the alpha channel would usually give.
- ICC colour profiles are ignored, as TF's decoders ignore them. CMYK uses Pillow's plain
  CMYK->RGB conversion.
- Only the formats in IMAGE_EXTENSIONS are decoded. Other formats Pillow could read (TIFF, ICO,
  PSD, ...) are refused as "unsupported", so the set of decodable files matches the extensions
  the rest of dogbread lists, and fewer of Pillow's parsers see untrusted bytes.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000

_REASONS = frozenset({"empty", "not_an_image", "truncated", "too_large", "unsupported", "corrupt"})

# Importing the plugins above registers them now, so Image.open never lazily imports plugins
# (Pillow's init()) from inside a decode running on some worker thread.
_FORMATS = (
    JpegImagePlugin.JpegImageFile.format,  # also opens MPO (multi-picture) camera JPEGs
    PngImagePlugin.PngImageFile.format,
    WebPImagePlugin.WebPImageFile.format,
    GifImagePlugin.GifImageFile.format,
    BmpImagePlugin.BmpImageFile.format,
)

# Magic numbers, only consulted after Pillow failed to identify the bytes, to tell a broken file
# of a format we decode ("corrupt") and a real image we refuse ("unsupported") from junk.
_OUR_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
_UNSUPPORTED_SIGNATURES = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"8BPS": "PSD",
    b"\x00\x00\x01\x00": "ICO",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000",
    b"\xffO\xffQ": "JPEG 2000",
    b"\xff\x0a": "JPEG XL",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "JPEG XL",
}

# warnings.catch_warnings swaps the process-wide filter list and is not thread-safe: two
# overlapping blocks can restore each other's filters and leave "error" installed for good.
# Serialising our blocks prevents that. Only Image.open (header parsing) runs under the lock.
_warnings_lock = threading.Lock()


class ImageDecodeError(ValueError):
    """Bytes that cannot be turned into a model input; `reason` is a short machine code."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in _REASONS:
            raise ValueError(f"unknown ImageDecodeError reason {reason!r}")
        self.reason = reason
        # Pillow messages occasionally span lines; logs and Parquet error columns want one line.
        self.detail = " ".join(str(detail).split())[:300]
        super().__init__(f"{reason}: {self.detail}")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Ray pickles exceptions between processes; the default rebuilds from args=(message,).
        return (type(self), (self.reason, self.detail))


def decode_image(
    data: bytes,
    size: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode `data` into a (size, size, 3) uint8 RGB array.

    `data` may be bytes or bytearray. Raises only ImageDecodeError for any bytes. Bad arguments
    (other types, a size or limit below 1) are caller bugs and raise TypeError/ValueError, so they
    cannot be mistaken for bad images.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    for name, value in (("size", size), ("max_bytes", max_bytes), ("max_pixels", max_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    if not data:
        raise ImageDecodeError("empty", "no bytes")
    if len(data) > max_bytes:
        raise ImageDecodeError("too_large", f"{len(data)} bytes, limit is {max_bytes}")
    try:
        return _decode(data, size, max_pixels)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", str(exc)) from exc
    except MemoryError as exc:
        raise ImageDecodeError("too_large", "out of memory while decoding") from exc
    except Exception as exc:  # the contract is "only ImageDecodeError", whatever the bytes
        raise _classify(exc, data) from exc


def _decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    img = _open(data)
    width, height = img.size  # from the header; no pixels are decoded yet
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"{width}x{height} is {width * height} pixels, limit is {max_pixels}"
        )

    if isinstance(img, JpegImagePlugin.JpegImageFile):
        # libjpeg scales by 1/2, 1/4 or 1/8 while decoding, keeping both sides >= size, so a
        # 12 MP photo decodes as a fraction of the pixels. Orientation is applied after this,
        # which is fine: the target is square.
        img.draft("RGB", (size, size))
    img.load()  # for GIF and animated WebP/PNG this decodes only the first frame

    _apply_orientation(img)
    img = _to_rgb(img)
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)  # a writable copy; np.asarray would be read-only


def _open(data: bytes) -> Image.Image:
    try:
        # Pillow warns (and only past 2x raises) for big headers; make the warning an error here
        # so such files are refused instead of logging a warning.
        with _warnings_lock, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.UnidentifiedImageError as exc:
        header = data[:16]
        for magic, name in _OUR_SIGNATURES.items():
            if header.startswith(magic):
                raise ImageDecodeError("corrupt", f"unreadable {name} header") from exc
        if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
            raise ImageDecodeError("corrupt", "unreadable WebP header") from exc
        for magic, name in _UNSUPPORTED_SIGNATURES.items():
            if header.startswith(magic):
                raise ImageDecodeError("unsupported", f"{name} images are not supported") from exc
        if header[4:8] == b"ftyp":  # ISO media: HEIC from iPhones, AVIF
            raise ImageDecodeError("unsupported", "HEIF/AVIF images are not supported") from exc
        raise ImageDecodeError("not_an_image", "not a JPEG, PNG, WebP, GIF or BMP") from exc


def _apply_orientation(img: Image.Image) -> None:
    try:
        # in_place avoids the full copy exif_transpose makes when there is nothing to rotate.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        # Broken EXIF is common and the pixels are already decoded: keep them unrotated.
        pass


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit grayscale PNG. Pillow's convert() clips to 255, turning most of the range white,
        # so rescale 0..65535 to 0..255 ourselves (rounded, so 65535 -> 255 and 32768 -> 128).
        # A 16-bit tRNS transparent grey value is lost here; such files are vanishingly rare.
        wide = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if img.has_transparency_data:
        # Covers RGBA, LA, PA, palette and grayscale images with a tRNS transparency entry.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _classify(exc: Exception, data: bytes) -> ImageDecodeError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return ImageDecodeError("truncated", message)
    # Pillow's WebP plugin reports a short file only as "could not create decoder object"; the
    # RIFF header says how long the file should be.
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if int.from_bytes(data[4:8], "little") + 8 > len(data):
            return ImageDecodeError("truncated", "WebP file is shorter than its header says")
    return ImageDecodeError("corrupt", f"{type(exc).__name__}: {message}")
