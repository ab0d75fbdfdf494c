-- The ledger's SECURITY DEFINER checks read only the ledger's tables, never a temporary table of the same
-- name. The commit-time balance check and the postings check run as the ledger's owner with search_path
-- "pg_catalog, public". PostgreSQL searches the session's temporary schema before every schema of such a
-- path unless the path names pg_temp, so a session of the service's role that created a TEMP TABLE
-- ledger_postings had the commit-time check read its rows instead of the journal's: a one-sided posting of
-- 1,000,000 committed behind a balanced pair in the temporary table. Both functions now name pg_temp last,
-- as PostgreSQL's documentation advises for SECURITY DEFINER functions.

ALTER FUNCTION ledger_apply_postings() SET search_path = pg_catalog, public, pg_temp;
ALTER FUNCTION ledger_apply_balances() SET search_path = pg_catalog, public, pg_temp;
