-- Two corrections to 0019, found by a review before they reached a release.
--
-- 1. A deadlock 0018 did not have. 0019 wrote a batch's entries (taking their idempotency keys) before
--    creating missing accounts, so a transaction could hold key K while waiting for another transaction's
--    new account, and that transaction then wait for K. ledger_post again creates missing accounts first
--    (one query to ask whether any is missing, as in 0018), before it holds any key.
-- 2. An entry whose commit-time firing finds it already inside a checked window is now checked on its own
--    (its postings, by its id) instead of trusted. The window mark is a session setting
--    (ledger.balanced_upto), which any session can set itself, and an id chosen by hand can fall in a gap
--    of the window: before this, either let an entry that does not balance commit (the first also before
--    0019). Whatever the session sets, every entry that commits has been checked. What a forged mark can
--    still do is make the maintained balances disagree with the postings (fold an entry twice, or not at
--    all); `paysvc ledger verify` recomputes every balance from the postings and reports it.
--
-- The cost lands only on the later entries of a multi-entry commit (one small indexed query each); a
-- single-entry transaction runs the same statements as with 0019 plus the account query.

CREATE OR REPLACE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public SET plan_cache_mode = force_generic_plan
SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    r record;
    n_postings bigint;
    n_unbalanced bigint;
BEGIN
    IF NEW.txid <> pg_current_xact_id() THEN
        RAISE EXCEPTION 'journal entry %: txid must be the writing transaction''s', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.id <= done THEN
        IF NEW.id < coalesce(nullif(current_setting('ledger.balanced_from', true), ''), '0')::bigint THEN
            RAISE EXCEPTION 'journal entry %: its id is below entries this transaction already checked; '
                            'let the sequence choose entry ids', NEW.id
                USING ERRCODE = 'check_violation';
        END IF;
        -- Most likely checked by an earlier firing's window. The mark is a session setting, which a session
        -- can set itself, and an id can fall in a gap of the window: this entry is checked on its own.
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
    )
    SELECT set_config('ledger.balanced_from', w.lo::text, true) AS lo,
           set_config('ledger.balanced_upto', w.upto::text, true) AS upto,
           bad.id AS bad_id, bad.n AS bad_n, bad.unbalanced AS bad_unbalanced
      INTO r
      FROM w LEFT JOIN bad ON true;
    IF r.bad_id IS NOT NULL THEN
        RAISE EXCEPTION 'journal entry % does not balance per currency (% postings, % unbalanced currencies)',
            r.bad_id, r.bad_n, r.bad_unbalanced
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION ledger_post(
    e_kind text[], e_description text[], e_effective_at timestamptz[], e_idempotency_key text[],
    e_invoice_id text[], e_payment_id text[], e_settlement_id text[], e_reverses bigint[],
    e_content_hash bytea[],
    p_entry int[], p_line smallint[], p_account text[], p_side text[], p_amount bigint[], p_currency text[],
    a_code text[], a_type text[], a_currency text[]
) RETURNS TABLE (o_ord int, o_id bigint, o_status text, o_recorded_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    n int := cardinality(e_kind);
    ids bigint[];
    inserted bigint[];
    n_expected bigint := 0;
    n_written bigint := 0;
BEGIN
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
                                    content_hash)
        SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.invoice_id, e.payment_id, e.settlement_id,
               e.content_hash
          FROM unnest(e_kind, e_description, e_effective_at, e_invoice_id, e_payment_id, e_settlement_id,
                      e_content_hash)
               WITH ORDINALITY AS e (kind, description, effective_at, invoice_id, payment_id, settlement_id,
                                     content_hash, ord)
         ORDER BY e.ord;
        inserted := ids;
    ELSE
        WITH ins AS (
            INSERT INTO ledger_entries (id, kind, description, effective_at, idempotency_key, invoice_id,
                                        payment_id, settlement_id, reverses, content_hash)
            SELECT ids[e.ord], e.kind, e.description, e.effective_at, e.idem, e.invoice_id, e.payment_id,
                   e.settlement_id, e.reverses, e.content_hash
              FROM unnest(e_kind, e_description, e_effective_at, e_idempotency_key, e_invoice_id, e_payment_id,
                          e_settlement_id, e_reverses, e_content_hash)
                   WITH ORDINALITY AS e (kind, description, effective_at, idem, invoice_id, payment_id,
                                         settlement_id, reverses, content_hash, ord)
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
                ELSE 'already_reversed' END,
           CASE WHEN i.id IS NOT NULL THEN now() ELSE x.recorded_at END
      FROM unnest(e_idempotency_key) WITH ORDINALITY AS e (idem, ord)
      LEFT JOIN unnest(inserted) AS i (id) ON i.id = ids[e.ord]
      LEFT JOIN ledger_entries x ON i.id IS NULL AND x.idempotency_key = e.idem
     ORDER BY e.ord;
END $$;

