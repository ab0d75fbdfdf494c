-- Deleting an inbox row checks the two foreign keys that name inbox rows: without these indexes each check read
-- every payment (found by review: about 50 ms a row with 400,000 payments, the prune's batch holding a
-- transaction id the ledger sealer waits behind).
CREATE INDEX payments_inbox ON payments (inbox_id) WHERE inbox_id IS NOT NULL;
CREATE INDEX payment_reports_inbox ON payment_reports (inbox_id) WHERE inbox_id IS NOT NULL;
