-- The sealer and the verifier.

-- name: seal_lock
-- One sealer at a time across every instance; released when the transaction ends.
SELECT pg_try_advisory_xact_lock(7306012877355101540)

-- name: last_seal
-- The seal at the highest position, whether or not its entry still exists (txid and id are then NULL).
SELECT s.position, s.chain_hash, s.entry_id, e.txid::text AS txid, e.id
  FROM ledger_seals s LEFT JOIN ledger_entries e ON e.id = s.entry_id
 ORDER BY s.position DESC
 LIMIT 1

-- name: sealable
-- Entries after the last seal in (txid, id) order, written by transactions older than the oldest one
-- still running: no entry can ever appear before them in that order any more.
SELECT e.id, e.content_hash
  FROM ledger_entries e
 WHERE (e.txid, e.id) > ($1::text::xid8, $2::bigint)
   AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.txid, e.id
 LIMIT $3

-- name: seal_insert
INSERT INTO ledger_seals (position, entry_id, prev_hash, chain_hash)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[])

-- name: verify_sealed_page
-- Every seal, including one whose entry row is gone (missing = true, the entry's columns NULL). future_txid:
-- the entry names a transaction that had not begun when this statement's snapshot was taken (nor is it this
-- one), which no entry written through the database can.
SELECT s.position, s.prev_hash, s.chain_hash, s.sealed_at, s.entry_id AS id, e.id IS NULL AS missing,
       e.txid::text AS txid, (e.txid >= pg_snapshot_xmax(pg_current_snapshot())
        AND e.txid IS DISTINCT FROM pg_current_xact_id_if_assigned()) AS future_txid,
       e.kind, e.description, e.effective_at, e.idempotency_key, e.invoice_id, e.payment_id, e.settlement_id,
       e.reverses, e.content_hash
  FROM ledger_seals s LEFT JOIN ledger_entries e ON e.id = s.entry_id
 WHERE s.position > $1
 ORDER BY s.position
 LIMIT $2

-- name: verify_unsealed_page
SELECT NULL::bigint AS position, NULL::bytea AS prev_hash, NULL::bytea AS chain_hash, e.id, e.kind,
       e.description, e.effective_at, e.idempotency_key, e.invoice_id, e.payment_id, e.settlement_id,
       e.reverses, e.content_hash,
       ((e.txid, e.id) < ($3::text::xid8, $4::bigint)) AS behind_seal,
       (e.txid >= pg_snapshot_xmax(pg_current_snapshot())
        AND e.txid IS DISTINCT FROM pg_current_xact_id_if_assigned()) AS future_txid
  FROM ledger_entries e
 WHERE e.id > $1 AND NOT EXISTS (SELECT 1 FROM ledger_seals s WHERE s.entry_id = e.id)
 ORDER BY e.id
 LIMIT $2

-- name: verify_orphan_postings
-- Postings whose entry row is gone, per entry id, with the seal that names that entry if there is one.
SELECT o.entry_id, o.postings, s.position
  FROM (SELECT p.entry_id, count(*) AS postings
          FROM ledger_postings p
         WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.id = p.entry_id)
         GROUP BY p.entry_id) o
  LEFT JOIN ledger_seals s ON s.entry_id = o.entry_id
 ORDER BY o.entry_id

-- name: verify_balances
-- Every account whose maintained debits, credits or posting count differ from those of its postings
-- (only postings whose entry exists count: an orphaned posting is reported by verify_orphan_postings).
SELECT a.code, coalesce(b.debits, 0) AS debits, coalesce(b.credits, 0) AS credits,
       coalesce(b.postings, 0) AS postings, coalesce(s.debits, 0) AS sum_debits,
       coalesce(s.credits, 0) AS sum_credits, coalesce(s.postings, 0) AS sum_postings
  FROM ledger_accounts a
  LEFT JOIN ledger_balances b ON b.account_id = a.id
  LEFT JOIN (SELECT p.account_id,
                    coalesce(sum(p.amount) FILTER (WHERE p.side = 'debit'), 0)::bigint AS debits,
                    coalesce(sum(p.amount) FILTER (WHERE p.side = 'credit'), 0)::bigint AS credits,
                    count(*) AS postings
               FROM ledger_postings p
              WHERE EXISTS (SELECT 1 FROM ledger_entries e WHERE e.id = p.entry_id)
              GROUP BY p.account_id) s ON s.account_id = a.id
 WHERE coalesce(b.debits, 0) <> coalesce(s.debits, 0) OR coalesce(b.credits, 0) <> coalesce(s.credits, 0)
    OR coalesce(b.postings, 0) <> coalesce(s.postings, 0)
 ORDER BY a.code

-- name: verify_prev_seals
-- For entries the sealer passed ($1): the positions of the last seal of an entry before each and of the first
-- after it, in chain order ((txid, id); NULL: none), in one ordered pass over the chain (a correlated lookup
-- per entry was quadratic in a run of them: found by review).
SELECT w.id, w.prev_seal, w.next_seal
  FROM (SELECT e.id, e.txid,
               max(s.position) OVER (ORDER BY e.txid, e.id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                 AS prev_seal,
               -- each frame grows from a fixed start, so both are running aggregates (one pass each way)
               min(s.position) OVER (ORDER BY e.txid DESC, e.id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                 AS next_seal
          FROM ledger_entries e LEFT JOIN ledger_seals s ON s.entry_id = e.id) w
 WHERE w.id = ANY($1::bigint[])
 ORDER BY w.txid, w.id

-- name: verify_accounts
-- Every account as stored, to check against what its code says (ledger.accounts.account_spec).
SELECT code, type, currency, normal_side FROM ledger_accounts ORDER BY code

-- name: verify_posting_currencies
-- Postings in another currency than their account's (possible only behind the ledger's back), with their
-- entry's seal position.
SELECT p.entry_id, p.line, a.code, p.currency, a.currency AS account_currency, s.position
  FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
  LEFT JOIN ledger_seals s ON s.entry_id = p.entry_id
 WHERE p.currency <> a.currency
 ORDER BY p.entry_id, p.line

-- name: seal_at
-- The seal at a position ($1), or at the highest position when $1 is NULL.
SELECT position, chain_hash, entry_id, sealed_at
  FROM ledger_seals
 WHERE position = coalesce($1::bigint, (SELECT max(position) FROM ledger_seals))

-- name: verify_postings
-- The postings of these entries, with their account's code; NULL when the account row is missing (possible
-- only behind the ledger's back: a posting's account is checked when it is written).
SELECT p.entry_id, p.line, p.account_id, a.code AS account, p.side, p.amount, p.currency
  FROM ledger_postings p LEFT JOIN ledger_accounts a ON a.id = p.account_id
 WHERE p.entry_id = ANY($1::bigint[])
 ORDER BY p.entry_id, p.line
