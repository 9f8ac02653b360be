"""Tests for dogbread.images.decode_image. Every image is generated here, in memory."""

import io
import pickle
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from dogbread.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
)

SIZE = 32
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
# Two colours with three distinct channels each, so a swapped channel order (BGR) shows up.
LEFT, RIGHT = (200, 40, 90), (30, 160, 220)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def halves(left, right, mode="RGB", size=(64, 48)) -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def region_mean(arr: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return arr[rows, cols].reshape(-1, 3).mean(axis=0)


def assert_colour(arr, rows, cols, expected, tol=12):
    mean = region_mean(arr, rows, cols)
    assert np.abs(mean - np.array(expected)).max() <= tol, f"{mean} != {expected}"


# Centre-ish regions of the decoded image, away from the blurred boundaries.
Q = SIZE // 4
TOP, BOTTOM, LEFT_COLS, RIGHT_COLS = slice(2, Q), slice(-Q, -2), slice(2, Q), slice(-Q, -2)
ALL = slice(None)


def decode_ok(data: bytes, size: int = SIZE) -> np.ndarray:
    arr = decode_image(data, size)
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8
    return arr


def assert_left_right(arr, left, right, tol=12):
    assert_colour(arr, ALL, LEFT_COLS, left, tol)
    assert_colour(arr, ALL, RIGHT_COLS, right, tol)


def test_constants():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
    assert DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    assert DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("JPEG", {}, 12),
        ("JPEG", {"progressive": True}, 12),
        ("PNG", {}, 0),
        ("WEBP", {"quality": 90}, 12),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
    ],
    ids=["jpeg", "jpeg-progressive", "png", "webp", "webp-lossless", "gif", "bmp"],
)
def test_formats_decode_to_rgb(fmt, params, tol):
    arr = decode_ok(encode(halves(LEFT, RIGHT), fmt, **params))
    assert arr.flags.writeable
    assert_left_right(arr, LEFT, RIGHT, tol)


def test_bytearray_input_and_non_square_is_squashed():
    arr = decode_ok(bytearray(encode(halves(LEFT, RIGHT, size=(300, 20)), "PNG")))
    assert_left_right(arr, LEFT, RIGHT, tol=0)


def test_cmyk_jpeg_decodes_to_rgb_colours():
    # Pillow writes CMYK JPEGs with an Adobe marker (inverted CMYK), as Photoshop does.
    red_cmyk, blue_cmyk = (0, 255, 255, 0), (255, 255, 0, 0)
    data = encode(halves(red_cmyk, blue_cmyk, mode="CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_left_right(decode_ok(data), RED, BLUE, tol=20)


def test_rgba_png_composites_onto_white():
    img = halves((0, 0, 0, 0), (255, 0, 0, 128), mode="RGBA")  # transparent black | half red
    arr = decode_ok(encode(img, "PNG"))
    assert_left_right(arr, WHITE, (255, 127, 127), tol=2)


def test_fully_transparent_png_is_white():
    arr = decode_ok(encode(Image.new("RGBA", (40, 40), (10, 20, 30, 0)), "PNG"))
    assert (arr == 255).all()


@pytest.mark.parametrize(
    ("mode", "left", "right", "want_left", "want_right"),
    [
        ("L", 77, 200, (77,) * 3, (200,) * 3),
        ("LA", (77, 255), (200, 0), (77,) * 3, WHITE),
    ],
)
def test_grayscale_png(mode, left, right, want_left, want_right):
    arr = decode_ok(encode(halves(left, right, mode=mode), "PNG"))
    assert_left_right(arr, want_left, want_right, tol=0)


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.repeat(np.array([[0, 32768, 65535]], dtype=np.uint16), 30, axis=1)
    img = Image.fromarray(np.repeat(values, 90, axis=0))
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = decode_ok(data, size=90)
    assert (arr[:, 3:27] == 0).all()
    assert (arr[:, 33:57] == 128).all()
    assert (arr[:, 63:87] == 255).all()


def palette_halves() -> Image.Image:
    img = halves(0, 1, mode="P")
    img.putpalette([*LEFT, *RIGHT] + [0] * (3 * 254))
    return img


@pytest.mark.parametrize(
    ("transparency", "want_right"),
    [(None, RIGHT), (1, WHITE), (bytes([255, 0]), WHITE)],
    ids=["opaque", "tRNS-index", "tRNS-alphas"],
)
def test_palette_png(transparency, want_right):
    params = {} if transparency is None else {"transparency": transparency}
    data = encode(palette_halves(), "PNG", **params)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert_left_right(decode_ok(data), LEFT, want_right, tol=0)


def test_transparent_webp_and_gif_are_white():
    webp = encode(halves((0, 0, 0, 0), (*LEFT, 255), mode="RGBA"), "WEBP", lossless=True)
    assert_left_right(decode_ok(webp), WHITE, LEFT, tol=0)
    gif = encode(palette_halves(), "GIF", transparency=0)
    assert_left_right(decode_ok(gif), WHITE, RIGHT, tol=0)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert_colour(decode_ok(data), ALL, ALL, RED, tol=0)


def quadrants(width: int, height: int) -> Image.Image:
    """Stored layout: top-left red, top-right green, bottom-left blue, bottom-right white."""
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 2] = RED
    arr[: height // 2, width // 2 :] = GREEN
    arr[height // 2 :, : width // 2] = BLUE
    arr[height // 2 :, width // 2 :] = WHITE
    return Image.fromarray(arr)


# What an upright viewer sees, as (top-left, top-right, bottom-left, bottom-right), for the
# stored quadrants() layout. Orientation 6: the viewer turns the stored image 90 degrees clockwise,
# so the stored left column becomes the top row and the stored top row becomes the right column.
UPRIGHT = {
    1: (RED, GREEN, BLUE, WHITE),
    3: (WHITE, BLUE, GREEN, RED),  # 180 degrees
    6: (BLUE, RED, WHITE, GREEN),  # 90 degrees clockwise
    8: (GREEN, WHITE, RED, BLUE),  # 90 degrees counter-clockwise
}


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def assert_quadrants(arr, expected):
    top_left, top_right, bottom_left, bottom_right = expected
    assert_colour(arr, TOP, LEFT_COLS, top_left, tol=20)
    assert_colour(arr, TOP, RIGHT_COLS, top_right, tol=20)
    assert_colour(arr, BOTTOM, LEFT_COLS, bottom_left, tol=20)
    assert_colour(arr, BOTTOM, RIGHT_COLS, bottom_right, tol=20)


def test_exif_orientation_6_halves_come_out_upright():
    # Stored left half red, right half blue; rotated 90 degrees clockwise the red is on top.
    arr = decode_ok(jpeg_with_orientation(halves(RED, BLUE, size=(80, 40)), 6))
    assert_colour(arr, TOP, ALL, RED, tol=20)
    assert_colour(arr, BOTTOM, ALL, BLUE, tol=20)


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation(orientation):
    arr = decode_ok(jpeg_with_orientation(quadrants(96, 64), orientation))
    assert_quadrants(arr, UPRIGHT[orientation])


@pytest.fixture
def draft_sizes(monkeypatch):
    """Records the size each JPEG decodes at after draft(), to prove draft mode was used."""
    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_uses_draft_and_keeps_geometry(draft_sizes, orientation):
    data = jpeg_with_orientation(quadrants(4000, 3000), orientation)
    arr = decode_image(data, 256)
    assert arr.shape == (256, 256, 3)
    assert draft_sizes == [(500, 375)]  # libjpeg decoded at 1/8 scale
    q = 256 // 4
    for (rows, cols), colour in zip(
        [(slice(8, q), slice(8, q)), (slice(8, q), slice(-q, -8))]
        + [(slice(-q, -8), slice(8, q)), (slice(-q, -8), slice(-q, -8))],
        UPRIGHT[orientation],
        strict=True,
    ):
        assert_colour(arr, rows, cols, colour, tol=20)


def noise(width=256, height=256) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF0 segment is patched to claim width x height."""
    data = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    pos = 2
    while data[pos + 1] != 0xC0:  # walk the marker segments to the baseline frame header
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def zero_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(50) + data[middle + 50 :]


FAILURES = {
    "empty": (b"", {}, "empty"),
    "random-bytes": (np.random.default_rng(2).bytes(5000), {}, "not_an_image"),
    "text": (b"this is a text file that someone named dog.png\n" * 20, {}, "not_an_image"),
    "truncated-jpeg": (first_half(encode(noise(), "JPEG")), {}, "truncated"),
    "truncated-progressive-jpeg": (
        first_half(encode(noise(), "JPEG", progressive=True)),
        {},
        "truncated",
    ),
    "truncated-png": (first_half(encode(noise(), "PNG")), {}, "truncated"),
    "truncated-webp": (first_half(encode(noise(), "WEBP")), {}, "truncated"),
    "truncated-gif": (first_half(encode(noise(), "GIF")), {}, "truncated"),
    "png-cut-in-header": (encode(noise(), "PNG")[:20], {}, "truncated"),
    "png-zeroed-pixel-data": (zero_middle(encode(noise(), "PNG")), {}, "corrupt"),
    "jpeg-magic-then-junk": (b"\xff\xd8\xff" + bytes(range(256)) * 4, {}, "corrupt"),
    "too-many-bytes": (encode(noise(), "PNG"), {"max_bytes": 1000}, "too_large"),
    "too-many-pixels": (encode(noise(100, 100), "PNG"), {"max_pixels": 5000}, "too_large"),
    "tiff": (encode(noise(16, 16), "TIFF"), {}, "unsupported"),
    "heic-like": (b"\x00\x00\x00\x18ftypheic" + bytes(100), {}, "unsupported"),
    # Above our 50M default but below Pillow's own warning threshold (~89M): our check alone.
    "bomb-png-8000": (png_claiming(8000, 8000), {}, "too_large"),
    "bomb-png-30000": (png_claiming(30000, 30000), {}, "too_large"),
    "bomb-jpeg-30000": (jpeg_claiming(30000, 30000), {}, "too_large"),
    # With a generous max_pixels, Pillow's DecompressionBombWarning (>89M) becomes too_large...
    "bomb-warning": (png_claiming(10000, 10000), {"max_pixels": 10**10}, "too_large"),
    # ...and its DecompressionBombError (>179M) too.
    "bomb-error": (png_claiming(30000, 30000), {"max_pixels": 10**10}, "too_large"),
}


@pytest.mark.parametrize(("data", "limits", "reason"), FAILURES.values(), ids=FAILURES.keys())
def test_failures(data, limits, reason):
    filters_before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape either
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, SIZE, **limits)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert exc.reason == reason
    message = str(exc)
    assert message.startswith(f"{reason}: ") and len(message) > len(reason) + 2
    assert "\n" not in message
    assert warnings.filters == filters_before


def test_pixel_limit_does_not_depend_on_pillows_global_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched Pillow's check off
    for data in (png_claiming(30000, 30000), jpeg_claiming(30000, 30000)):
        with pytest.raises(ImageDecodeError, match=r"^too_large: 30000x30000 is 900000000 pixels"):
            decode_image(data, SIZE)


def test_error_pickles_and_normalises_detail():
    exc = ImageDecodeError("corrupt", "broken\n  data\tstream")
    assert str(exc) == "corrupt: broken data stream"
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), copy.reason, str(copy)) == (ImageDecodeError, "corrupt", str(exc))
    with pytest.raises(ValueError, match="unknown"):
        ImageDecodeError("nope", "x")


def test_bad_arguments_are_not_decode_errors():
    data = encode(noise(8, 8), "PNG")
    for bad in ({"size": 0}, {"size": 32, "max_pixels": 0}, {"size": 32, "max_bytes": -1}):
        with pytest.raises(ValueError) as info:
            decode_image(data, **bad)
        assert not isinstance(info.value, ImageDecodeError)
    with pytest.raises(TypeError):
        decode_image("not bytes", SIZE)  # type: ignore[arg-type]


def test_mutated_bytes_only_raise_image_decode_error():
    rng = np.random.default_rng(3)
    sources = [encode(noise(48, 32), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP")] + [
        encode(noise(48, 32).convert("RGBA"), "PNG")
    ]
    for source in sources:
        for _ in range(60):
            data = bytearray(source)
            for pos in rng.integers(0, len(data), size=rng.integers(1, 8)):
                data[pos] = rng.integers(0, 256)
            if rng.random() < 0.3:
                data = data[: rng.integers(1, len(data))]
            try:
                arr = decode_image(bytes(data), 16)
            except ImageDecodeError as exc:
                assert "\n" not in str(exc)
            else:
                assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_concurrent_decodes_leave_warning_filters_alone():
    filters_before = list(warnings.filters)
    good = encode(halves(LEFT, RIGHT), "PNG")
    bomb = png_claiming(10000, 10000)
    barrier = threading.Barrier(8)

    def work(i: int) -> str:
        barrier.wait()
        results = []
        for _ in range(20):
            try:
                decode_image(bomb if i % 2 else good, SIZE, max_pixels=10**10)
                results.append("ok")
            except ImageDecodeError as exc:
                results.append(exc.reason)
        return ",".join(sorted(set(results)))

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(work, range(8)))
    assert outcomes == ["ok", "too_large"] * 4
    assert warnings.filters == filters_before
