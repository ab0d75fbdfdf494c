-- One open expired_part_paid per invoice (opening it again while one is open does nothing), and the matches
-- treasury made to an invoice, found by the invoice (which payments' money an expired invoice holds).
CREATE UNIQUE INDEX reconciliation_exceptions_one_open_part_paid ON reconciliation_exceptions (invoice_id)
    WHERE reason = 'expired_part_paid' AND state = 'open';
CREATE INDEX reconciliation_exceptions_matched_to_invoice ON reconciliation_exceptions (invoice_id)
    WHERE resolution = 'match_to_invoice';
