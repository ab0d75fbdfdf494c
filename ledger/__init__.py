"""The double-entry ledger: accounts, immutable journal entries, postings, balances, hash chain, verification.

A library with a small API, used inside the caller's transaction (asyncpg connection). It imports nothing
of ``paysvc`` or ``providers``. See docs/ledger.md.
"""

from ledger.accounts import AccountSpec, account_spec
from ledger.balances import (
    Account, CurrencyTotal, StatementLine, TrialBalance, TrialBalanceLine, balance, fold_pending, get_account,
    list_accounts,
    statement, trial_balance,
)
from ledger.canonical import canonical_content, chain_hash, content_hash
from ledger.chain import seal, seal_all
from ledger.errors import (
    AccountNotFound, AlreadyReversed, EntryNotFound, IdempotencyConflict, InvalidAccount, InvalidReversal, LedgerError,
    LedgerTampered,
)
from ledger.journal import (
    get_entries, get_entry, list_entries, post_entries, post_entry, reversal_draft, reverse_entry,
)
from ledger.postings import EntryDraft, PostedEntry, Posting
from ledger.verify import (
    AccountProblem, AnchorProblem, BalanceMismatch, ChainHead, EntryProblem, VerifyReport, chain_head, parse_anchor,
    verify,
)

# A submodule the docs use as ``ledger.entries.payment_captured(...)`` after a plain ``import ledger``.
from ledger import entries

__all__ = [
    "Account", "AccountNotFound", "AccountProblem", "AccountSpec", "AlreadyReversed", "AnchorProblem", "BalanceMismatch", "ChainHead",
    "CurrencyTotal",
    "EntryDraft", "EntryNotFound", "EntryProblem", "IdempotencyConflict", "InvalidAccount", "InvalidReversal", "LedgerError",
    "LedgerTampered", "PostedEntry", "Posting", "StatementLine", "TrialBalance", "TrialBalanceLine", "VerifyReport",
    "account_spec", "balance", "canonical_content", "chain_hash", "chain_head", "content_hash", "entries", "fold_pending",
    "get_account", "get_entries", "get_entry", "list_accounts", "list_entries", "parse_anchor", "post_entries",
    "post_entry",
    "reversal_draft", "reverse_entry", "seal", "seal_all", "statement", "trial_balance", "verify",
]
