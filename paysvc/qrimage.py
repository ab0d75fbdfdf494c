"""A KHQR payload drawn as a QR code: PNG bytes for screens and print, SVG text for the web page."""

from __future__ import annotations

import functools
import io

import qrcode
from PIL import Image
from qrcode.constants import ERROR_CORRECT_M


# Choosing the mask pattern is most of the cost (~10 ms in pure Python), and one code is drawn again for
# every page view and refresh during its life of at most ten minutes, in PNG and SVG, at several sizes:
# the module matrix is computed once per code and every image is drawn from it.
@functools.lru_cache(maxsize=1024)
def _modules(payload: str) -> tuple[tuple[bool, ...], ...]:
    # UTF-8 bytes, given explicitly: tag 64 holds Khmer, and a reader must get back the exact string,
    # since the CRC and Bakong's md5 are computed over it. M recovers ~15% damage (a crumpled receipt)
    # while keeping the code small enough to scan from a phone screen.
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_M, box_size=1, border=0)
    qr.add_data(payload.encode("utf-8"))
    qr.make(fit=True)
    return tuple(tuple(row) for row in qr.get_matrix())


@functools.lru_cache(maxsize=1024)
def render_png(payload: str, *, box_size: int = 8, border: int = 4) -> bytes:
    """PNG bytes of ``payload`` as a QR code (error correction M), ``box_size`` pixels per module and
    ``border`` modules of quiet zone (4 is the minimum the QR standard asks for)."""
    modules = _modules(payload)
    size = len(modules) + 2 * border
    image = Image.new("1", (size, size), 1)
    pixels = image.load()
    for y, row in enumerate(modules):
        for x, dark in enumerate(row):
            if dark:
                pixels[x + border, y + border] = 0
    image = image.resize((size * box_size, size * box_size), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=1024)
def render_svg(payload: str, *, border: int = 4) -> str:
    """A standalone SVG document of ``payload`` as a QR code (error correction M): one path in which each
    horizontal run of dark modules is a single rectangle, so the file stays small on a weak connection."""
    matrix = _modules(payload)
    size = len(matrix) + 2 * border
    parts = []
    for y, row in enumerate(matrix):
        x = 0
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                parts.append(f"M{start + border} {y + border}h{x - start}v1h-{x - start}z")
            else:
                x += 1
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" width="{size * 10}" '
        f'height="{size * 10}" shape-rendering="crispEdges">'
        f'<rect width="{size}" height="{size}" fill="#fff"/><path fill="#000" d="{"".join(parts)}"/></svg>'
    )
