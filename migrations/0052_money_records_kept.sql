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
--   * changing what a payment is (provider, transaction id, invoice, agency, code, bill number, currency,
--     amounts, accounts, times, source, inbox row); its evidence and payer account stay writable by the owner
--     (a migration erasing payer data), not by the service's role;
--   * changing a payment report or a settlement line at all;
--   * changing what a settlement is (provider, format, business date, file, importer, time), or its journal
--     entry once set.
-- And the service's role loses DELETE and TRUNCATE on every table it does not prune, and UPDATE on payments,
-- payment reports and settlement lines. A superuser can still disable triggers: that is what ledger verify's
-- external anchors and the database's own audit logging are for.

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
BEGIN
    IF TG_TABLE_NAME = 'payments' THEN
        IF (NEW.id, NEW.provider, NEW.provider_transaction_id, NEW.invoice_id, NEW.agency_id, NEW.khqr_md5,
            NEW.bill_number, NEW.currency, NEW.amount, NEW.applied_amount, NEW.suspense_amount, NEW.to_account,
            NEW.paid_at, NEW.captured_at, NEW.source, NEW.inbox_id)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.provider, OLD.provider_transaction_id, OLD.invoice_id, OLD.agency_id, OLD.khqr_md5,
            OLD.bill_number, OLD.currency, OLD.amount, OLD.applied_amount, OLD.suspense_amount, OLD.to_account,
            OLD.paid_at, OLD.captured_at, OLD.source, OLD.inbox_id) THEN
            RETURN NEW;
        END IF;
    ELSIF TG_TABLE_NAME = 'settlements' THEN
        IF (NEW.id, NEW.provider, NEW.format, NEW.business_date, NEW.file_sha256, NEW.file_name, NEW.file_size,
            NEW.imported_at, NEW.imported_by)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.provider, OLD.format, OLD.business_date, OLD.file_sha256, OLD.file_name, OLD.file_size,
            OLD.imported_at, OLD.imported_by)
           AND (OLD.journal_entry_id IS NULL OR NEW.journal_entry_id IS NOT DISTINCT FROM OLD.journal_entry_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '% row % cannot be changed: the ledger''s entries and the audit trail stand on it as it was '
                    'written', TG_TABLE_NAME,
                    coalesce(to_jsonb(OLD) ->> 'id', concat_ws(' line ', to_jsonb(OLD) ->> 'settlement_id',
                                                               to_jsonb(OLD) ->> 'line_no'),
                             to_jsonb(OLD) ->> 'payment_id')
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
