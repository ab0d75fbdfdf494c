-- Payments and their outbox events no longer take a lock on their agency's row.
--
-- A foreign key check locks the referenced row (FOR KEY SHARE) until the transaction ends. Every capture
-- wrote a payment and two or three events, each with a foreign key to agencies: every capture of an
-- agency's payments locked the one row all of them share, and when several transactions hold such a lock
-- at once PostgreSQL records them as a multixact. In the payments benchmark at 500 paid invoices/s for 60 s
-- this wrote 159-177 pages of multixact members against 12-30 without these two keys, and the p99 latency
-- was 251-430 ms in four runs with them against 116-167 ms in three of four runs without them (see
-- docs/benchmarks.md). The invoice's own foreign key to its agency stays: an invoice is written once.
--
-- What the two keys guaranteed, and what guarantees it now:
-- * a payment's agency exists, and (found by review: never checked before) is its invoice's: a foreign key
--   from (invoice_id, agency_id) to the invoice's (id, agency_id). It locks the invoice's row, which the
--   capture already holds FOR UPDATE, not the agency's. With the CHECK below (a payment has an agency exactly
--   when it has an invoice) it also does what payments_invoice_id_fkey did, which goes.
-- * an event's agency exists: each event is written with the agency id of a row read in the same
--   transaction (its invoice, payment or exception, whose keys check it), and agencies are never deleted
--   (below). An event naming an agency without an event counter would never be numbered or published: the
--   sequencer reports such events (paysvc_outbox_events_without_agency, and an error in the log).
-- * The new rules on payments are added NOT VALID and validated by the next migration, in a transaction of
--   its own (VALIDATE takes a lock that lets captures go on; adding them valid here would hold captures for
--   the scan). The CHECK joins the payment's existing rule about its invoice, under one name. (PostgreSQL
--   prepares a table's CHECKs again for every statement that writes it, but that cost follows the size of
--   the expressions, not their number: measured, joining them saves nothing; see docs/benchmarks.md.)

ALTER TABLE payments DROP CONSTRAINT payments_agency_id_fkey;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_agency_id_fkey;

ALTER TABLE invoices ADD CONSTRAINT invoices_id_agency_key UNIQUE (id, agency_id);
ALTER TABLE payments
    DROP CONSTRAINT payments_invoice_id_fkey,
    ADD CONSTRAINT payments_invoice_of_agency FOREIGN KEY (invoice_id, agency_id)
        REFERENCES invoices (id, agency_id) NOT VALID,
    DROP CONSTRAINT payments_check1,
    ADD CONSTRAINT payments_invoice_and_agency CHECK (
            (applied_amount = 0 OR invoice_id IS NOT NULL)
        AND (invoice_id IS NULL) = (agency_id IS NULL)) NOT VALID;

-- Agencies are never deleted: their invoices, payments, events and ledger accounts keep naming them.
CREATE FUNCTION agencies_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'agencies are never deleted: their invoices, payments, events and ledger accounts keep '
                    'naming them (revoke the agency''s keys instead)'
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER agencies_never_deleted BEFORE DELETE ON agencies
    FOR EACH ROW EXECUTE FUNCTION agencies_refuse_delete();
CREATE TRIGGER agencies_never_truncated BEFORE TRUNCATE ON agencies
    FOR EACH STATEMENT EXECUTE FUNCTION agencies_refuse_delete();
REVOKE DELETE, TRUNCATE ON agencies FROM paysvc_app;
