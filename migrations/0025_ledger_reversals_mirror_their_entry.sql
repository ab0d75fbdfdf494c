-- A reversing entry must be the entry it names, undone (see docs/ledger.md).
--
-- Found by review: `reverses` was checked only as a UNIQUE foreign key, so any balanced entry could name any
-- entry as the one it reverses. Posted as the service's role, through the library, an entry of kind
-- payment.captured with one posting pair of 1 KHR that named a 5-posting entry of 100 KHR and 5 USD was
-- accepted; the entry it named could then never be corrected (its reversal was refused as AlreadyReversed),
-- and its "reversal" undid almost nothing of it.
--
-- 1. An entry with reverses = N must have exactly N's postings with each side swapped: the same multiset of
--    (account, currency, amount), debit for credit and credit for debit, in any line order; and N must
--    have all the postings it declares (posting_count), so no posting can join N after the comparison.
-- 2. Its kind must be 'reversal'. Every entry the code base writes with `reverses` comes from
--    ledger.reversal_draft, which uses that kind (settlement, refunds and suspense resolution post
--    entries of their own kinds and name nothing in `reverses`; a refund is not a reversal: it may be
--    partial). A correction filed under another kind would be counted as that kind by anything that
--    selects entries by kind (list_entries, GET /v1/ledger/entries?kind=), e.g. as one more capture.
--
-- Checked where the other entry rules are checked, whoever writes: by the entry's own commit-time firing
-- (ledger_apply_balances) and by ledger_post with fold_now, before ledger_check_and_fold folds anything.
-- Both callers know without a query whether an entry names one (NEW.reverses; the arrays ledger_post was
-- given, and only in its branch for keyed or reversing entries), so ordinary entries run no more
-- statements than before. SQLSTATE 23514 (check_violation) with constraint name
-- ledger_reversal_mirrors_its_entry, which ledger/journal.py maps to ledger.InvalidReversal.
-- Entries written before this migration are not checked again.

CREATE FUNCTION ledger_check_reversals(ids bigint[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    r record;
BEGIN
    SELECT e.id, e.reverses, e.kind, o.id IS NULL AS missing, e.kind <> 'reversal' AS wrong_kind, m.differs
      INTO r
      FROM unnest(ids) AS i (id)
      JOIN ledger_entries e ON e.id = i.id AND e.reverses IS NOT NULL
      LEFT JOIN ledger_entries o ON o.id = e.reverses
     CROSS JOIN LATERAL (
        -- The original has every posting it declares, and the two multisets of (account, currency, amount,
        -- side) are equal once the original's sides are swapped: nothing is left over either way.
        SELECT (o.posting_count IS NOT NULL
                AND o.posting_count <> (SELECT count(*) FROM ledger_postings p WHERE p.entry_id = o.id))
               OR EXISTS ((SELECT p.account_id, p.currency, p.amount, p.side
                             FROM ledger_postings p WHERE p.entry_id = e.id
                           EXCEPT ALL
                           SELECT p.account_id, p.currency, p.amount,
                                  CASE p.side WHEN 'debit' THEN 'credit' ELSE 'debit' END
                             FROM ledger_postings p WHERE p.entry_id = o.id)
                          UNION ALL
                          (SELECT p.account_id, p.currency, p.amount,
                                  CASE p.side WHEN 'debit' THEN 'credit' ELSE 'debit' END
                             FROM ledger_postings p WHERE p.entry_id = o.id
                           EXCEPT ALL
                           SELECT p.account_id, p.currency, p.amount, p.side
                             FROM ledger_postings p WHERE p.entry_id = e.id)) AS differs
     ) AS m
     WHERE o.id IS NULL OR e.kind <> 'reversal' OR m.differs
     ORDER BY e.id
     LIMIT 1;
    IF r.id IS NULL THEN
        RETURN;
    ELSIF r.missing THEN  -- the foreign key refuses it first; kept for a session that turned triggers off
        RAISE EXCEPTION 'journal entry % reverses entry %, which does not exist', r.id, r.reverses
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'ledger_entries_reverses_fkey';
    ELSIF r.differs THEN
        RAISE EXCEPTION 'journal entry % reverses entry % but its postings are not entry %''s postings with each '
                        'side swapped (the same accounts, currencies and amounts, debit for credit and credit '
                        'for debit)%', r.id, r.reverses, r.reverses,
                        CASE WHEN r.wrong_kind THEN format('; and its kind is %s, not reversal', r.kind) ELSE '' END
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_reversal_mirrors_its_entry',
                  HINT = format('Post entry %s''s postings with each side swapped, of kind reversal.', r.reverses);
    END IF;
    RAISE EXCEPTION 'journal entry % reverses entry % but is of kind %: an entry that names the entry it reverses '
                    'is of kind reversal', r.id, r.reverses, r.kind
        USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_reversal_mirrors_its_entry',
              HINT = format('Post entry %s''s postings with each side swapped, of kind reversal.', r.reverses);
END $$;
-- Called only by the ledger's own functions (as its owner).
REVOKE EXECUTE ON FUNCTION ledger_check_reversals(bigint[]) FROM PUBLIC;

-- The commit-time firing: as in 0023, with the reversal check before the check and fold.
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
    -- An entry that names the entry it reverses is checked against it first; no query for any other entry.
    IF NEW.reverses IS NOT NULL THEN
        PERFORM ledger_check_reversals(ARRAY[NEW.id]);
    END IF;
    PERFORM ledger_check_and_fold(ARRAY[NEW.id]);
    RETURN NULL;
END $$;

-- ledger_post: as in 0024, with the reversal check before the check and fold of fold_now. Its grants and
-- its signature are unchanged, so they stay.
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
        -- their postings in one statement (the postings' trigger runs after it, and sees the entries).
        WITH written AS (
            INSERT INTO ledger_entries (id, kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                        content_hash, posting_count, folded)
            SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id, e.settlement_id,
                   e.content_hash, e.posting_count, fold_now
              FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                          e_content_hash, e_posting_count)
                   WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                         content_hash, posting_count, ord)
             ORDER BY e.ord)
        INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency)
        SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency
          FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
               AS p (entry, line, account, side, amount, currency)
          JOIN ledger_accounts a ON a.code = p.account;
        GET DIAGNOSTICS n_written = ROW_COUNT;
        n_expected := cardinality(p_entry);
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
            RETURNING id
        ), lines AS (
            INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency)
            SELECT ids[p.entry], p.line, a.id, p.side, p.amount, p.currency
              FROM unnest(p_entry, p_line, p_account, p_side, p_amount, p_currency)
                   AS p (entry, line, account, side, amount, currency)
              JOIN ledger_accounts a ON a.code = p.account
             WHERE (SELECT count(*) FROM ins) = n
            RETURNING 1
        )
        SELECT coalesce((SELECT array_agg(id) FROM ins), '{}'), (SELECT count(*) FROM lines)
          INTO inserted, n_written;
        IF cardinality(inserted) = n THEN
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
        -- Entries that name the entry they reverse are checked against it first (only then: the plain branch
        -- above never sets reversals).
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
