-- The rules of 0048 checked on the rows already there (a scan that lets reads and writes go on).
ALTER TABLE reconciliation_exceptions VALIDATE CONSTRAINT reconciliation_exceptions_reason_check;
ALTER TABLE reconciliation_exceptions VALIDATE CONSTRAINT reconciliation_exceptions_resolution_check;
