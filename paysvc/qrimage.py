"""A KHQR payload drawn as a QR code: PNG bytes for screens and print, SVG text for the web page."""

from __future__ import annotations

import functools
import io

import qrcode
from qrcode.constants import ERROR_CORRECT_M
from qrcode.image.svg import SvgPathImage


def _matrix(payload: str, *, box_size: int, border: int) -> qrcode.QRCode:
    # UTF-8 bytes, given explicitly: tag 64 holds Khmer, and a reader must get back the exact string,
    # since the CRC and Bakong's md5 are computed over it. M recovers ~15% damage (a crumpled receipt)
    # while keeping the code small enough to scan from a phone screen.
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_M, box_size=box_size, border=border)
    qr.add_data(payload.encode("utf-8"))
    qr.make(fit=True)
    return qr


# Choosing the mask pattern is most of the cost (~10 ms in pure Python), and one code is drawn again
# for every page view and refresh during its life of at most ten minutes: keep recent ones.
@functools.lru_cache(maxsize=1024)
def render_png(payload: str, *, box_size: int = 8, border: int = 4) -> bytes:
    """PNG bytes of ``payload`` as a QR code (error correction M), ``box_size`` pixels per module and
    ``border`` modules of quiet zone (4 is the minimum the QR standard asks for)."""
    image = _matrix(payload, box_size=box_size, border=border).make_image(fill_color="black", back_color="white")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=1024)
def render_svg(payload: str) -> str:
    """A standalone SVG document of ``payload`` as a QR code (error correction M), one path, scalable."""
    image = _matrix(payload, box_size=10, border=4).make_image(image_factory=SvgPathImage)
    return image.to_string(encoding="unicode")
