-- Rejected callbacks are deleted once older than PAYSVC_INBOX_REJECTED_RETENTION_DAYS: found by a security
-- review, unauthenticated requests were each stored for good. The hourly prune reads them by this index.
-- A rejected row is never referenced (payments and reports name processed rows only).
CREATE INDEX provider_inbox_rejected ON provider_inbox (received_at) WHERE state = 'rejected';
