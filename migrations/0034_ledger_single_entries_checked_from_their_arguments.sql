-- Cheaper single-entry posting with fold_now (a payment's capture, scenario a of load.ledger_bench): the same
-- rules, about a tenth fewer instructions per entry in the database. Measured with callgrind on one backend
-- running ledger_post through pgbench (a payment-shaped entry, fold_now): 1,237,964 instructions before,
-- 1,103,452 after (1,192,810 with step 1 alone).
--
-- 1. The postings' rules move from a table CHECK into domains, as the entries' did in 0024 and the balance
--    slots' in 0031: PostgreSQL reads a table's CHECK expressions again for every statement that writes the
--    table (about 45,000 instructions per posting statement here), a domain's once per connection. Same
--    rules, same SQLSTATE (23514), and an upper limit on amounts the library already kept. The columns change
--    to domains without constraints, over the same types, which neither rewrites nor scans the table nor
--    rebuilds its indexes (it drops the columns' statistics: ANALYZE below); the constraints are then added
--    NOT VALID: every row already in the table was written under the table CHECK, which held the same rules
--    (amounts above the new limit are checked from now on), and validating them again would scan the largest
--    table under a lock that stops posting. New rows are checked.
-- 2. ledger_post with fold_now for one entry without idempotency key or reversal writes the entry, its
--    postings and the balance fold in one statement, as before, and checks the entry against its arguments
--    instead of through the rows that statement returns: once every posting given is known to be written,
--    those rows are the arguments. Two postings (most entries) balance when they are in one currency, of
--    one amount, on opposite sides: three comparisons instead of a query. Any other shape is summed per
--    currency by a query, as before. The balance is known before writing, so an entry that does not balance is
--    not folded (it locks no balance row) and is then refused. Batches keep the previous statement.

CREATE DOMAIN ledger_posting_line AS smallint;
CREATE DOMAIN ledger_posting_side AS text;
CREATE DOMAIN ledger_posting_amount AS bigint;
-- The table CHECK goes first, in the same statement: a CHECK still on a column whose type changes is checked
-- again against every row (found by review).
ALTER TABLE ledger_postings
    DROP CONSTRAINT ledger_postings_valid,
    ALTER COLUMN line TYPE ledger_posting_line,
    ALTER COLUMN side TYPE ledger_posting_side,
    ALTER COLUMN amount TYPE ledger_posting_amount;
ALTER DOMAIN ledger_posting_line ADD CONSTRAINT ledger_posting_line_from_1 CHECK (VALUE >= 1) NOT VALID;
ALTER DOMAIN ledger_posting_side ADD CONSTRAINT ledger_posting_side_debit_or_credit
    CHECK (VALUE IN ('debit', 'credit')) NOT VALID;
-- At most 10^15 minor units, the library's limit (ledger.postings.MAX_AMOUNT), now the database's too: two
-- postings of the largest bigint could be written before, and overflowed the sum of the balance slots, so the
-- ledger_balances view and later postings to those slots failed (found by review).
ALTER DOMAIN ledger_posting_amount ADD CONSTRAINT ledger_posting_amount_range
    CHECK (VALUE > 0 AND VALUE <= 1000000000000000) NOT VALID;
-- A column's new type drops its statistics.
ANALYZE ledger_postings;

-- ledger_post: as in 0031, with the single-entry branch (fold_now, n = 1) first. Signature and grants unchanged.
CREATE OR REPLACE FUNCTION ledger_post(
    e_kind text[], e_description text[], e_effective_at timestamptz[], e_idempotency_key text[],
    e_invoice_id text[], e_payment_id text[], e_settlement_id text[], e_reverses bigint[],
    e_content_hash bytea[], e_posting_count smallint[],
    p_entry int[], p_line smallint[], p_account text[], p_side text[], p_amount bigint[], p_currency text[],
    a_code text[], a_type text[], a_currency text[], fold_now boolean
) RETURNS TABLE (o_ord int, o_id bigint, o_status text, o_recorded_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    n int := cardinality(e_kind);
    ids bigint[];
    inserted bigint[];
    n_expected bigint := 0;
    n_written bigint := 0;
    has_entries boolean;
    missing_accounts boolean;
    reversals boolean := false;
    -- Postings given: unnest pads a shorter argument with NULLs, and a posting padded with a NULL entry, line,
    -- account or currency is left out by the inserts (a NULL side or amount is refused by a constraint), so a
    -- posting counts if any posting argument has an element for it, and one left out is refused below.
    n_given bigint := greatest(cardinality(p_entry), cardinality(p_line), cardinality(p_account),
                               cardinality(p_side), cardinality(p_amount), cardinality(p_currency));
    r record;
    declared bigint;
    n_lines bigint;
    n_unbalanced bigint;
BEGIN
    IF fold_now IS NULL THEN
        RAISE EXCEPTION 'ledger_post: fold_now must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- One query for both questions asked before writing anything.
    SELECT fold_now AND EXISTS (SELECT 1 FROM ledger_entries WHERE txid = pg_current_xact_id()),
           EXISTS (SELECT 1 FROM unnest(a_code) AS a (code)
                    WHERE NOT EXISTS (SELECT 1 FROM ledger_accounts x WHERE x.code = a.code))
      INTO has_entries, missing_accounts;
    IF has_entries THEN
        -- Balance rows locked here and others locked later (at commit, or by a second call) could deadlock
        -- with another transaction doing the same in the other order.
        RAISE EXCEPTION 'ledger_post with fold_now: this transaction has already written journal entries; post '
                        'all of a transaction''s entries in one call, or fold them at commit'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF missing_accounts THEN
        -- Before any entry is written: a writer waiting here for another's new account holds no key yet.
        INSERT INTO ledger_accounts (code, type, currency, normal_side)
        SELECT a.code, a.type, a.currency, CASE WHEN a.type IN ('asset', 'expense') THEN 'debit' ELSE 'credit' END
          FROM unnest(a_code, a_type, a_currency) AS a (code, type, currency)
         WHERE NOT EXISTS (SELECT 1 FROM ledger_accounts x WHERE x.code = a.code)
         ORDER BY a.code
        ON CONFLICT (code) DO NOTHING;
    END IF;

    FOR i IN 1 .. n LOOP
        ids[i] := nextval('ledger_entries_id_seq');
    END LOOP;

    IF array_remove(e_idempotency_key, NULL) = '{}' AND array_remove(e_reverses, NULL) = '{}' THEN
        -- No idempotency key and no reversal: nothing to conflict with (ids come from the sequence), so a
        -- plain INSERT, without ON CONFLICT's check of every unique index before each row; the entries and
        -- their postings in one statement.
        IF fold_now AND n = 1 THEN
            -- One entry (a payment, a single posting): written and folded in one statement, and checked
            -- against the arguments rather than through the rows the statement returns (the branch below), by
            -- the same rules. Once every posting given is known to be written (n_written = n_given: each row
            -- of the posting arguments joins at most one account and the one entry, so none was dropped or
            -- doubled), the written postings are exactly the arguments' rows, and their count and balance per
            -- currency are those of the arguments. Two postings (most entries) balance when they are in one
            -- currency, of one amount, on opposite sides; any other entry is summed per currency. The fold
            -- writes nothing for an entry that does not balance (so an unbalanced call waits on no balance row);
            -- it is refused just after the statement, as is an entry whose postings are not as many as it
            -- declares (folded, since the count it was stored with is known only from the statement), or, when
            -- some posting was not written, below; either undoes the rest. Balance rows are locked in account
            -- order, as at commit.
            IF n_given = 2 AND coalesce(p_currency[1] = p_currency[2] AND p_amount[1] = p_amount[2]
                                        AND p_side[1] <> p_side[2], false) THEN
                n_lines := 2;
                n_unbalanced := 0;
            ELSE
                SELECT coalesce(sum(per.n), 0), count(*) FILTER (WHERE per.net <> 0)
                  INTO n_lines, n_unbalanced
                  FROM (SELECT count(*) AS n,
                               sum(CASE p.side WHEN 'debit' THEN p.amount ELSE -p.amount END) AS net
                          FROM unnest(p_side, p_amount, p_currency) AS p (side, amount, currency)
                         GROUP BY p.currency) AS per;
            END IF;
            WITH written AS (
                INSERT INTO ledger_entries (id, kind, description, effective_at, invoice_id, payment_id,
                                            settlement_id, content_hash, posting_count, folded)
                SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id,
                       e.settlement_id, e.content_hash, e.posting_count, true
                  FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                              e_content_hash, e_posting_count)
                       WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                             content_hash, posting_count, ord)
                RETURNING id, posting_count
            ), lines AS (
                INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked)
                SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency, true
                  FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                       AS p (entry, line, account, side, amount, currency)
                  JOIN written w ON w.id = ids[p.entry]
                  JOIN ledger_accounts a ON a.code = p.account AND a.currency = p.currency
                 WHERE p.line BETWEEN 1 AND w.posting_count
                RETURNING entry_id, account_id, side, amount
            ), fold AS (
                INSERT INTO ledger_balance_slots AS b (account_id, slot, debits, credits, postings, last_entry_id)
                SELECT account_id, (pg_current_xact_id()::text::bigint % 16)::smallint,
                       coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0),
                       coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0),
                       count(*), max(entry_id)
                  FROM lines
                 WHERE n_lines >= 2 AND n_unbalanced = 0
                 GROUP BY account_id
                 ORDER BY account_id
                ON CONFLICT (account_id, slot) DO UPDATE
                   SET debits = b.debits + EXCLUDED.debits, credits = b.credits + EXCLUDED.credits,
                       postings = b.postings + EXCLUDED.postings,
                       last_entry_id = greatest(b.last_entry_id, EXCLUDED.last_entry_id)
            )
            SELECT (SELECT count(*) FROM lines), (SELECT max(posting_count) FROM written)
              INTO n_written, declared;
            n_expected := n_given;
            IF n_written = n_expected THEN
                -- the fold above wrote nothing for an entry that does not balance
                IF n_lines < 2 OR n_unbalanced > 0 THEN
                    RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
                        ids[1], n_lines, n_unbalanced
                        USING ERRCODE = 'check_violation';
                ELSIF n_lines IS DISTINCT FROM declared THEN
                    RAISE EXCEPTION 'journal entry % has % postings but declares % (posting_count)',
                        ids[1], n_lines, coalesce(declared::text, 'none')
                        USING ERRCODE = 'check_violation';
                END IF;
                o_ord := 1;
                o_id := ids[1];
                o_status := 'posted';
                o_recorded_at := now();
                RETURN NEXT;
                RETURN;
            END IF;
            -- some postings were not written: refused below, which undoes the rest
        ELSIF fold_now THEN
            -- Written, checked and folded in one statement: the check and the fold read the postings this
            -- statement wrote (RETURNING), by the same rules as ledger_check_and_fold; the fold writes nothing
            -- when an entry does not pass, and the error below then undoes the rest. Balance rows are locked
            -- in account order, as at commit.
            WITH written AS (
                INSERT INTO ledger_entries (id, kind, description, effective_at, invoice_id, payment_id,
                                            settlement_id, content_hash, posting_count, folded)
                SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id,
                       e.settlement_id, e.content_hash, e.posting_count, true
                  FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                              e_content_hash, e_posting_count)
                       WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                             content_hash, posting_count, ord)
                 ORDER BY e.ord
                RETURNING id, posting_count
            ), lines AS (
                INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked)
                SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency, true
                  FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                       AS p (entry, line, account, side, amount, currency)
                  JOIN written w ON w.id = ids[p.entry]
                  JOIN ledger_accounts a ON a.code = p.account AND a.currency = p.currency
                 WHERE p.line BETWEEN 1 AND w.posting_count
                RETURNING entry_id, account_id, side, amount, currency
            ), bad AS MATERIALIZED (
                SELECT w.id AS entry_id, w.posting_count AS declared, coalesce(sum(per.n), 0) AS n,
                       count(*) FILTER (WHERE per.net <> 0) AS unbalanced
                  FROM written w
                  LEFT JOIN (SELECT entry_id, currency, count(*) AS n,
                                    sum(CASE side WHEN 'debit' THEN amount ELSE -amount END) AS net
                               FROM lines GROUP BY entry_id, currency) per ON per.entry_id = w.id
                 GROUP BY w.id, w.posting_count
                HAVING coalesce(sum(per.n), 0) < 2 OR count(*) FILTER (WHERE per.net <> 0) > 0
                    OR sum(per.n) IS DISTINCT FROM w.posting_count
                 ORDER BY w.id
                 LIMIT 1
            ), fold AS (
                INSERT INTO ledger_balance_slots AS b (account_id, slot, debits, credits, postings, last_entry_id)
                SELECT account_id, (pg_current_xact_id()::text::bigint % 16)::smallint,
                       coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0),
                       coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0),
                       count(*), max(entry_id)
                  FROM lines
                 WHERE NOT EXISTS (SELECT 1 FROM bad)
                 GROUP BY account_id
                 ORDER BY account_id
                ON CONFLICT (account_id, slot) DO UPDATE
                   SET debits = b.debits + EXCLUDED.debits, credits = b.credits + EXCLUDED.credits,
                       postings = b.postings + EXCLUDED.postings,
                       last_entry_id = greatest(b.last_entry_id, EXCLUDED.last_entry_id)
            )
            SELECT (SELECT count(*) FROM lines) AS written, bad.entry_id, bad.n, bad.unbalanced, bad.declared
              INTO r
              FROM (SELECT) AS one LEFT JOIN bad ON true;
            n_written := r.written;
            n_expected := n_given;
            IF n_written = n_expected THEN
                IF r.entry_id IS NOT NULL THEN
                    IF r.n >= 2 AND r.unbalanced = 0 THEN
                        RAISE EXCEPTION 'journal entry % has % postings but declares % (posting_count)',
                            r.entry_id, r.n, coalesce(r.declared::text, 'none')
                            USING ERRCODE = 'check_violation';
                    END IF;
                    RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
                        r.entry_id, r.n, r.unbalanced
                        USING ERRCODE = 'check_violation';
                END IF;
                FOR i IN 1 .. n LOOP
                    o_ord := i;
                    o_id := ids[i];
                    o_status := 'posted';
                    o_recorded_at := now();
                    RETURN NEXT;
                END LOOP;
                RETURN;
            END IF;
            -- some postings were not written: refused below, which undoes the rest
        ELSE
            WITH written AS (
                INSERT INTO ledger_entries (id, kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                            content_hash, posting_count, folded)
                SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id, e.settlement_id,
                       e.content_hash, e.posting_count, false
                  FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                              e_content_hash, e_posting_count)
                       WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                             content_hash, posting_count, ord)
                 ORDER BY e.ord
                RETURNING id, posting_count)
            INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked)
            SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency, true
              FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                   AS p (entry, line, account, side, amount, currency)
              JOIN written w ON w.id = ids[p.entry]
              JOIN ledger_accounts a ON a.code = p.account AND a.currency = p.currency
             WHERE p.line BETWEEN 1 AND w.posting_count;
            GET DIAGNOSTICS n_written = ROW_COUNT;
        END IF;
        n_expected := n_given;
        inserted := ids;
    ELSE
        reversals := array_remove(e_reverses, NULL) <> '{}';
        -- The entries, and when every one was written (the usual case: no key met before), their postings, in
        -- one statement; otherwise the postings of those written follow in a statement of their own.
        WITH ins AS (
            INSERT INTO ledger_entries (id, kind, description, effective_at, idempotency_key, invoice_id,
                                        payment_id, settlement_id, reverses, content_hash, posting_count, folded)
            SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.idem, e.invoice_id, e.payment_id,
                   e.settlement_id, e.reverses, e.content_hash, e.posting_count, fold_now
              FROM unnest(e_kind, e_description, e_effective_at, e_idempotency_key, e_invoice_id, e_payment_id,
                          e_settlement_id, e_reverses, e_content_hash, e_posting_count)
                   WITH ORDINALITY AS e (kind, description, effective_at, idem, invoice_id, payment_id,
                                         settlement_id, reverses, content_hash, posting_count, ord)
             ORDER BY e.ord
            ON CONFLICT DO NOTHING
            RETURNING id, posting_count
        ), lines AS (
            INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked)
            SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency, true
              FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                   AS p (entry, line, account, side, amount, currency)
              JOIN ins w ON w.id = ids[p.entry]
              JOIN ledger_accounts a ON a.code = p.account AND a.currency = p.currency
             WHERE (SELECT count(*) FROM ins) = n AND p.line BETWEEN 1 AND w.posting_count
            RETURNING 1
        )
        SELECT coalesce((SELECT array_agg(id) FROM ins), '{}'), (SELECT count(*) FROM lines)
          INTO inserted, n_written;
        IF cardinality(inserted) = n THEN
            n_expected := n_given;
        ELSIF cardinality(inserted) > 0 THEN
            INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked)
            SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency, true
              FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                   AS p (entry, line, account, side, amount, currency)
              JOIN unnest(inserted) AS i (id) ON i.id = ids[p.entry]
              JOIN ledger_entries w ON w.id = i.id
              JOIN ledger_accounts a ON a.code = p.account AND a.currency = p.currency
             WHERE p.line BETWEEN 1 AND w.posting_count;
            GET DIAGNOSTICS n_written = ROW_COUNT;
            SELECT count(*) INTO n_expected
              FROM unnest(p_entry) AS p (entry) JOIN unnest(inserted) AS i (id) ON i.id = ids[p.entry];
        END IF;
    END IF;

    IF n_written IS DISTINCT FROM n_expected THEN
        -- Its postings are written prechecked, which the postings trigger skips: the inserts wrote only those
        -- that meet the trigger's rules (an entry of this call, a line in 1..the posting_count that entry was
        -- stored with, an account in the posting's currency), so a shortfall is refused here, naming the first
        -- posting left out. (A posting of an entry whose idempotency key was met before is not written, and
        -- not counted.)
        SELECT CASE WHEN q.entry IS NULL OR q.entry NOT BETWEEN 1 AND n THEN 'entry'
                    WHEN NOT EXISTS (SELECT 1 FROM ledger_accounts a WHERE a.code = q.account) THEN 'no account'
                    WHEN NOT EXISTS (SELECT 1 FROM ledger_accounts a WHERE a.code = q.account
                                                                       AND a.currency = q.currency) THEN 'currency'
                    ELSE 'line' END AS problem,
               q.entry, q.line, q.account, q.currency, w.posting_count AS declared
          INTO r
          FROM unnest(p_entry, p_line, p_account, p_currency) WITH ORDINALITY AS q (entry, line, account, currency, ord)
          LEFT JOIN ledger_entries w ON w.id = ids[q.entry]
         WHERE (q.entry IS NULL OR q.entry NOT BETWEEN 1 AND n OR ids[q.entry] = ANY (inserted))
           AND (q.entry IS NULL OR q.entry NOT BETWEEN 1 AND n
            OR NOT EXISTS (SELECT 1 FROM ledger_accounts a WHERE a.code = q.account AND a.currency = q.currency)
            OR q.line IS NULL OR w.posting_count IS NULL OR q.line NOT BETWEEN 1 AND w.posting_count)
         ORDER BY q.ord
         LIMIT 1;
        IF r.problem = 'entry' THEN
            RAISE EXCEPTION 'ledger_post: a posting names entry % of this call, which has % entries',
                coalesce(r.entry::text, 'NULL'), n
                USING ERRCODE = 'foreign_key_violation';
        ELSIF r.problem = 'currency' THEN
            RAISE EXCEPTION 'posting to account % in %: no such account in that currency',
                r.account, coalesce(r.currency, 'NULL')
                USING ERRCODE = 'foreign_key_violation';
        ELSIF r.problem = 'line' THEN
            RAISE EXCEPTION 'posting line % of journal entry %: the entry declares % postings (posting_count); '
                            'lines run from 1 to posting_count', coalesce(r.line::text, 'NULL'), ids[r.entry],
                            coalesce(r.declared::text, 'no')
                USING ERRCODE = 'check_violation';
        END IF;
        RAISE EXCEPTION 'ledger_post: % of % postings found their account', n_written, n_expected
            USING ERRCODE = 'foreign_key_violation';
    END IF;

    IF fold_now AND cardinality(inserted) > 0 THEN
        -- Checked and folded now, in this statement, by the same rules as the commit-time check and over the
        -- rows just written: each entry with its stored posting_count and its postings, if any (an entry
        -- given no postings is refused here like any other). The entries were written with folded = true,
        -- which only the ledger's owner can write, so the commit-time trigger skips them; no posting can join
        -- them later (each has exactly the posting_count it declares, and only lines 1..posting_count are
        -- allowed: by the check at the top for this function's postings, by the postings trigger for others'). Balance rows are locked in account order, as at commit.
        -- Only the branch for keyed or reversing entries gets here (the plain branch returned above, or
        -- was refused just above). Entries that name the entry they reverse are checked against it first.
        IF reversals THEN
            PERFORM ledger_check_reversals(inserted);
        END IF;
        PERFORM ledger_check_and_fold(inserted);
    END IF;

    IF cardinality(inserted) = n THEN
        FOR i IN 1 .. n LOOP
            o_ord := i;
            o_id := ids[i];
            o_status := 'posted';
            o_recorded_at := now();
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT e.ord::int,
           coalesce(i.id, x.id),
           CASE WHEN i.id IS NOT NULL THEN 'posted' WHEN x.id IS NOT NULL THEN 'replayed'
                WHEN EXISTS (SELECT 1 FROM ledger_entries rv WHERE rv.reverses = e_reverses[e.ord]) THEN 'already_reversed'
                ELSE 'id_taken' END,
           CASE WHEN i.id IS NOT NULL THEN now() ELSE x.recorded_at END
      FROM unnest(e_idempotency_key) WITH ORDINALITY AS e (idem, ord)
      LEFT JOIN unnest(inserted) AS i (id) ON i.id = ids[e.ord]
      LEFT JOIN ledger_entries x ON i.id IS NULL AND x.idempotency_key = e.idem
     ORDER BY e.ord;
END $$;
