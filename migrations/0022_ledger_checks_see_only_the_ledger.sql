-- The ledger's own checks can no longer be steered by the session they check. Two holes, both open to the
-- service's role (paysvc_app), each letting an entry that does not balance commit:
--
-- 1. Temporary tables in front of the ledger's. The commit-time check and the postings check run as the
--    ledger's owner (SECURITY DEFINER) with search_path "pg_catalog, public". PostgreSQL searches the
--    session's temporary schema before every schema of such a path unless the path names pg_temp, so a
--    session that created a TEMP TABLE ledger_postings had the commit-time check read its rows instead of
--    the journal's: a one-sided posting of 1,000,000 committed behind a balanced pair in the temporary table.
--    Both functions now name pg_temp last.
-- 2. The fold mark. What a transaction has already checked and folded (its last window of entry ids) was
--    kept in two session settings, ledger.balanced_from and ledger.balanced_upto, which any session can set.
--    A session that folded an entry (SET CONSTRAINTS ... IMMEDIATE), then set the mark back to 0, could add
--    postings to that entry: the postings check took it for unchecked, and its commit-time check had
--    already run. A mark set by hand could also fold an entry twice or not at all. The mark now lives in a
--    one-row temporary table that the commit-time check creates, as the ledger's owner, on a session's
--    first fold: the session's role cannot write it, and a table of that name the session made itself is
--    refused. Like the settings it replaces, it is per session and transactional (a rolled-back
--    savepoint rolls it back). A temporary table is outside serializable transactions' predicate locks,
--    so concurrent SERIALIZABLE writers do not conflict over it (a shared table of marks did, and was
--    not landed for that reason). The one cost for a caller: a transaction that posts to the ledger cannot
--    be prepared for two-phase commit (PostgreSQL refuses PREPARE TRANSACTION after temporary objects).

CREATE FUNCTION ledger_mark_not_ours() RETURNS text LANGUAGE sql IMMUTABLE AS $$
SELECT 'pg_temp.ledger_fold_mark was made by this session, not by the ledger: drop it'
$$;

CREATE OR REPLACE FUNCTION ledger_apply_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    mark regclass := to_regclass('pg_temp.ledger_fold_mark');
    problem text;
BEGIN
    IF mark IS NULL THEN  -- this session has folded nothing yet
        SELECT CASE WHEN e.id IS NULL THEN format('posting to entry %s, which does not exist', p.entry_id)
                    WHEN a.id IS NULL THEN format('posting to account %s in %s: no such account in that currency',
                                                  p.account_id, p.currency)
                    WHEN e.txid <> pg_current_xact_id() THEN 'txid'
               END
          INTO problem
          FROM new_postings p
          LEFT JOIN ledger_entries e ON e.id = p.entry_id
          LEFT JOIN ledger_accounts a ON a.id = p.account_id AND a.currency = p.currency
         WHERE e.id IS NULL OR a.id IS NULL OR e.txid <> pg_current_xact_id()
         LIMIT 1;
    ELSE
        SELECT CASE WHEN mk.owner IS DISTINCT FROM to_regrole(current_user)::oid THEN 'mark'
                    WHEN e.id IS NULL THEN format('posting to entry %s, which does not exist', p.entry_id)
                    WHEN a.id IS NULL THEN format('posting to account %s in %s: no such account in that currency',
                                                  p.account_id, p.currency)
                    WHEN e.txid <> pg_current_xact_id() THEN 'txid'
                    WHEN p.entry_id <= mk.done THEN 'checked'
               END
          INTO problem
          FROM (SELECT c.relowner AS owner, coalesce(m.upto, 0) AS done
                  FROM pg_class c LEFT JOIN pg_temp.ledger_fold_mark m ON m.txid = pg_current_xact_id()
                 WHERE c.oid = mark) mk
         CROSS JOIN new_postings p
          LEFT JOIN ledger_entries e ON e.id = p.entry_id
          LEFT JOIN ledger_accounts a ON a.id = p.account_id AND a.currency = p.currency
         WHERE mk.owner IS DISTINCT FROM to_regrole(current_user)::oid
            OR e.id IS NULL OR a.id IS NULL OR e.txid <> pg_current_xact_id() OR p.entry_id <= mk.done
         LIMIT 1;
    END IF;
    IF problem = 'mark' THEN
        RAISE EXCEPTION '%', ledger_mark_not_ours() USING ERRCODE = 'insufficient_privilege';
    ELSIF problem = 'txid' THEN
        RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
            USING ERRCODE = 'check_violation';
    ELSIF problem = 'checked' THEN
        RAISE EXCEPTION 'postings cannot be added to an entry whose balance was already checked and folded'
            USING ERRCODE = 'check_violation';
    ELSIF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    mark regclass := to_regclass('pg_temp.ledger_fold_mark');
    owner oid;
    checked_from bigint := 0;
    done bigint := 0;
    r record;
    n_postings bigint;
    n_unbalanced bigint;
BEGIN
    IF NEW.txid <> pg_current_xact_id() THEN
        RAISE EXCEPTION 'journal entry %: txid must be the writing transaction''s', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF mark IS NULL THEN  -- this session's first fold: its mark, owned by the ledger
        CREATE TEMP TABLE ledger_fold_mark (txid xid8 NOT NULL, lo bigint NOT NULL, upto bigint NOT NULL)
            WITH (fillfactor = 10);  -- one row, updated once a fold: pruned on nearly every read
        INSERT INTO pg_temp.ledger_fold_mark VALUES ('0', 0, 0);
    ELSE
        SELECT c.relowner, coalesce(m.lo, 0), coalesce(m.upto, 0) INTO owner, checked_from, done
          FROM pg_class c LEFT JOIN pg_temp.ledger_fold_mark m ON m.txid = pg_current_xact_id()
         WHERE c.oid = mark;
        IF owner IS DISTINCT FROM to_regrole(current_user)::oid THEN
            RAISE EXCEPTION '%', ledger_mark_not_ours() USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    IF NEW.id <= done THEN
        IF NEW.id < checked_from THEN
            RAISE EXCEPTION 'journal entry %: its id is below entries this transaction already checked; '
                            'let the sequence choose entry ids', NEW.id
                USING ERRCODE = 'check_violation';
        END IF;
        -- Checked by an earlier firing's window, unless its id was written by hand into a gap of that
        -- window: this entry is checked on its own.
        SELECT coalesce(sum(per.n), 0), count(*) FILTER (WHERE per.net <> 0) INTO n_postings, n_unbalanced
          FROM (SELECT count(*) AS n, sum(CASE side WHEN 'debit' THEN amount ELSE -amount END) AS net
                  FROM ledger_postings WHERE entry_id = NEW.id GROUP BY currency) per;
        IF n_postings < 2 OR n_unbalanced > 0 THEN
            RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
                NEW.id, n_postings, n_unbalanced
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NULL;
    END IF;

    -- This entry is not checked yet, so the window of the transaction's unchecked entries holds at least it.
    -- Rows are created or locked and updated one by one in the order of the sorted SELECT: account order.
    WITH w AS MATERIALIZED (
        SELECT min(id) AS lo, max(id) AS upto
          FROM ledger_entries WHERE txid = pg_current_xact_id() AND id > done
    ), mine AS MATERIALIZED (
        SELECT e.id, p.entry_id, p.account_id, p.side, p.amount, p.currency
          FROM w CROSS JOIN ledger_entries e LEFT JOIN ledger_postings p ON p.entry_id = e.id
         WHERE e.txid = pg_current_xact_id() AND e.id BETWEEN w.lo AND w.upto
    ), bad AS MATERIALIZED (
        -- Every entry: at least two postings, and debits equal credits in each currency.
        SELECT per.id, sum(per.n) AS n, count(*) FILTER (WHERE per.net <> 0) AS unbalanced
          FROM (SELECT id, currency, count(entry_id) AS n,
                       coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) AS net
                  FROM mine GROUP BY id, currency) per
         GROUP BY per.id
        HAVING sum(per.n) < 2 OR count(*) FILTER (WHERE per.net <> 0) > 0
         ORDER BY per.id
         LIMIT 1
    ), fold AS (
        INSERT INTO ledger_balance_slots AS b (account_id, slot, debits, credits, postings, last_entry_id)
        SELECT account_id, (pg_current_xact_id()::text::bigint % 16)::smallint,
               coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0),
               coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0),
               count(*), max(entry_id)
          FROM mine
         WHERE entry_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM bad)
         GROUP BY account_id
         ORDER BY account_id
        ON CONFLICT (account_id, slot) DO UPDATE
           SET debits = b.debits + EXCLUDED.debits, credits = b.credits + EXCLUDED.credits,
               postings = b.postings + EXCLUDED.postings,
               last_entry_id = greatest(b.last_entry_id, EXCLUDED.last_entry_id)
    ), marked AS (
        UPDATE pg_temp.ledger_fold_mark SET txid = pg_current_xact_id(), lo = w.lo, upto = w.upto FROM w
    )
    SELECT bad.id AS bad_id, bad.n AS bad_n, bad.unbalanced AS bad_unbalanced
      INTO r
      FROM w LEFT JOIN bad ON true;
    IF r.bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
            r.bad_id, r.bad_n, r.bad_unbalanced
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
