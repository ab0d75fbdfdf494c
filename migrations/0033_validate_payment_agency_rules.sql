-- Validates the two rules migration 0032 added NOT VALID (a payment's agency is its invoice's, and it has
-- one exactly when it has an invoice), in a transaction of its own: VALIDATE CONSTRAINT takes a lock that
-- lets payments be written during the scan, where adding the rules valid would have held captures for it.
ALTER TABLE payments VALIDATE CONSTRAINT payments_invoice_of_agency;
ALTER TABLE payments VALIDATE CONSTRAINT payments_invoice_and_agency;
