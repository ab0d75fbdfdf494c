-- Validates the rule migration 0038 added NOT VALID (a payment's number on its code goes with the code's md5),
-- in a transaction of its own: VALIDATE CONSTRAINT takes a lock that lets payments be written during the scan.
ALTER TABLE payments VALIDATE CONSTRAINT payments_numbered_on_their_code;
