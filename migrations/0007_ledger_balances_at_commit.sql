-- Balances are folded in when the writing transaction commits, instead of at each posting statement.
--
-- Why: every payment credits its agency's revenue and debits its provider's clearing account, so a few
-- balance rows are hot. Locked at the posting statement, they stayed locked across the writer's remaining
-- round trips (its outbox rows, COMMIT) and across its client's scheduling delays: under load, captures
-- queued for seconds (measured with load/payments_bench.py). A deferred constraint trigger runs inside
-- COMMIT, so the rows are held only while the commit itself runs. Balances still change in the same
-- transaction as the postings; inside that transaction, before it commits, they do not show its postings.

-- The postings trigger keeps only its guard: postings go only into an entry of this transaction.
CREATE OR REPLACE FUNCTION ledger_apply_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_postings p JOIN ledger_entries e ON e.id = p.entry_id
                WHERE e.txid <> pg_current_xact_id()) THEN
        RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- At commit: fold every posting of this transaction's entries not yet folded (entry ids above the
-- transaction-local mark) into ledger_balances, locking the rows in account order so that two committing
-- writers queue instead of deadlocking. The first firing does the work; the others find nothing left.
-- If SET CONSTRAINTS ... IMMEDIATE fires it early, entries written afterwards are above the mark.
CREATE FUNCTION ledger_apply_balances() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    done bigint := coalesce(nullif(current_setting('ledger.balanced_upto', true), ''), '0')::bigint;
    upto bigint;
BEGIN
    SELECT max(id) INTO upto FROM ledger_entries WHERE txid = pg_current_xact_id() AND id > done;
    IF upto IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('ledger.balanced_upto', upto::text, true);

    INSERT INTO ledger_balances (account_id)
    SELECT DISTINCT p.account_id
      FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
     WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto
     ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM ledger_balances
      WHERE account_id IN (SELECT p.account_id
                             FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
                            WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto)
      ORDER BY account_id FOR UPDATE;
    UPDATE ledger_balances b
       SET debits = b.debits + d.debits, credits = b.credits + d.credits, postings = b.postings + d.n,
           last_entry_id = greatest(b.last_entry_id, d.last_entry_id)
      FROM (SELECT p.account_id,
                   coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0) AS debits,
                   coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0) AS credits,
                   count(*) AS n, max(p.entry_id) AS last_entry_id
              FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
             WHERE e.txid = pg_current_xact_id() AND e.id > done AND e.id <= upto
             GROUP BY p.account_id) d
     WHERE b.account_id = d.account_id;
    RETURN NULL;
END $$;

-- Named to sort before ledger_entries_balanced: triggers on one event fire in name order.
CREATE CONSTRAINT TRIGGER ledger_entries_apply_balances AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_apply_balances();
