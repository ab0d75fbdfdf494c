-- Plans that stay right whatever the tables' size was when they were made.
--
-- The ledger's functions reuse one generic plan per connection (0012), made on its first call with the
-- table sizes of that moment. On a new database (tables nearly empty) the planner chose hash joins over
-- sequential scans of ledger_accounts and ledger_entries, and, at commit, a scan of ledger_entries by id
-- from 0 up to the transaction's last entry: every one of them grows with the ledger. A pooled connection
-- keeps such a plan until statistics change (autovacuum's ANALYZE, a minute or more later) or the
-- connection closes. Measured with pgbench posting single payment-shaped entries through ledger_post, 8
-- clients, on a just-migrated database: 523 entries/s against 3,091/s when the same connections start on
-- a filled one, the commit-time fold taking 2.6 ms instead of 0.06 ms.
--
-- 1. The commit-time check and fold bound the transaction's entries on both sides (lowest and highest id
--    it wrote since the last fold), so whichever index the plan uses, it reads only this transaction's
--    window of ids.
-- 2. ledger_post and the postings check never use hash or merge joins: each joins a handful of rows (a
--    batch's at most) to an index by key, which a nested loop does in time independent of table size.

CREATE OR REPLACE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    lo bigint;
    upto bigint;
    bad record;
BEGIN
    SELECT min(id), max(id) INTO lo, upto FROM ledger_entries WHERE txid = pg_current_xact_id() AND id > done;
    IF upto IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('ledger.balanced_upto', upto::text, true);

    -- Every entry: at least two postings, and debits equal credits in each currency.
    SELECT per.id, sum(per.n) AS n, count(*) FILTER (WHERE per.net <> 0) AS unbalanced INTO bad
      FROM (SELECT e.id, p.currency, count(p.entry_id) AS n,
                   coalesce(sum(CASE p.side WHEN 'debit' THEN p.amount ELSE -p.amount END), 0) AS net
              FROM ledger_entries e LEFT JOIN ledger_postings p ON p.entry_id = e.id
             WHERE e.txid = pg_current_xact_id() AND e.id BETWEEN lo AND upto
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

    -- Rows are created or locked and updated one by one in the order of the sorted SELECT: account order.
    INSERT INTO ledger_balance_slots AS b (account_id, slot, debits, credits, postings, last_entry_id)
    SELECT p.account_id, (pg_current_xact_id()::text::bigint % 16)::smallint,
           coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0),
           coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0),
           count(*), max(p.entry_id)
      FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
     WHERE e.txid = pg_current_xact_id() AND e.id BETWEEN lo AND upto
     GROUP BY p.account_id
     ORDER BY p.account_id
    ON CONFLICT (account_id, slot) DO UPDATE
       SET debits = b.debits + EXCLUDED.debits, credits = b.credits + EXCLUDED.credits,
           postings = b.postings + EXCLUDED.postings,
           last_entry_id = greatest(b.last_entry_id, EXCLUDED.last_entry_id);
    RETURN NULL;
END $$;

ALTER FUNCTION ledger_post(text[], text[], timestamptz[], text[], text[], text[], text[], bigint[], bytea[], int[],
                           smallint[], text[], text[], bigint[], text[], text[], text[], text[])
    SET enable_hashjoin = off SET enable_mergejoin = off;
ALTER FUNCTION ledger_apply_postings() SET enable_hashjoin = off SET enable_mergejoin = off;
