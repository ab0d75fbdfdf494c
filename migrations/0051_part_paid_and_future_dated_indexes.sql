-- Found by review: what write-offs of an invoice's expired_part_paid kept, and the exception whose part was
-- carried to an invoice, were found by reading every exception; and a payment its provider dated later than it
-- was captured (held as paid_at_implausible) was never raised as missing_in_settlement, since the recheck
-- selects payments by their reported time: it now also takes those by their capture, through this index
-- (few rows: only such payments).
CREATE INDEX reconciliation_exceptions_part_paid_by_invoice ON reconciliation_exceptions (invoice_id)
    WHERE reason = 'expired_part_paid';
CREATE INDEX reconciliation_exceptions_part_paid_matched_to ON reconciliation_exceptions ((evidence ->> 'matched_to'))
    WHERE reason = 'expired_part_paid';
CREATE INDEX payments_dated_after_capture ON payments (captured_at) WHERE paid_at > captured_at;
