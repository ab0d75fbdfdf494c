"""Named SQL blocks from the ``.sql`` files of this package: ``Q.block_name``.

A file holds blocks introduced by ``-- name: block_name``.
"""

from __future__ import annotations

import importlib.resources
import re

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


def load_blocks(package: str) -> dict[str, str]:
    """Every ``-- name:`` block of the ``.sql`` files in ``package`` (a block name may appear once)."""
    blocks: dict[str, str] = {}
    for res in importlib.resources.files(package).iterdir():
        if not res.name.endswith(".sql"):
            continue
        parts = _HEADER.split(res.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2]):
            if name in blocks:
                raise RuntimeError(f"SQL block {name} defined twice")
            blocks[name] = body.strip()
    return blocks


class NamedQueries:
    """``NamedQueries(package).block_name`` is the text of that block."""

    def __init__(self, package: str) -> None:
        self._blocks = load_blocks(package)

    def __getattr__(self, name: str) -> str:
        try:
            return self._blocks[name]
        except KeyError:
            raise AttributeError(f"no SQL block named {name!r}") from None


Q = NamedQueries(__package__)
