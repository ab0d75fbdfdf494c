"""Errors the ledger raises. Each has a stable ``code``; the service maps them to its own problems."""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every ledger error."""

    code = "ledger-error"


class InvalidAccount(LedgerError, ValueError):
    """An account code with no known type, a malformed code, or a currency that does not match."""

    code = "invalid-account"


class AccountNotFound(LedgerError):
    """No account with this code (accounts exist once something was posted to them)."""

    code = "account-not-found"


class EntryNotFound(LedgerError):
    """No journal entry with this id."""

    code = "entry-not-found"


class AlreadyReversed(LedgerError):
    """The entry already has a reversing entry; an entry is reversed at most once."""

    code = "already-reversed"


class LedgerTampered(LedgerError):
    """The ledger's tables were changed behind its back (say an entry row deleted); the sealer will not go on."""

    code = "ledger-tampered"


class InvalidReversal(LedgerError):
    """An entry names an entry it reverses (``reverses``) but is not that entry undone: a reversing entry has
    exactly the postings of the entry it names, each side swapped, and kind ``reversal``."""

    code = "invalid-reversal"


class IdempotencyConflict(LedgerError):
    """An idempotency key already names an entry that books something else (other postings, kind or
    references): the draft is not a retry of that entry, and nothing was written for it."""

    code = "idempotency-conflict"
