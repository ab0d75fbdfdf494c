-- A settlement line for a payment whose missing_in_settlement exception treasury already resolved with
-- write_off or refund_due: the provider settled it after all.
--
-- Found by review: such a line was `matched` silently. The settlement entry credited the provider's clearing a
-- second time (the resolution had already credited it), the write-off stayed a loss, the refunded revenue was
-- never restored, and the day looked clean. Now the line settles the payment (once, like any settling line) but
-- is not posted: it is raised as `settled_after_resolution`, and treasury's resolution puts the money right
-- (docs/settlement.md, "Exceptions and their resolution").
ALTER TABLE settlement_lines DROP CONSTRAINT settlement_lines_category_check;
ALTER TABLE settlement_lines ADD CONSTRAINT settlement_lines_category_check CHECK (category IN (
    'matched', 'amount_mismatch', 'missing_in_ledger', 'duplicate_in_settlement', 'settled_after_resolution'));

DROP INDEX settlement_lines_settle_once;
CREATE UNIQUE INDEX settlement_lines_settle_once ON settlement_lines (payment_id)
    WHERE category IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'settled_after_resolution');

ALTER TABLE reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_reason_check;
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_reason_check CHECK (reason IN (
    'unknown_khqr', 'currency_mismatch', 'account_mismatch', 'invoice_expired', 'invoice_cancelled',
    'duplicate_payment', 'underpaid', 'overpaid', 'paid_at_implausible', 'conflicting_notice',
    'amount_mismatch', 'missing_in_ledger', 'missing_in_settlement', 'duplicate_in_settlement',
    'settled_after_resolution'));
