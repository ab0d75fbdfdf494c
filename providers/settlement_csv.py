"""Reading and writing settlement CSV files, lazily, with exact line numbers in every error.

Shared by the plugins whose settlement files are CSV: UTF-8 (an optional byte-order mark), one header
line that must match exactly, comma separated, RFC 4180 quoting, ``\\n`` or ``\\r\\n`` line ends, blank
lines ignored. Parsing walks the bytes line by line: a file of a million lines is never held twice.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from providers.errors import SettlementFormatError

_INT = re.compile(r"[0-9]{1,18}", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_NEGATIVE = re.compile(r"-[0-9]+", re.ASCII)


def rows(data: bytes, header: Sequence[str], *, provider: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_no, fields)`` for each data line after checking the header; the header is line 1."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SettlementFormatError(1, "settlement data must be bytes", provider=provider)
    data = bytes(data)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 4 and (data[1:4:2] == b"\0\0" or data[0:4:2] == b"\0\0")):
        # A spreadsheet's "Unicode text" export: refused for its encoding, not for the NULs it is full of (found by
        # a treasury walk-through: "a NUL character at byte 4" did not say what to do)
        raise SettlementFormatError(1, "the file is UTF-16 (a spreadsheet's \"Unicode text\"); save it as CSV in "
                                       "UTF-8 and load it again", provider=provider)
    reader = csv.reader(_lines(data, provider), strict=True)
    start = 1  # the physical line the record being read starts on
    try:
        first = next(reader, None)
        if first is None:
            raise SettlementFormatError(1, f"empty file; expected the header {','.join(header)}", provider=provider)
        if [f.strip() for f in first] != list(header):
            raise SettlementFormatError(1, f"expected the header {','.join(header)}", provider=provider)
        while True:
            start = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                return
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise SettlementFormatError(start, f"{len(fields)} columns, expected {len(header)}",
                                            provider=provider)
            yield start, fields
    except csv.Error as exc:
        raise SettlementFormatError(start, f"not valid CSV: {exc}", provider=provider) from None


def _lines(data: bytes, provider: str) -> Iterator[str]:
    for n, raw in enumerate(io.BytesIO(data), start=1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if b"\x00" in raw:  # valid UTF-8 and CSV, but no text column in PostgreSQL can hold it
            raise SettlementFormatError(n, f"a NUL character (byte 0) at byte {raw.index(0) + 1} of the line; "
                                           "fields must not contain NUL", provider=provider)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SettlementFormatError(n, f"not UTF-8 ({exc.reason} at byte {exc.start})", provider=provider) from None


def write(header: Sequence[str], records: Iterable[Sequence[str]]) -> bytes:
    """A CSV file (``\\n`` line ends, no byte-order mark) with ``header`` then ``records``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    return out.getvalue().encode("utf-8")


def int_field(line_no: int, name: str, text: str, *, provider: str, optional: bool = False) -> int:
    """A non-negative integer column (ASCII digits only)."""
    text = text.strip()
    if optional and text == "":
        return 0
    if not _INT.fullmatch(text):
        if _NEGATIVE.fullmatch(text):
            why = "is negative; it must be 0 or more"
        elif _DIGITS.fullmatch(text):
            why = "is too large (more than 18 digits)"
        else:
            why = "is not a whole number (digits only, e.g. 5000)"
        raise SettlementFormatError(line_no, f"{name} {text!r} {why}", provider=provider)
    return int(text)


def aware_datetime(line_no: int, name: str, text: str, *, provider: str) -> datetime:
    """An ISO 8601 date-time that states its offset."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SettlementFormatError(line_no, f"{name} {text!r} is not an ISO 8601 date-time",
                                    provider=provider) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise SettlementFormatError(line_no, f"{name} {text!r} has no UTC offset", provider=provider)
    return value


def optional_text(text: str) -> str | None:
    """An empty column is ``None``."""
    text = text.strip()
    return text or None
