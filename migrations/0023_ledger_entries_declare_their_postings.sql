-- The commit-time check no longer depends on anything the session can set (see docs/ledger.md).
--
-- Until now it remembered which of the transaction's entries it had already checked and folded in session
-- settings (ledger.balanced_upto, ledger.balanced_from), which any session can set itself. Three holes
-- followed, all reproduced by tests:
--   * an unbalanced entry could commit: after an early check (SET CONSTRAINTS ... IMMEDIATE, which
--     ledger.fold_pending runs), reset the mark and add a posting to the entry already checked, whose
--     check never runs again;
--   * a posting could be folded twice: reset the mark lower, and the next window folded old entries again;
--   * an entry could be checked but never folded: set the mark higher (or write an entry with an explicit id
--     into a gap of a window already folded). The session chose which, so it could move an account's
--     maintained balance either way away from its postings.
--
-- 1. Every entry declares how many postings it has (ledger_entries.posting_count, written by ledger_post).
--    A posting's line must lie in 1..posting_count and the check requires exactly posting_count postings,
--    so a checked entry has every line taken, and the primary key (entry_id, line) refuses any further
--    posting. An entry that declares no count takes no posting (entries written before this migration have
--    none; they belong to ended transactions, to which postings were refused already).
-- 2. Each entry's own firing of the commit-time trigger checks and folds that entry, and only it.
--    PostgreSQL queues one event per inserted entry and fires it once (an early fold marks it done; a
--    rolled-back savepoint rolls the fold back with it and fires it again), so each posting is folded
--    exactly once. The mark now only spares later firings of a round the locking step: the first firing
--    of a round with several entries locks (creating the missing ones) the balance rows of all of them in
--    account order, so the one-by-one folds that follow never wait out of that order. A session that sets
--    the mark can change the order rows are locked in, never what is checked or folded. Locking out of
--    order can deadlock it with another transaction, and PostgreSQL may abort either one, as with a
--    transaction that folds early (ledger.fold_pending) and posts again; the balances stay exact.
--    Cost: a multi-entry transaction now runs one upsert per entry at commit instead of one for all (a
--    100-entry batch posted at commit is about a quarter slower); single entries cost the same.
-- 3. ledger_post can check and fold a transaction's entries at once, in its own statement (fold_now),
--    instead of at commit: for a transaction that posts once, the same work without the commit-time
--    trigger's firings. Such entries are written with folded = true, and the commit-time trigger skips them
--    (WHEN). Only the ledger's owner can write folded: ledger_post becomes SECURITY DEFINER, and the service
--    role may insert every other column of an entry, not that one.

ALTER TABLE ledger_entries ADD COLUMN posting_count smallint;

ALTER TABLE ledger_entries ADD COLUMN folded boolean NOT NULL DEFAULT false;
REVOKE INSERT ON ledger_entries FROM paysvc_app;
GRANT INSERT (id, txid, kind, description, effective_at, recorded_at, idempotency_key, invoice_id, payment_id,
              settlement_id, reverses, content_hash, posting_count) ON ledger_entries TO paysvc_app;
DROP TRIGGER ledger_entries_apply_balances ON ledger_entries;
CREATE CONSTRAINT TRIGGER ledger_entries_apply_balances AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NOT NEW.folded) EXECUTE FUNCTION ledger_apply_balances();

CREATE OR REPLACE FUNCTION ledger_apply_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    r record;
BEGIN
    SELECT CASE WHEN e.id IS NULL THEN 'entry'
                WHEN a.id IS NULL THEN 'account'
                WHEN e.txid <> pg_current_xact_id() THEN 'txid'
                WHEN e.posting_count IS NULL OR p.line > e.posting_count THEN 'line'
           END AS problem,
           p.entry_id, p.line, p.account_id, p.currency, e.posting_count
      INTO r
      FROM new_postings p
      LEFT JOIN ledger_entries e ON e.id = p.entry_id
      LEFT JOIN ledger_accounts a ON a.id = p.account_id AND a.currency = p.currency
     WHERE e.id IS NULL OR a.id IS NULL OR e.txid <> pg_current_xact_id() OR e.posting_count IS NULL
        OR p.line > e.posting_count
     LIMIT 1;
    IF r.problem = 'entry' THEN
        RAISE EXCEPTION 'posting to entry %, which does not exist', r.entry_id
            USING ERRCODE = 'foreign_key_violation';
    ELSIF r.problem = 'account' THEN
        RAISE EXCEPTION 'posting to account % in %: no such account in that currency', r.account_id, r.currency
            USING ERRCODE = 'foreign_key_violation';
    ELSIF r.problem = 'txid' THEN
        RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
            USING ERRCODE = 'check_violation';
    ELSIF r.problem = 'line' THEN
        RAISE EXCEPTION 'posting line % of journal entry %: the entry declares % postings (posting_count); '
                        'lines run from 1 to posting_count', r.line, r.entry_id, coalesce(r.posting_count::text, 'no')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- The rules every entry must meet, and the fold of its postings into the balances: one function for both
-- ways an entry is checked, by its own commit-time firing and by ledger_post with fold_now. It checks the
-- rows as written (each entry with its stored posting_count and its postings, if any): at least two
-- postings, exactly as many as the entry declares, debits equal to credits in each currency; it raises on
-- the first entry that fails, and otherwise folds their postings into the balance slot of the transaction,
-- rows in account order. Callers run as the ledger's owner; nobody else may call it (it would fold again).
CREATE FUNCTION ledger_check_and_fold(ids bigint[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    r record;
BEGIN
    WITH mine AS MATERIALIZED (
        SELECT e.id, e.posting_count, p.entry_id, p.account_id, p.side, p.amount, p.currency
          FROM unnest(ids) AS i (id)
          JOIN ledger_entries e ON e.id = i.id
          LEFT JOIN ledger_postings p ON p.entry_id = e.id
    ), bad AS MATERIALIZED (
        SELECT per.id AS entry_id, per.declared, sum(per.n) AS n,
               count(*) FILTER (WHERE per.net <> 0) AS unbalanced
          FROM (SELECT id, posting_count AS declared, currency, count(entry_id) AS n,
                       coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) AS net
                  FROM mine GROUP BY id, posting_count, currency) per
         GROUP BY per.id, per.declared
        HAVING sum(per.n) < 2 OR count(*) FILTER (WHERE per.net <> 0) > 0
            OR sum(per.n) IS DISTINCT FROM per.declared
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
    )
    SELECT bad.entry_id, bad.n, bad.unbalanced, bad.declared INTO r FROM (SELECT) AS one LEFT JOIN bad ON true;
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
END $$;
REVOKE EXECUTE ON FUNCTION ledger_check_and_fold(bigint[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    win record;
BEGIN
    IF NEW.txid <> pg_current_xact_id() THEN
        RAISE EXCEPTION 'journal entry %: txid must be the writing transaction''s', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;

    IF NEW.id > done THEN
        -- The first firing of a round (the commit, or an early fold): when the round has several entries, lock
        -- the balance rows of all of them first, creating the missing ones, in account order, so that folding
        -- them one by one below never waits for a row out of that order. The mark only saves later firings
        -- this step; a session that sets it can change the order rows are locked in, never what is folded.
        WITH w AS MATERIALIZED (
            SELECT min(id) AS lo, max(id) AS upto, bool_or(folded) AS mixed
              FROM ledger_entries WHERE txid = pg_current_xact_id() AND id > done
        ), locked AS (
            INSERT INTO ledger_balance_slots AS b (account_id, slot, debits, credits, postings)
            SELECT DISTINCT p.account_id, (pg_current_xact_id()::text::bigint % 16)::smallint, 0, 0, 0
              FROM w
              JOIN ledger_entries e ON e.txid = pg_current_xact_id() AND e.id BETWEEN w.lo AND w.upto
              JOIN ledger_postings p ON p.entry_id = e.id
             WHERE w.lo < w.upto AND NOT w.mixed
             ORDER BY 1
            ON CONFLICT (account_id, slot) DO UPDATE SET postings = b.postings
        )
        SELECT w.lo, w.upto, w.mixed, set_config('ledger.balanced_upto', w.upto::text, true) AS mark
          INTO win FROM w;
        IF win.mixed THEN
            RAISE EXCEPTION 'journal entries % to %: this transaction also posted entries folded at once '
                            '(ledger_post with fold_now); post all of a transaction''s entries in one such call, '
                            'or fold them all at commit', win.lo, win.upto
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    END IF;

    -- This entry, and only it. Each entry's firing runs once (PostgreSQL queues one event per inserted entry,
    -- and an early fold marks it done), so each posting is folded exactly once, whatever the session sets.
    PERFORM ledger_check_and_fold(ARRAY[NEW.id]);
    RETURN NULL;
END $$;

CREATE FUNCTION ledger_post(
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
BEGIN
    IF fold_now IS NULL THEN
        RAISE EXCEPTION 'ledger_post: fold_now must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF fold_now AND EXISTS (SELECT 1 FROM ledger_entries WHERE txid = pg_current_xact_id()) THEN
        -- Balance rows locked here and others locked later (at commit, or by a second call) could deadlock
        -- with another transaction doing the same in the other order.
        RAISE EXCEPTION 'ledger_post with fold_now: this transaction has already written journal entries; post '
                        'all of a transaction''s entries in one call, or fold them at commit'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(a_code) AS a (code)
                WHERE NOT EXISTS (SELECT 1 FROM ledger_accounts x WHERE x.code = a.code)) THEN
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
        -- plain INSERT, without ON CONFLICT's check of every unique index before each row.
        INSERT INTO ledger_entries (id, kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                    content_hash, posting_count, folded)
        SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id, e.settlement_id,
               e.content_hash, e.posting_count, fold_now
          FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                      e_content_hash, e_posting_count)
               WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                     content_hash, posting_count, ord)
         ORDER BY e.ord;
        inserted := ids;
    ELSE
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
            RETURNING id)
        SELECT coalesce(array_agg(id), '{}') INTO inserted FROM ins;
    END IF;

    IF cardinality(inserted) = n THEN
        -- every entry written (the usual case)
        INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency)
        SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency
          FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
               AS p (entry, line, account, side, amount, currency)
          JOIN ledger_accounts a ON a.code = p.account;
        GET DIAGNOSTICS n_written = ROW_COUNT;
        n_expected := cardinality(p_entry);
    ELSIF cardinality(inserted) > 0 THEN
        INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency)
        SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency
          FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
               AS p (entry, line, account, side, amount, currency)
          JOIN unnest(inserted) AS i (id) ON i.id = ids[p.entry]
          JOIN ledger_accounts a ON a.code = p.account;
        GET DIAGNOSTICS n_written = ROW_COUNT;
        SELECT count(*) INTO n_expected
          FROM unnest(p_entry) AS p (entry) JOIN unnest(inserted) AS i (id) ON i.id = ids[p.entry];
    END IF;

    IF n_written <> n_expected THEN
        RAISE EXCEPTION 'ledger_post: % of % postings found their account', n_written, n_expected
            USING ERRCODE = 'foreign_key_violation';
    END IF;

    IF fold_now AND cardinality(inserted) > 0 THEN
        -- Checked and folded now, in this statement, by the same rules as the commit-time check and over the
        -- rows just written: each entry with its stored posting_count and its postings, if any (an entry
        -- given no postings is refused here like any other). The entries were written with folded = true,
        -- which only the ledger's owner can write, so the commit-time trigger skips them; no posting can join
        -- them later (each has exactly the posting_count it declares, and the postings trigger allows only
        -- lines 1..posting_count). Balance rows are locked in account order, as at commit.
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


-- Found by review: PUBLIC could also run the two SECURITY DEFINER trigger functions, from a trigger on a
-- table of its own, and learn from their errors which entry ids exist. A trigger needs no EXECUTE to fire.
REVOKE EXECUTE ON FUNCTION ledger_apply_postings(), ledger_apply_balances() FROM PUBLIC;

-- It runs as the ledger's owner now: only the service's role (and the owner) may call it, not PUBLIC.
REVOKE EXECUTE ON FUNCTION ledger_post(text[], text[], timestamptz[], text[], text[], text[], text[], bigint[],
                                       bytea[], smallint[], int[], smallint[], text[], text[], bigint[], text[],
                                       text[], text[], text[], boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger_post(text[], text[], timestamptz[], text[], text[], text[], text[], bigint[], bytea[],
                                      smallint[], int[], smallint[], text[], text[], bigint[], text[], text[], text[],
                                      text[], boolean) TO paysvc_app;

-- ledger_post writes each entry's posting_count: one more argument. The old signature stays, counting the
-- postings itself, so that code from before this migration keeps posting during a rolling deploy.
CREATE OR REPLACE FUNCTION ledger_post(
    e_kind text[], e_description text[], e_effective_at timestamptz[], e_idempotency_key text[],
    e_invoice_id text[], e_payment_id text[], e_settlement_id text[], e_reverses bigint[],
    e_content_hash bytea[],
    p_entry int[], p_line smallint[], p_account text[], p_side text[], p_amount bigint[], p_currency text[],
    a_code text[], a_type text[], a_currency text[]
) RETURNS TABLE (o_ord int, o_id bigint, o_status text, o_recorded_at timestamptz)
LANGUAGE sql AS $$
    SELECT * FROM ledger_post(
        e_kind, e_description, e_effective_at, e_idempotency_key, e_invoice_id, e_payment_id, e_settlement_id,
        e_reverses, e_content_hash,
        (SELECT array_agg((SELECT count(*) FROM unnest(p_entry) AS p (entry) WHERE p.entry = o)::smallint ORDER BY o)
           FROM generate_series(1, cardinality(e_kind)) AS o),
        p_entry, p_line, p_account, p_side, p_amount, p_currency, a_code, a_type, a_currency, false)
$$;
