-- The service logs in as a member of paysvc_app. Tables made after the ledger (payments, events,
-- webhooks) had no grants for it yet: plain read/write, as for the invoicing tables. The journal keeps
-- its append-only grants (SELECT and INSERT only; no UPDATE or DELETE).
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                AND c.relname NOT LIKE 'ledger\_%' AND c.relname <> 'schema_migrations'
                AND c.relname <> 'settlement_staging_shape'
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO paysvc_app', t);
    END LOOP;
END $$;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO paysvc_app;
-- Balance rows are written only by the commit-time trigger (SECURITY DEFINER), never by the service.
REVOKE INSERT, UPDATE, DELETE ON ledger_balances FROM paysvc_app;
