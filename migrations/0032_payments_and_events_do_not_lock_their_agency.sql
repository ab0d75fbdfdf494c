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
-- * the agency exists: a payment's agency is its invoice's (written from the invoice row the capture holds
--   locked), and an event's agency is the agency of the invoice, payment or exception it is about; an
--   invoice's agency is checked by its foreign key, and agencies are never deleted (below), so it exists
--   for good. An event naming no agency the service knows would never be numbered by the sequencer (which
--   numbers only agencies in agency_event_seq), so it would show as an unpublished event, not vanish.
-- * a payment has an agency exactly when it has an invoice: now a CHECK, folded into the payment's existing
--   rule about its invoice (one CHECK per table costs less than two: PostgreSQL prepares each one again for
--   every statement that writes the table).

ALTER TABLE payments DROP CONSTRAINT payments_agency_id_fkey;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_agency_id_fkey;

ALTER TABLE payments
    DROP CONSTRAINT payments_check1,
    ADD CONSTRAINT payments_invoice_and_agency CHECK (
            (applied_amount = 0 OR invoice_id IS NOT NULL)
        AND (invoice_id IS NULL) = (agency_id IS NULL));

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
