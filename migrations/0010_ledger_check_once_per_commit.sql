-- Check that entries balance once per committing transaction instead of once per entry: the commit-time
-- fold already gathers the transaction's postings, so it checks them in the same pass. A micro-batch of
-- 100 entries ran 100 check queries inside COMMIT (while holding its balance rows); now it runs one.
-- Every entry is still checked at commit whoever writes it: the fold's trigger fires for every entry.

DROP TRIGGER ledger_entries_balanced ON ledger_entries;
DROP FUNCTION ledger_check_entry();

-- An entry's txid must be its writing transaction's (the fold finds a transaction's entries by it).
CREATE FUNCTION ledger_entry_txid() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.txid <> pg_current_xact_id() THEN
        RAISE EXCEPTION 'journal entry %: txid must be the writing transaction''s', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_entries_txid BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entry_txid();

CREATE OR REPLACE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    upto bigint;
    bad record;
BEGIN
    SELECT max(id) INTO upto FROM ledger_entries WHERE txid = pg_current_xact_id() AND id > done;
    IF upto IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('ledger.balanced_upto', upto::text, true);

    -- Every entry: at least two postings, and debits equal credits in each currency.
    SELECT per.id, sum(per.n) AS n, count(*) FILTER (WHERE per.net <> 0) AS unbalanced INTO bad
      FROM (SELECT e.id, p.currency, count(p.entry_id) AS n,
                   coalesce(sum(CASE p.side WHEN 'debit' THEN p.amount ELSE -p.amount END), 0) AS net
              FROM ledger_entries e LEFT JOIN ledger_postings p ON p.entry_id = e.id
             WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto
             GROUP BY e.id, p.currency) per
     GROUP BY per.id
    HAVING sum(per.n) < 2 OR count(*) FILTER (WHERE per.net <> 0) > 0
     ORDER BY per.id
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
            bad.id, bad.n, bad.unbalanced
            USING ERRCODE = 'check_violation';
    END IF;

    INSERT INTO ledger_balances (account_id)
    SELECT DISTINCT p.account_id
      FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
     WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto
     ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM ledger_balances
      WHERE account_id IN (SELECT p.account_id
                             FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
                            WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto)
      ORDER BY account_id FOR UPDATE;
    UPDATE ledger_balances b
       SET debits = b.debits + d.debits, credits = b.credits + d.credits, postings = b.postings + d.n,
           last_entry_id = greatest(b.last_entry_id, d.last_entry_id)
      FROM (SELECT p.account_id,
                   coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0) AS debits,
                   coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0) AS credits,
                   count(*) AS n, max(p.entry_id) AS last_entry_id
              FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
             WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto
             GROUP BY p.account_id) d
     WHERE b.account_id = d.account_id;
    RETURN NULL;
END $$;
