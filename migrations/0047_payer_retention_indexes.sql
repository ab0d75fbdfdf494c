-- The payer retention sweep reads final invoices that still hold a payer by when they became final, and
-- keeps the payer of an invoice an open reconciliation exception names. (Building them holds writes to
-- these tables, not reads.)
CREATE INDEX invoices_payer_kept_since ON invoices ((coalesce(paid_at, cancelled_at, expired_at)))
    WHERE payer_key_id IS NOT NULL AND status <> 'open';
CREATE INDEX reconciliation_exceptions_open_by_invoice ON reconciliation_exceptions (invoice_id) WHERE state = 'open';
