-- Capture: two more reasons a payment is raised to treasury, and replayed callbacks found by an index.
--
-- paid_at_implausible: the provider says the payment was made before the KHQR code (or its invoice) was
-- issued, or later than it reached us (a few minutes of clock skew allowed either way). Such a time cannot
-- decide whether the invoice was paid in time: the money is held in suspense, booked at the time it was
-- received.
-- conflicting_notice: a second notice for a provider transaction already captured, saying something else
-- (another amount, currency, code, account or time). Nothing is booked twice; treasury sees both notices.
ALTER TABLE reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_reason_check;
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_reason_check CHECK (reason IN (
    'unknown_khqr', 'currency_mismatch', 'account_mismatch', 'invoice_expired', 'invoice_cancelled',
    'duplicate_payment', 'underpaid', 'overpaid', 'paid_at_implausible', 'conflicting_notice',
    'amount_mismatch', 'missing_in_ledger', 'missing_in_settlement', 'duplicate_in_settlement'));

-- A signed callback's replay key: SHA-256 over its signature header and body, set on the row that was
-- accepted for processing. A second callback with the same key is the same signed message sent again (a
-- replay, not a provider's retry, which signs anew): it is kept as a rejected row (replay_key NULL) naming
-- the first. The unique index makes the check one index probe, and decides between concurrent copies.
-- Building the index reads the inbox once and holds off callback inserts meanwhile: on a large inbox, run
-- the migration at a quiet hour.
ALTER TABLE provider_inbox ADD COLUMN replay_key bytea;
CREATE UNIQUE INDEX provider_inbox_replay ON provider_inbox (provider, replay_key) WHERE replay_key IS NOT NULL;
