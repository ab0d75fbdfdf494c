-- Balances, trial balance, statements and the account list.

-- name: account
-- An account's balance is the sum of its slot rows (at most 16; see migrations/0013).
SELECT a.id, a.code, a.type, a.currency, a.normal_side, a.created_at, b.debits, b.credits, b.postings
  FROM ledger_accounts a
 CROSS JOIN LATERAL (SELECT coalesce(sum(s.debits), 0)::bigint AS debits, coalesce(sum(s.credits), 0)::bigint AS credits,
                            coalesce(sum(s.postings), 0)::bigint AS postings
                       FROM ledger_balance_slots s WHERE s.account_id = a.id) b
 WHERE a.code = $1

-- name: account_totals_as_of
-- Debits and credits of one account from entries effective at or before $2.
SELECT coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0)::bigint AS debits,
       coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0)::bigint AS credits,
       count(*) AS postings
  FROM ledger_postings p JOIN ledger_entries e ON e.id = p.entry_id
 WHERE p.account_id = $1 AND e.effective_at <= $2

-- name: account_totals_as_of_from_now
-- The same totals as account_totals_as_of, read the other way in one statement (one snapshot): the account's
-- maintained totals less what its entries effective after $2 add (cheaper when $2 is recent).
SELECT (b.debits - l.debits)::bigint AS debits, (b.credits - l.credits)::bigint AS credits,
       (b.postings - l.postings)::bigint AS postings
  FROM (SELECT coalesce(sum(s.debits), 0) AS debits, coalesce(sum(s.credits), 0) AS credits,
               coalesce(sum(s.postings), 0) AS postings
          FROM ledger_balance_slots s WHERE s.account_id = $1) b,
       (SELECT coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0) AS debits,
               coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0) AS credits, count(*) AS postings
          FROM ledger_postings p JOIN ledger_entries e ON e.id = p.entry_id
         WHERE p.account_id = $1 AND e.effective_at > $2) l

-- name: ledger_time_span
-- The effective times of the first and the last entry posted: which way is cheaper to read a balance as of a
-- time (entries are posted in about the order of their effective time).
SELECT (SELECT effective_at FROM ledger_entries ORDER BY id LIMIT 1) AS first,
       (SELECT effective_at FROM ledger_entries ORDER BY id DESC LIMIT 1) AS last

-- name: accounts_page
-- $1 code prefix (NULL = all), $2 currency, $3 after this code (cursor), $4 limit.
SELECT a.id, a.code, a.type, a.currency, a.normal_side, a.created_at, b.debits, b.credits, b.postings
  FROM ledger_accounts a
 CROSS JOIN LATERAL (SELECT coalesce(sum(s.debits), 0)::bigint AS debits, coalesce(sum(s.credits), 0)::bigint AS credits,
                            coalesce(sum(s.postings), 0)::bigint AS postings
                       FROM ledger_balance_slots s WHERE s.account_id = a.id) b
 WHERE ($1::text IS NULL OR starts_with(a.code, $1))
   AND ($2::text IS NULL OR a.currency = $2)
   AND ($3::text IS NULL OR a.code > $3)
 ORDER BY a.code
 LIMIT $4

-- name: trial_balance_now
SELECT a.code, a.type, a.currency, a.normal_side,
       coalesce(b.debits, 0) AS debits, coalesce(b.credits, 0) AS credits
  FROM ledger_accounts a LEFT JOIN ledger_balances b ON b.account_id = a.id
 WHERE ($1::text IS NULL OR starts_with(a.code, $1))
 ORDER BY a.currency, a.code

-- name: trial_balance_as_of
SELECT a.code, a.type, a.currency, a.normal_side,
       coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0)::bigint AS debits,
       coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0)::bigint AS credits
  FROM ledger_accounts a
  JOIN ledger_postings p ON p.account_id = a.id
  JOIN ledger_entries e ON e.id = p.entry_id AND e.effective_at <= $1
 WHERE ($2::text IS NULL OR starts_with(a.code, $2))
 GROUP BY a.code, a.type, a.currency, a.normal_side
 ORDER BY a.currency, a.code

-- name: trial_balance_as_of_from_now
-- The same lines as trial_balance_as_of, read the other way: each account's maintained totals less what its
-- entries effective after $1 add (cheaper when $1 is recent). An account with no posting as of $1 is left out
-- there, and here.
WITH later AS (
    SELECT p.account_id,
           coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0)::bigint AS debits,
           coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0)::bigint AS credits,
           count(*) AS postings
      FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id
     WHERE e.effective_at > $1
     GROUP BY p.account_id)
SELECT a.code, a.type, a.currency, a.normal_side,
       (b.debits - coalesce(l.debits, 0))::bigint AS debits, (b.credits - coalesce(l.credits, 0))::bigint AS credits
  FROM ledger_accounts a
  JOIN ledger_balances b ON b.account_id = a.id
  LEFT JOIN later l ON l.account_id = a.id
 WHERE b.postings > coalesce(l.postings, 0) AND ($2::text IS NULL OR starts_with(a.code, $2))
 ORDER BY a.currency, a.code

-- name: trial_balance_seal
-- The seal at position $1 (null columns when there is none) and the last position sealed.
SELECT s.position, s.chain_hash, (SELECT max(position) FROM ledger_seals) AS last
  FROM (SELECT 1) one LEFT JOIN ledger_seals s ON s.position = $1

-- name: trial_balance_sealed
-- As of an effective time ($1, or none), counting only the entries sealed at chain positions up to $3: what the
-- chain held at that head, an answer that never changes, whatever is posted since, dated back or not.
SELECT a.code, a.type, a.currency, a.normal_side,
       coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0)::bigint AS debits,
       coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0)::bigint AS credits
  FROM ledger_seals s
  JOIN ledger_entries e ON e.id = s.entry_id AND ($1::timestamptz IS NULL OR e.effective_at <= $1)
  JOIN ledger_postings p ON p.entry_id = e.id
  JOIN ledger_accounts a ON a.id = p.account_id
 WHERE s.position <= $3 AND ($2::text IS NULL OR starts_with(a.code, $2))
 GROUP BY a.code, a.type, a.currency, a.normal_side
 ORDER BY a.currency, a.code

-- name: statement_page
-- One account's postings, newest first; cursor ($2, $3) = the last (entry id, line) of the previous page;
-- with $5, only entries effective at or before it.
SELECT p.entry_id, p.line, p.side, p.amount, e.kind, e.description, e.effective_at, e.recorded_at
  FROM ledger_postings p JOIN ledger_entries e ON e.id = p.entry_id
 WHERE p.account_id = $1
   AND ($2::bigint IS NULL OR (p.entry_id, p.line) < ($2, $3::smallint))
   AND ($5::timestamptz IS NULL OR e.effective_at <= $5)
 ORDER BY p.entry_id DESC, p.line DESC
 LIMIT $4
