-- Payer details (name, phone, e-mail: personal data, encrypted) are erased on request (DELETE
-- /v1/invoices/{id}/payer) and, PAYSVC_PAYER_RETENTION_DAYS after an invoice became final, by an hourly sweep.
-- Before, they were kept for good. An erased payer leaves its time; the invoice, its payments and the ledger
-- stay (financial records hold no payer details).
ALTER TABLE invoices ADD COLUMN payer_erased_at timestamptz;
ALTER TABLE invoices ADD CONSTRAINT invoices_erased_payer_is_gone
    CHECK (payer_erased_at IS NULL OR payer_key_id IS NULL) NOT VALID;
ALTER TABLE invoices VALIDATE CONSTRAINT invoices_erased_payer_is_gone;
-- The sweep reads final invoices that still hold a payer by when they became final.
CREATE INDEX invoices_payer_kept_since ON invoices ((coalesce(paid_at, cancelled_at, expired_at)))
    WHERE payer_key_id IS NOT NULL AND status <> 'open';
-- It keeps the payer of an invoice an open reconciliation exception names.
CREATE INDEX reconciliation_exceptions_open_by_invoice ON reconciliation_exceptions (invoice_id) WHERE state = 'open';
