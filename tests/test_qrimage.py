"""A scanner reads back exactly the KHQR string that was drawn, Khmer included."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest
import zxingcpp
from PIL import Image, ImageDraw

from paysvc import khqr
from paysvc.qrimage import render_png, render_svg

EXAMPLE = (
    "00020101021229190015john_smith@devb5204599953031165405250005802KH5917School Fee Office6010Phnom Penh"
    "62170113INV-2025-00019934001317956092337060113179569563370663042764"
)
KHMER = khqr.encode(
    khqr.decode(EXAMPLE).model_copy(
        update={
            "language_preference": "km",
            "merchant_name_alternate": "ការិយាល័យបង់ថ្លៃសិក្សា",
            "merchant_city_alternate": "ភ្នំពេញ",
        }
    )
)
PAYLOADS = pytest.mark.parametrize("payload", [EXAMPLE, KHMER], ids=["example", "khmer-tag-64"])


def scan(image: Image.Image) -> zxingcpp.Barcode:
    found = zxingcpp.read_barcodes(image)
    assert len(found) == 1
    return found[0]


@PAYLOADS
def test_png_scans_back_to_the_exact_payload(payload):
    png = render_png(payload)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    code = scan(Image.open(io.BytesIO(png)))
    assert code.format == zxingcpp.BarcodeFormat.QRCode
    assert code.bytes == payload.encode("utf-8")
    assert code.text == payload
    assert code.ec_level == "M"
    assert khqr.decode(code.text) == khqr.decode(payload)


def test_khmer_payload_really_is_multibyte():
    assert "ភ្នំពេញ" in KHMER and len(KHMER.encode("utf-8")) > len(KHMER)


def test_png_box_size_and_border_set_the_pixel_size():
    small = Image.open(io.BytesIO(render_png(EXAMPLE, box_size=2, border=4)))
    large = Image.open(io.BytesIO(render_png(EXAMPLE, box_size=10, border=4)))
    modules = small.size[0] // 2 - 8
    assert small.size == (2 * (modules + 8),) * 2
    assert large.size == (10 * (modules + 8),) * 2
    assert scan(large).text == EXAMPLE


@PAYLOADS
def test_svg_is_an_svg_document_drawing_the_same_code(payload):
    root = ET.fromstring(render_svg(payload))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    # Draw the path's runs of dark modules onto a bitmap and scan it: the SVG holds the same code as the PNG.
    size = int(float(root.get("viewBox").split()[2]))
    path = root.find("{http://www.w3.org/2000/svg}path").get("d")
    runs = re.findall(r"M(\d+) (\d+)h(\d+)v1h-(\d+)z", path)
    assert runs and all(w == back for _, _, w, back in runs)
    assert len("".join(f"M{x} {y}h{w}v1h-{w}z" for x, y, w, _ in runs)) == len(path)  # nothing else drawn
    scale = 6
    bitmap = Image.new("L", (size * scale, size * scale), 255)
    draw = ImageDraw.Draw(bitmap)
    for x, y, w, _ in runs:
        left, top = int(x) * scale, int(y) * scale
        draw.rectangle((left, top, left + int(w) * scale - 1, top + scale - 1), fill=0)
    code = scan(bitmap)
    assert code.bytes == payload.encode("utf-8")
    assert code.text == payload
