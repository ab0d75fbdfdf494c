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

-- Whether payment $1's money reached the treasury bank: a settlement line settled it (matched, settled for
-- another amount, or captured from the file), or a line that came after its missing_in_settlement was resolved
-- and was then taken in (match_to_invoice or refund_due; write_off says nothing arrived). Until then its provider
-- may still give the money back to the payer, and the refund of that takes back what the payment's case is owed
-- (a payout before it would pay the payer twice). Once true it stays true: a payment with a line is never
-- raised as missing from settlement.
CREATE FUNCTION refund_money_arrived(payment text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM settlement_lines
                    WHERE payment_id = payment AND category IN ('matched', 'amount_mismatch', 'missing_in_ledger'))
        OR EXISTS (SELECT 1 FROM settlement_lines l JOIN reconciliation_exceptions x ON x.id = l.exception_id
                    WHERE l.payment_id = payment AND l.category = 'settled_after_resolution'
                      AND x.state = 'resolved' AND x.resolution IN ('match_to_invoice', 'refund_due'))
$$;

-- Written once, kept as written, like the other records the ledger's entries stand on.
GRANT SELECT, INSERT ON refund_payouts TO paysvc_app;
CREATE TRIGGER refund_payouts_never_deleted BEFORE DELETE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_never_truncated BEFORE TRUNCATE ON refund_payouts
    FOR EACH STATEMENT EXECUTE FUNCTION money_records_refuse_removal();
CREATE TRIGGER refund_payouts_kept_as_written BEFORE UPDATE ON refund_payouts
    FOR EACH ROW EXECUTE FUNCTION money_records_refuse_rewrite();
