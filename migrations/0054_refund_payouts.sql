-- Refunds paid out. A resolution can owe money back to a payer (it credits suspense:refunds-due), but nothing
-- recorded that treasury had sent it: the liability only grew, and the ledger's bank account kept money the
-- bank no longer had. A payout is treasury's record of one transfer back to a payer: its entry debits
-- suspense:refunds-due and credits the treasury bank account it left from.
--
-- What is owed back is counted per payment when the exception is about one (every resolution of that payment's
-- exceptions adds to it or takes from it), else per exception; payment_id says which. The bank's reference of
-- the transfer is unique: recording the same transfer twice finds the first.
CREATE TABLE refund_payouts (
    id            text PRIMARY KEY,
    exception_id  text NOT NULL REFERENCES reconciliation_exceptions(id),
    payment_id    text REFERENCES payments(id),
    currency      text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    amount        bigint NOT NULL CHECK (amount > 0),
    reference     text NOT NULL UNIQUE CHECK (length(reference) BETWEEN 1 AND 140),
    bank_account  text NOT NULL,
    note          text NOT NULL CHECK (length(note) BETWEEN 1 AND 2000),
    recorded_by   text NOT NULL,
    recorded_at   timestamptz NOT NULL,
    entry_id      bigint NOT NULL UNIQUE REFERENCES ledger_entries(id)
);
CREATE INDEX refund_payouts_by_payment ON refund_payouts (payment_id) WHERE payment_id IS NOT NULL;
CREATE INDEX refund_payouts_by_exception ON refund_payouts (exception_id);
CREATE INDEX refund_payouts_newest ON refund_payouts (recorded_at DESC, id DESC);

-- Whether a refund owed for payment `payment` can be paid out: nothing can take it back any more. The only entry
-- that takes from suspense:refunds-due is the refund of the payment's missing_in_settlement (its provider gave
-- the money back to the payer, which takes back what a refund_due of its capture exception put there). That
-- cannot happen once a line has settled the payment (it is then never raised as missing) or once its
-- missing_in_settlement is resolved (each payment has at most one); before either, a payout could pay the
-- payer twice.
CREATE FUNCTION refund_payable(payment text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM settlement_lines
                    WHERE payment_id = payment AND category IN ('matched', 'amount_mismatch', 'missing_in_ledger'))
        OR EXISTS (SELECT 1 FROM reconciliation_exceptions
                    WHERE payment_id = payment AND reason = 'missing_in_settlement' AND state = 'resolved')
$$;

-- Every refund case (the payment, else the exception whose resolution entry put money in refunds-due) per
-- currency: what its entries put into suspense:refunds-due less what they took back (due), what was paid out
-- (paid), when it was first owed (since) and the exceptions whose resolutions moved it. Read from the postings of
-- the refunds-due accounts (the index by account), so its cost follows the number of refunds, not of entries.
-- The refunds owed are the cases with due > paid; `ledger reconcile` reports any with paid > due.
CREATE VIEW refund_cases AS
WITH moves AS (
    SELECT coalesce(e.payment_id, x.id) AS case_id, e.payment_id, x.id AS exception_id, a.currency,
           CASE p.side WHEN 'credit' THEN p.amount ELSE -p.amount END AS n, e.recorded_at
      FROM ledger_accounts a
      JOIN ledger_postings p ON p.account_id = a.id
      JOIN ledger_entries e ON e.id = p.entry_id
      LEFT JOIN reconciliation_exceptions x
             ON e.idempotency_key LIKE 'resolution:%' AND x.id = substr(e.idempotency_key, 12)
     WHERE a.code LIKE 'suspense:refunds-due:%' AND e.kind <> 'refund_paid'
), due AS (
    SELECT case_id, min(payment_id) AS payment_id, currency, sum(n)::bigint AS due, min(recorded_at) AS since,
           array_agg(DISTINCT exception_id ORDER BY exception_id) FILTER (WHERE exception_id IS NOT NULL)
               AS exception_ids
      FROM moves WHERE case_id IS NOT NULL GROUP BY case_id, currency
), paid AS (
    SELECT coalesce(payment_id, exception_id) AS case_id, min(payment_id) AS payment_id, currency,
           sum(amount)::bigint AS paid
      FROM refund_payouts GROUP BY 1, currency
)
SELECT coalesce(d.case_id, p.case_id) AS case_id, coalesce(d.payment_id, p.payment_id) AS payment_id,
       coalesce(d.currency, p.currency) AS currency, coalesce(d.due, 0) AS due, coalesce(p.paid, 0) AS paid,
       d.since, coalesce(d.exception_ids, '{}') AS exception_ids
  FROM due d FULL JOIN paid p ON p.case_id = d.case_id AND p.currency = d.currency;

-- Written once, kept as written, like the other records the ledger's entries stand on.
GRANT SELECT, INSERT ON refund_payouts TO paysvc_app;
GRANT SELECT ON refund_cases TO paysvc_app;
CREATE TRIGGER refund_payouts_never_deleted BEFORE DELETE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_never_truncated BEFORE TRUNCATE ON refund_payouts
    FOR EACH STATEMENT EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_kept_as_written BEFORE UPDATE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
