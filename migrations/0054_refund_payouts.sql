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

-- Written once, kept as written, like the other records the ledger's entries stand on.
GRANT SELECT, INSERT ON refund_payouts TO paysvc_app;
CREATE TRIGGER refund_payouts_never_deleted BEFORE DELETE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_never_truncated BEFORE TRUNCATE ON refund_payouts
    FOR EACH STATEMENT EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_kept_as_written BEFORE UPDATE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
