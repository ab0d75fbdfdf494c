-- Refunds owed back to payers (suspense:refunds-due) and paid out of the treasury bank account.
--
-- A refund is counted per case: the payment, when the exception is about one (every entry about the payment,
-- whichever of its exceptions resolved it, adds to what is owed or takes from it: a refund of a payment missing
-- from settlement takes back what an earlier resolution put there), else the exception (its resolution entry).

-- name: exception_for_refund
SELECT id, reason, state, resolution, payment_id, invoice_id, resolution_entry_id
  FROM reconciliation_exceptions WHERE id = $1

-- name: exception_for_refund_locked
-- As exception_for_refund, read again under the case's lock; FOR SHARE waits for a resolution of the row that has
-- not committed yet (one of an exception about no payment takes no case lock).
SELECT id, reason, state, resolution, payment_id, invoice_id, resolution_entry_id
  FROM reconciliation_exceptions WHERE id = $1 FOR SHARE

-- name: refund_case_lock
-- Payouts of one case are recorded one at a time (two treasury staff paying the same refund at once).
SELECT pg_advisory_xact_lock(hashtextextended('paysvc.refund:' || $1, 0))

-- name: refund_due_of_payment
-- What the entries about payment $1 put into suspense:refunds-due less what they took from it, per currency
-- (payouts left out: they are counted from their own records).
SELECT a.currency, sum(CASE p.side WHEN 'credit' THEN p.amount ELSE -p.amount END)::bigint AS due
  FROM ledger_entries e
  JOIN ledger_postings p ON p.entry_id = e.id
  JOIN ledger_accounts a ON a.id = p.account_id
 WHERE e.payment_id = $1 AND e.kind <> 'refund_paid' AND a.code LIKE 'suspense:refunds-due:%'
 GROUP BY a.currency

-- name: refund_due_of_entry
-- What resolution entry $1 put into suspense:refunds-due less what it took from it, per currency.
SELECT a.currency, sum(CASE p.side WHEN 'credit' THEN p.amount ELSE -p.amount END)::bigint AS due
  FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
 WHERE p.entry_id = $1 AND a.code LIKE 'suspense:refunds-due:%'
 GROUP BY a.currency

-- name: refund_paid_of_payment
SELECT currency, sum(amount)::bigint AS paid FROM refund_payouts WHERE payment_id = $1 GROUP BY currency

-- name: refund_paid_of_exception
SELECT currency, sum(amount)::bigint AS paid FROM refund_payouts WHERE exception_id = $1 AND payment_id IS NULL
 GROUP BY currency

-- name: refund_payable
SELECT refund_payable($1)

-- name: refund_payout_by_reference
SELECT id, exception_id, payment_id, currency, amount, reference, bank_account, note, recorded_by, recorded_at,
       entry_id
  FROM refund_payouts WHERE reference = $1

-- name: refund_payout_insert
INSERT INTO refund_payouts (id, exception_id, payment_id, currency, amount, reference, bank_account, note,
                            recorded_by, recorded_at, entry_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (reference) DO NOTHING
RETURNING id, exception_id, payment_id, currency, amount, reference, bank_account, note, recorded_by, recorded_at,
          entry_id

-- name: refund_payouts_page
-- Payouts newest first; $1 a case (payment or exception id) or NULL, $2/$3 the cursor, $4 the limit.
SELECT id, exception_id, payment_id, currency, amount, reference, bank_account, note, recorded_by, recorded_at,
       entry_id
  FROM refund_payouts
 WHERE ($1::text IS NULL OR payment_id = $1 OR exception_id = $1)
   AND ($2::timestamptz IS NULL OR (recorded_at, id) < ($2, $3::text))
 ORDER BY recorded_at DESC, id DESC
 LIMIT $4

-- name: refunds_owed
-- Every case with money still owed back, oldest first (the refund_cases view), and whether it can be paid yet (a
-- payment's case: see refund_payable).
SELECT case_id, payment_id, currency, due, paid, due - paid AS outstanding, exception_ids, since,
       payment_id IS NULL OR refund_payable(payment_id) AS payable
  FROM refund_cases
 WHERE due > paid
   AND ($1::timestamptz IS NULL OR (since, case_id, currency) > ($1, $2::text, $3::text))
 ORDER BY since, case_id, currency
 LIMIT $4
