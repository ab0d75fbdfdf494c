-- Cheaper checks on the posting path: the same rules, with less work per statement (see docs/ledger.md).
--
-- 1. The rules on an entry's text and hash columns move from one table CHECK into domains. PostgreSQL reads
--    a table's CHECK expressions from their stored text again for every statement that writes the table (a
--    9 KB node tree for ledger_entries_valid), while a domain's constraints are read once per connection
--    and kept in its type cache. Same rules, same SQLSTATE (23514, check_violation), now named after the
--    domain. The rule that names two columns (an entry does not reverse itself) stays a table CHECK.
--    Service processes still running the old code during the deploy get InvalidCachedStatementError once
--    per connection for a cached statement that returns these columns inside a transaction (their type
--    changed): a capture then stays in the inbox and is retried; a settlement import is run again.
-- 2. ledger_post asks its two questions before writing (has this transaction written entries, for
--    fold_now; is any account new) in one query, and writes the entries together with their postings in one
--    statement (when an idempotency key was met before, the postings of the others follow in a second):
--    two or three statements fewer per call. The postings' trigger still runs after that statement and
--    sees the entries it wrote.

-- The domains are made without constraints first, so that changing the columns' types is only a catalog
-- change (a domain without constraints needs no rewrite, and the indexes keep their operator classes);
-- adding each constraint then checks the existing rows once with a scan, as ALTER DOMAIN does, instead of
-- rewriting the table under an exclusive lock. Every existing row passed the same rules as a table CHECK.
CREATE DOMAIN ledger_kind AS text;
CREATE DOMAIN ledger_description AS text;
CREATE DOMAIN ledger_idempotency_key AS text;
CREATE DOMAIN ledger_reference AS text;
CREATE DOMAIN ledger_sha256 AS bytea;

ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_valid,
    ALTER COLUMN kind TYPE ledger_kind,
    ALTER COLUMN description TYPE ledger_description,
    ALTER COLUMN idempotency_key TYPE ledger_idempotency_key,
    ALTER COLUMN invoice_id TYPE ledger_reference,
    ALTER COLUMN payment_id TYPE ledger_reference,
    ALTER COLUMN settlement_id TYPE ledger_reference,
    ALTER COLUMN content_hash TYPE ledger_sha256,
    ADD CONSTRAINT ledger_entries_not_self_reversing CHECK (reverses <> id);

ALTER DOMAIN ledger_kind ADD CONSTRAINT ledger_kind_check
    CHECK (char_length(VALUE) BETWEEN 1 AND 64 AND ascii(VALUE) BETWEEN 97 AND 122
           AND translate(VALUE, 'abcdefghijklmnopqrstuvwxyz0123456789_.-', '') = '');
ALTER DOMAIN ledger_description ADD CONSTRAINT ledger_description_check CHECK (char_length(VALUE) <= 500);
ALTER DOMAIN ledger_idempotency_key ADD CONSTRAINT ledger_idempotency_key_check
    CHECK (char_length(VALUE) BETWEEN 1 AND 255);
ALTER DOMAIN ledger_reference ADD CONSTRAINT ledger_reference_check CHECK (char_length(VALUE) BETWEEN 1 AND 100);
ALTER DOMAIN ledger_sha256 ADD CONSTRAINT ledger_sha256_check CHECK (octet_length(VALUE) = 32);

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


