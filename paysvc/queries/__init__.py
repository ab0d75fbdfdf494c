"""Named SQL blocks, loaded from the ``.sql`` files beside this module.

A file holds blocks introduced by ``-- name: block_name``; ``Q.block_name`` is its text. The loader is
the ledger's (the service may use the ledger; the ledger uses nothing of the service).
"""

from ledger.sql import NamedQueries

Q = NamedQueries(__name__)
