-- Two cheaper steps for micro-batches, measured with pgbench posting 100-entry batches through ledger_post
-- alone (three paired 20 s runs: +7 to +9% batches per second each time).
--
-- 1. An entry without idempotency key and without reversal cannot conflict with anything (its id comes
--    from the sequence), so ledger_post inserts such batches with a plain INSERT instead of
--    INSERT ... ON CONFLICT DO NOTHING, which checks every unique index before each row. Entries with a
--    key or a reversal take the ON CONFLICT path as before (the service's captures carry keys).
-- 2. The entry kind is checked without a regular expression (a regex match was 5% of the database's time
--    in batches). Same rule: 1 to 64 characters, the first a-z, the others a-z, 0-9, '_', '.', '-'.

CREATE OR REPLACE FUNCTION ledger_post(
    e_kind text[], e_description text[], e_effective_at timestamptz[], e_idempotency_key text[],
    e_invoice_id text[], e_payment_id text[], e_settlement_id text[], e_reverses bigint[],
    e_content_hash bytea[],
    p_entry int[], p_line smallint[], p_account text[], p_side text[], p_amount bigint[], p_currency text[],
    a_code text[], a_type text[], a_currency text[]
) RETURNS TABLE (o_ord int, o_id bigint, o_status text, o_recorded_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := cardinality(e_kind);
    ids bigint[];
    inserted bigint[];
    n_expected bigint;
    n_written bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(a_code) AS a (code)
                WHERE NOT EXISTS (SELECT 1 FROM ledger_accounts x WHERE x.code = a.code)) THEN
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
        RETURN QUERY SELECT o::int, ids[o], 'posted'::text, now() FROM generate_series(1, n) AS o;
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

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_valid,
    ADD CONSTRAINT ledger_entries_valid CHECK (
        char_length(kind) BETWEEN 1 AND 64 AND ascii(kind) BETWEEN 97 AND 122
        AND translate(kind, 'abcdefghijklmnopqrstuvwxyz0123456789_.-', '') = ''
        AND char_length(description) <= 500
        AND char_length(idempotency_key) BETWEEN 1 AND 255
        AND char_length(invoice_id) BETWEEN 1 AND 100
        AND char_length(payment_id) BETWEEN 1 AND 100
        AND char_length(settlement_id) BETWEEN 1 AND 100
        AND reverses <> id
        AND octet_length(content_hash) = 32);
