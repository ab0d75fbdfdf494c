-- name: exceptions_list
SELECT e.id, e.reason, e.state, e.provider, e.payment_id, e.invoice_id, a.code AS agency, e.currency, e.amount,
       e.business_date, e.evidence, e.opened_at, e.resolved_at, e.resolved_by, e.resolution, e.resolution_note,
       e.resolution_entry_id::bigint AS resolution_entry_id
  FROM reconciliation_exceptions e LEFT JOIN agencies a ON a.id = e.agency_id
 WHERE ($1::text IS NULL OR e.provider = $1)
   AND ($2::date IS NULL OR e.business_date = $2)
   AND ($3::text IS NULL OR e.reason = $3)
   AND ($4::text IS NULL OR e.state = $4)
   AND ($5::timestamptz IS NULL OR (e.opened_at, e.id) < ($5, $6::text))
 ORDER BY e.opened_at DESC, e.id DESC
 LIMIT $7

-- name: payment_suspense_holder
-- An open exception of payment $1 (other than $2) that still holds its suspense part: one raised at capture
-- ($3 the reasons). Locked, so that a resolution of it being committed is waited for.
SELECT id FROM reconciliation_exceptions
 WHERE payment_id = $1 AND id <> $2 AND state = 'open' AND reason = ANY($3::text[])
 ORDER BY opened_at, id
 LIMIT 1
   FOR UPDATE

-- name: payment_suspense_moves
-- Where earlier resolutions moved payment $1's suspense part: the credits of its resolution entries that
-- debited the suspense account $2 (refunds-due, written-off, an agency's revenue), per account.
SELECT a.code AS account, sum(p.amount)::bigint AS amount
  FROM reconciliation_exceptions x
  JOIN ledger_entries e ON e.id::text = x.resolution_entry_id
  JOIN ledger_postings p ON p.entry_id = e.id AND p.side = 'credit'
  JOIN ledger_accounts a ON a.id = p.account_id
 WHERE x.payment_id = $1 AND x.state = 'resolved' AND e.kind = 'exception_resolved'
   AND EXISTS (SELECT 1 FROM ledger_postings s JOIN ledger_accounts sa ON sa.id = s.account_id
                WHERE s.entry_id = e.id AND s.side = 'debit' AND sa.code = $2)
 GROUP BY a.code
 ORDER BY a.code

-- name: invoice_agencies
-- Which agency each of these invoices is of.
SELECT i.id, a.code FROM invoices i JOIN agencies a ON a.id = i.agency_id WHERE i.id = ANY($1::text[])

-- name: agencies_by_code
SELECT code, id FROM agencies WHERE code = ANY($1::text[])
