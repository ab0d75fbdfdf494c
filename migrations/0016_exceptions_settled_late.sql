-- A payment raised as missing_in_settlement and then settled by a later file's line is resolved by that
-- settlement, not by treasury. Before, the exception stayed open and the only actions left (write_off,
-- refund_due) would have credited the provider's clearing account a second time.
ALTER TABLE reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_resolution_check;
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_resolution_check
    CHECK (resolution IN ('match_to_invoice', 'refund_due', 'write_off', 'settled_late'));
