-- The records the ledger's entries stand on are kept as they were written, as the journal is. Found by an
-- auditor's walk-through: the service's role could delete a resolved exception (the entry that moved its money
-- then had nothing behind it, and ledger verify and reconcile still passed), delete a settlement's lines, and
-- change a settlement's business date or a payment's amount. The service never does any of these: it deletes
-- only what it prunes (outbox events, inbox rows, idempotency keys, treasury sessions), never updates a payment,
-- a payment's report or a settlement line, and sets a settlement's totals once, at import.
--
-- So, for whoever writes, the database refuses (SQLSTATE 23001 restrict_violation):
--   * deleting or truncating invoices, KHQR codes, payments, payment reports, reconciliation exceptions,
--     settlements and settlement lines;
--   * changing any column of a payment but its evidence and payer account, of another channel's report of it but
--     its notice (payer data, both: erasable by the owner, in a migration, never by the service's role), of a
--     settlement line at all;
--   * changing a settlement once its import finished: its totals and journal entry are written then, once, and
--     nothing else of it ever.
-- And the service's role loses DELETE on every table it does not prune, and UPDATE on payments and settlement
-- lines (it never had TRUNCATE, nor UPDATE on payment reports; revoked again here all the same). A superuser can
-- still disable triggers: that is what ledger verify's external anchors and the database's own audit logging are
-- for. Creating the triggers locks the seven tables briefly: migrate with the service stopped, as an upgrade
-- does; under traffic it may end in a deadlock, which changes nothing, and running it again completes it.

CREATE FUNCTION money_records_refuse_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted: the ledger''s entries and the audit trail stand on them',
                    TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation',
              HINT = 'a mistake is corrected by a new record (a resolution, a reversing entry), never by removal';
END $$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['invoices', 'khqr_codes', 'payments', 'payment_reports', 'reconciliation_exceptions',
                             'settlements', 'settlement_lines']
    LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE DELETE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION money_records_refuse_removal()', t || '_never_deleted', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION money_records_refuse_removal()', t || '_never_truncated', t);
    END LOOP;
END $$;

CREATE FUNCTION money_records_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kept text[];   -- the columns that may change, and only when the row allows it
BEGIN
    -- Every other column, today's and any a later migration adds, is compared (found by review: a list of the
    -- columns to keep left out payments.khqr_seq, the payment's number on its code).
    kept := CASE TG_TABLE_NAME
        WHEN 'payments' THEN ARRAY['evidence', 'from_account']      -- payer data: erasable by the owner
        WHEN 'payment_reports' THEN ARRAY['notice']                 -- the notice holds the paying account too
        WHEN 'settlements' THEN ARRAY['line_count', 'journal_entry_id', 'summary']
        ELSE ARRAY[]::text[] END;
    IF (to_jsonb(NEW) - kept) = (to_jsonb(OLD) - kept)
       -- a settlement's totals and entry are written once, when its import finishes (its summary is empty before)
       AND (TG_TABLE_NAME <> 'settlements' OR to_jsonb(OLD) -> 'summary' = '{}'::jsonb) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% row % cannot be changed: the ledger''s entries and the audit trail stand on it as it was '
                    'written', TG_TABLE_NAME,
                    CASE TG_TABLE_NAME   -- read through jsonb: a field the table lacks is then null, not an error
                        WHEN 'settlement_lines' THEN concat(to_jsonb(OLD) ->> 'settlement_id', ' line ',
                                                            to_jsonb(OLD) ->> 'line_no')
                        WHEN 'payment_reports' THEN concat(to_jsonb(OLD) ->> 'provider', ' ',
                                                           to_jsonb(OLD) ->> 'provider_transaction_id')
                        ELSE to_jsonb(OLD) ->> 'id' END
        USING ERRCODE = 'restrict_violation',
              HINT = 'a mistake is corrected by a new record (a resolution, a reversing entry), never by rewriting';
END $$;

CREATE TRIGGER payments_kept_as_written BEFORE UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
CREATE TRIGGER payment_reports_kept_as_written BEFORE UPDATE ON payment_reports
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
CREATE TRIGGER settlement_lines_kept_as_written BEFORE UPDATE ON settlement_lines
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
CREATE TRIGGER settlements_kept_as_written BEFORE UPDATE ON settlements
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();

DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                AND c.relname NOT IN ('outbox_events', 'provider_inbox', 'idempotency_keys', 'treasury_sessions')
    LOOP
        EXECUTE format('REVOKE DELETE, TRUNCATE ON %I FROM paysvc_app', t);
    END LOOP;
END $$;
REVOKE UPDATE ON payments, payment_reports, settlement_lines FROM paysvc_app;
