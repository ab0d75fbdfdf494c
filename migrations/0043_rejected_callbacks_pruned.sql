-- Rejected callbacks are deleted once older than PAYSVC_INBOX_REJECTED_RETENTION_DAYS: found by a security
-- review, unauthenticated requests were each stored for good. The hourly prune reads them by this index.
-- A rejected row is never referenced (payments and reports name processed rows only).
CREATE INDEX provider_inbox_rejected ON provider_inbox (received_at) WHERE state = 'rejected';
-- Deleting an inbox row checks the two foreign keys that name inbox rows: without these indexes each check read
-- every payment (found by review: about 50 ms a row with 400,000 payments, the batch holding a transaction id
-- the ledger sealer waits behind).
CREATE INDEX payments_inbox ON payments (inbox_id) WHERE inbox_id IS NOT NULL;
CREATE INDEX payment_reports_inbox ON payment_reports (inbox_id) WHERE inbox_id IS NOT NULL;
