"""The catalog of awkward inputs the reliability suite feeds to `label` and `train`.

Every file is generated here from procedurally drawn pictures (dogbread.synth.draw_image), so
nothing is downloaded. `write_catalog(root)` writes the files and returns, for each one, what its
row must say: None for "gets a label", or the reason code its error must start with.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dogbread.synth import draw_image

BOMB_SIDE = 30_000  # a real 30000x30000 PNG: 900 M pixels, about 110 KB on disk

# File names users really produce; each must come back as the same path, with a label.
ODD_NAMES = (
    "name with spaces.jpg",
    "ünïcødé 狗.jpg",
    "hash#1.jpg",
    "percent%41.jpg",  # '%41' must not be decoded to 'A' anywhere
    "plus+sign.jpg",
    "a dog #1+2 100%.jpg",
)

# Relative paths of the three files the EXIF check compares.
EXIF_ROTATED = "exif-orientation-6.jpg"  # stored sideways, EXIF says "rotate 90 clockwise"
EXIF_UPRIGHT = "exif-reference-upright.png"  # the same pixels, turned upright, no EXIF
EXIF_SIDEWAYS = "exif-reference-sideways.png"  # the same pixels as stored: the control
SYMLINK, SYMLINK_TARGET = "symlink.jpg", "nested/deeper/deep.jpg"


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def picture(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A drawn corgi or loaf (the class alternates with the seed), optionally resized."""
    img = draw_image(seed % 2, np.random.default_rng(seed))
    return img.resize(size, Image.Resampling.BILINEAR) if size else img


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit grayscale PNG of side x side black pixels, compressed to ~1/1000.

    Written by hand, row by row: Pillow would need the whole bitmap (side*side bytes) in memory.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte "none", then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000))
    idat += compressor.compress(row * (side % 1000)) + compressor.flush()
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def exif_pair() -> dict[str, bytes]:
    """A JPEG stored sideways with EXIF orientation 6, and PNGs of its pixels upright and as stored.

    Small enough (120x72) that libjpeg's draft scaling does not apply at 64 pixels, so the JPEG's
    decoded pixels are exactly Pillow's full decode, and the PNGs hold those pixels losslessly.
    """
    upright = picture(7, (72, 120))  # a portrait picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera held sideways: 120x72
    exif = Image.Exif()
    exif[0x0112] = 6  # "the 0th row is the visual right-hand side": turn 90 degrees clockwise
    jpeg = encode(stored, "JPEG", quality=90, exif=exif.tobytes())
    pixels = Image.open(io.BytesIO(jpeg)).convert("RGB")  # as stored; Pillow ignores EXIF here
    return {
        EXIF_ROTATED: jpeg,
        EXIF_UPRIGHT: encode(pixels.transpose(Image.Transpose.ROTATE_270), "PNG"),
        EXIF_SIDEWAYS: encode(pixels, "PNG"),
    }


def write_catalog(root: Path) -> dict[str, str | None]:
    """Write the catalog under `root`; {relative path: expected error reason, None = labeled}.

    Also writes one hidden file (`.DS_Store`), which is not an input: it is counted as skipped.
    """
    root.mkdir(parents=True, exist_ok=True)
    good_jpeg = encode(picture(1), "JPEG", quality=85)
    rgb = picture(2)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    gray16 = Image.fromarray(
        (np.asarray(picture(3).convert("L"), np.uint16) * 257).astype(np.uint16)
    )
    assert gray16.mode.startswith("I;16")
    frames = [picture(seed, (160, 120)) for seed in (4, 5, 6)]
    files: dict[str, tuple[bytes, str | None]] = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "random-bytes.jpg": (b"\0" + np.random.default_rng(0).bytes(4000), "not_an_image"),
        "text-named.png": (b"not a picture, only a picture's name\n", "not_an_image"),
        "rgba-alpha.png": (encode(rgba, "PNG"), None),
        "palette.png": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None),
        "gray-16bit.png": (encode(gray16, "PNG"), None),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG", quality=90), None),
        "progressive.jpg": (encode(rgb, "JPEG", quality=90, progressive=True), None),
        "animated.gif": (
            encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80),
            None,
        ),
        "photo.webp": (encode(rgb, "WEBP", quality=80), None),
        "bomb-30000x30000.png": (bomb_png(), "too_large"),
        SYMLINK_TARGET: (good_jpeg, None),
        **{name: (good_jpeg, None) for name in ODD_NAMES},
        **{name: (data, None) for name, data in exif_pair().items()},
    }
    expected: dict[str, str | None] = {}
    for relpath, (data, reason) in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[relpath] = reason
    os.symlink(SYMLINK_TARGET, root / SYMLINK)  # relative: the tree can be copied
    expected[SYMLINK] = None
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return expected
