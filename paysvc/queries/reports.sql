-- name: journal_period
-- Every posting of the entries effective in [$1, $2) (either bound may be null), in effective time, then entry and
-- line order: the period's journal as an auditor reads it (`paysvc ledger journal`). An entry's seal position is
-- null while it is not sealed yet.
SELECT e.id AS entry_id, e.kind, e.effective_at, e.recorded_at, s.position AS seal_position, e.description,
       e.invoice_id, e.payment_id, e.settlement_id, e.reverses, p.line, a.code AS account, p.side, p.amount,
       p.currency
  FROM ledger_entries e
  JOIN ledger_postings p ON p.entry_id = e.id
  JOIN ledger_accounts a ON a.id = p.account_id
  LEFT JOIN ledger_seals s ON s.entry_id = e.id
 WHERE ($1::timestamptz IS NULL OR e.effective_at >= $1) AND ($2::timestamptz IS NULL OR e.effective_at < $2)
 ORDER BY e.effective_at, e.id, p.line
