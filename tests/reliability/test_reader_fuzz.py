"""Mutated image files fed to the reader: it reads them or refuses them as unreadable, never crashes.

Small PNG, JPEG, GIF, WebP and TIFF files with random byte flips, truncations and inserted bytes (seeded,
200 cases). The only exception allowed out of ``decode_image`` is its own ``ImageReadError``; the set
reader (``decode_images``) never raises and names each failure.
"""

import io

import numpy as np
import pytest
from PIL import Image

from sela.data.reader import ImageReadError, decode_image, decode_images

N_CASES = 200


def _originals() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = {}
    for fmt, suffix, extra in (
        ("PNG", ".png", {}),
        ("JPEG", ".jpg", {"quality": 80}),
        ("GIF", ".gif", {}),
        ("WEBP", ".webp", {}),
        ("TIFF", ".tif", {}),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt, **extra)
        out[suffix] = buf.getvalue()
    return out


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:  # flip a few bytes
        for i in rng.integers(0, len(b), rng.integers(1, 9)):
            b[i] = int(rng.integers(256))
    elif kind == 1:  # truncate
        b = b[: int(rng.integers(0, len(b)))]
    else:  # insert a run of random bytes
        at = int(rng.integers(0, len(b)))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    return bytes(b)


def test_mutated_images_are_read_or_refused(tmp_path):
    originals = _originals()
    suffixes = sorted(originals)
    rng = np.random.default_rng(30)
    paths = []
    for case in range(N_CASES):
        suffix = suffixes[case % len(suffixes)]
        path = tmp_path / f"{case:03d}{suffix}"
        path.write_bytes(_mutate(originals[suffix], rng))
        paths.append(str(path))
        for size in (None, (8, 8)):
            try:
                a = decode_image(path, size)
            except ImageReadError as err:
                assert str(err).startswith("could not read ") and "\n" not in str(err)
            else:
                assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    images, ok, failed = decode_images(paths, (8, 8), None, workers=2)
    assert len(ok) + len(failed) == N_CASES and images.shape == (len(ok), 8, 8, 3)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".webp", ".tif"])
def test_originals_read(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(_originals()[suffix])
    assert decode_image(path).shape == (16, 16, 3)
