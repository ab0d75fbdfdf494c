-- Postings' references are checked once per INSERT statement by the postings trigger, instead of by two
-- row-level foreign keys (an RI trigger per posting per key: 400 firings for a batch of 100 entries).
-- Accounts and entries can never be deleted or changed (append-only triggers), so checking at insert is
-- all a foreign key did here. The errors keep the foreign-key error code.

ALTER TABLE ledger_postings DROP CONSTRAINT ledger_postings_account_id_currency_fkey;
ALTER TABLE ledger_postings DROP CONSTRAINT ledger_postings_entry_id_fkey;

CREATE OR REPLACE FUNCTION ledger_apply_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    problem text;
BEGIN
    SELECT CASE WHEN e.id IS NULL THEN format('posting to entry %s, which does not exist', p.entry_id)
                WHEN a.id IS NULL THEN format('posting to account %s in %s: no such account in that currency',
                                              p.account_id, p.currency)
                WHEN e.txid <> pg_current_xact_id() THEN 'txid'
                WHEN p.entry_id <= done THEN 'checked'
           END
      INTO problem
      FROM new_postings p
      LEFT JOIN ledger_entries e ON e.id = p.entry_id
      LEFT JOIN ledger_accounts a ON a.id = p.account_id AND a.currency = p.currency
     WHERE e.id IS NULL OR a.id IS NULL OR e.txid <> pg_current_xact_id() OR p.entry_id <= done
     LIMIT 1;
    IF problem = 'txid' THEN
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
