-- An invoice that expires holding part of its amount (treasury applied a held payment to it, match_to_invoice,
-- and the rest never came) is raised to treasury as `expired_part_paid`: the citizen paid for a service the
-- invoice no longer gives, and the part sits in the agency's revenue. Before, nothing was raised; only the
-- agency's invoice.expired event carried amount_paid. Treasury refunds it (refund_due), carries it to another
-- invoice (match_to_invoice) or records that the agency keeps it (write_off); one completed after all (an
-- expired invoice still takes treasury's matches) is closed as `paid_in_full`.
-- Catalog changes only (the table is locked for a moment, not scanned): 0049 validates, 0050 builds the indexes.
ALTER TABLE reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_reason_check;
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_reason_check CHECK (reason IN (
    'unknown_khqr', 'currency_mismatch', 'account_mismatch', 'invoice_expired', 'invoice_cancelled',
    'duplicate_payment', 'underpaid', 'overpaid', 'paid_at_implausible', 'conflicting_notice',
    'amount_mismatch', 'missing_in_ledger', 'missing_in_settlement', 'duplicate_in_settlement',
    'settled_after_resolution', 'expired_part_paid')) NOT VALID;
ALTER TABLE reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_resolution_check;
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_resolution_check
    CHECK (resolution IN ('match_to_invoice', 'refund_due', 'write_off', 'settled_late', 'paid_in_full')) NOT VALID;
