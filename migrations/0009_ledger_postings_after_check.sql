-- Close a gap: once an entry's deferred checks have run early (SET CONSTRAINTS ... IMMEDIATE), more
-- postings added to it in the same transaction would be neither checked for balance nor folded into the
-- balances at commit. Such postings are now refused.
CREATE OR REPLACE FUNCTION ledger_apply_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM new_postings p JOIN ledger_entries e ON e.id = p.entry_id
                WHERE e.txid <> pg_current_xact_id()) THEN
        RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM new_postings WHERE entry_id <= done) THEN
        RAISE EXCEPTION 'postings cannot be added to an entry whose balance was already checked and folded'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
