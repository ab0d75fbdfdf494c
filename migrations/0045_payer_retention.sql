-- Payer details (name, phone, e-mail: personal data, encrypted) are erased on request (DELETE
-- /v1/invoices/{id}/payer) and, PAYSVC_PAYER_RETENTION_DAYS after an invoice became final, by an hourly sweep.
-- Before, they were kept for good. An erased payer leaves its time; the invoice, its payments and the ledger
-- stay (financial records hold no payer details).
-- Only catalog changes here (the table is locked for a moment, not scanned); the CHECK is validated by 0046
-- and the sweep's indexes built by 0047, each in its own transaction, so that no invoice read waits for
-- them (found by review: in one file, the lock this ALTER takes held every read of invoices for the build).
ALTER TABLE invoices ADD COLUMN payer_erased_at timestamptz;
ALTER TABLE invoices ADD CONSTRAINT invoices_erased_payer_is_gone
    CHECK (payer_erased_at IS NULL OR payer_key_id IS NULL) NOT VALID;
