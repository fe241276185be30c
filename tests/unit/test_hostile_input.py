"""Hostile uploads: whatever the bytes, the preprocessing answers with a digit or with one of the
service's own image errors, in bounded time and memory.

Property-based (Hypothesis): arbitrary bytes, and valid PNG, JPEG, GIF, TIFF, WebP and BMP files
mutated (bytes flipped, inserted, cut). Then decompression bombs of every accepted kind, each
decoded in a child process that may use at most MEMORY_LIMIT more memory and TIME_LIMIT of time.
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import signal
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.preprocessing import Digit, ImageError, ImageTooLarge, preprocess
from tests.helpers import digit_image

# Pillow warns about the corrupt metadata it skips; the outcome is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_PIXELS = 16_000_000  # the service's default MAX_IMAGE_PIXELS
TIME_LIMIT = 2.0  # seconds for one upload
MEMORY_LIMIT = 128 << 20  # bytes over the child's own: a 200 MP image cannot fit in it
FUZZ = settings(
    max_examples=1000,
    deadline=int(TIME_LIMIT * 1000),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def outcome(data: bytes) -> str:
    """What the preprocessing makes of `data`: "digit", or the image error's class name.
    Anything else raises, and fails the test."""
    try:
        result = preprocess(data, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        return type(exc).__name__
    assert isinstance(result, Digit)
    assert result.pixels.shape == (28, 28)
    assert np.isfinite(result.pixels).all()
    return "digit"


def encoded(fmt: str, **params: object) -> bytes:
    image = Image.fromarray((digit_image(40) * 255).astype(np.uint8))
    if fmt in ("JPEG", "WEBP", "BMP", "TIFF"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


VALID = {
    "png": encoded("PNG"),
    "jpeg": encoded("JPEG", quality=90),
    "progressive-jpeg": encoded("JPEG", progressive=True),
    "gif": encoded("GIF"),
    "tiff": encoded("TIFF"),
    "tiff-deflate": encoded("TIFF", compression="tiff_adobe_deflate"),
    "webp": encoded("WEBP"),
    "bmp": encoded("BMP"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_the_valid_files_read(name: str) -> None:
    assert outcome(VALID[name]) == "digit"


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "max"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[max(1, at) :]
        else:  # a field set to its largest value: sizes, counts, lengths
            data[at : at + 2] = b"\xff\xff"
        if not data:
            data = bytearray(b"\0")
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_files(data: bytes) -> None:
    outcome(data)


# --- bombs, each decoded in a bounded child -------------------------------------------------


def bounded(work: Callable[[], str]) -> str:
    """Run `work` in a forked child with MEMORY_LIMIT more address space than it starts with
    and TIME_LIMIT of time; its result, or "out of memory" / "out of time"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        code = 0
        try:
            with open("/proc/self/statm") as statm:
                size = int(statm.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_LIMIT, size + MEMORY_LIMIT))
            signal.alarm(int(TIME_LIMIT) + 1)
            started = time.monotonic()
            try:
                result = work()
            except MemoryError:
                result = "out of memory"
            if time.monotonic() - started > TIME_LIMIT:
                result = "out of time"
            os.write(write, pickle.dumps(result))
        except BaseException as exc:  # reported to the parent, whatever it is
            os.write(write, pickle.dumps(f"raised {exc!r}"))
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "out of time" if os.WTERMSIG(status) == signal.SIGALRM else "killed"
    return str(pickle.loads(data))


def gif_of_many_frames(frames: int) -> bytes:
    first = Image.fromarray((digit_image(32) * 255).astype(np.uint8)).convert("P")
    others = [Image.new("P", (32, 32), i % 2) for i in range(frames - 1)]
    out = io.BytesIO()
    first.save(out, "GIF", save_all=True, append_images=others, duration=10, optimize=False)
    return out.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(VALID["jpeg"])
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_of_many_scans(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each is decoded in turn."""
    data = VALID["progressive-jpeg"]
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * scans + b"\xff\xd9"


def tiff_claiming(width: int, height: int) -> bytes:
    """The valid TIFF with its ImageWidth (256) and ImageLength (257) tags rewritten."""
    data = bytearray(VALID["tiff"])
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for entry in range(count):
        at = ifd + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", data[at : at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            fmt = "<I" if kind == 4 else "<H"
            data[at + 8 : at + 8 + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    import zlib

    data = bytearray(VALID["png"])
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


BOMBS: dict[str, tuple[Callable[[], bytes], set[str]]] = {
    # (how to make it, what the service may answer)
    "GIF with 10,000 frames": (lambda: gif_of_many_frames(10_000), {"digit"}),
    "JPEG claiming 65,000 x 65,000": (
        lambda: jpeg_claiming(65_000, 65_000),
        {ImageTooLarge.__name__},
    ),
    "JPEG claiming 4,000 x 4,000 (within the limit), data of 40 x 40": (
        lambda: jpeg_claiming(4_000, 4_000),
        {"digit", "CorruptImage"},
    ),
    "progressive JPEG with 2,000 scans": (
        lambda: jpeg_of_many_scans(2_000),
        {"digit", "CorruptImage"},
    ),
    "TIFF claiming 100,000 x 100,000": (
        lambda: tiff_claiming(100_000, 100_000),
        {ImageTooLarge.__name__},
    ),
    "TIFF claiming 4,000 x 4,000 with one small strip": (
        lambda: tiff_claiming(4_000, 4_000),
        {"digit", "CorruptImage"},
    ),
    "PNG claiming 100,000 x 100,000": (
        lambda: png_claiming(100_000, 100_000),
        {ImageTooLarge.__name__},
    ),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_or_served_within_bounds(name: str) -> None:
    make, allowed = BOMBS[name]
    data = make()
    assert bounded(lambda: outcome(data)) in allowed


def test_the_bounds_hold_a_decode_that_breaks_them() -> None:
    assert bounded(lambda: str(np.ones(200_000_000, np.uint8).sum())) == "out of memory"

    def slow() -> str:
        time.sleep(TIME_LIMIT + 3)
        return "finished"

    assert bounded(slow) == "out of time"
    assert bounded(lambda: "fine") == "fine"
