-- Writing and reading journal entries.

-- name: post
SELECT o_ord, o_id, o_status, o_recorded_at
  FROM ledger_post($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[],
                   $8::bigint[], $9::bytea[], $10::smallint[], $11::int[], $12::smallint[], $13::text[],
                   $14::text[], $15::bigint[], $16::text[], $17::text[], $18::text[], $19::text[], $20::boolean)

-- name: post_one
-- As post, for one draft: its fields are sent as scalars and made into ledger_post's one-element arrays here,
-- which costs the client less than sending them as arrays (asyncpg inspects every array and element it sends).
SELECT o_ord, o_id, o_status, o_recorded_at
  FROM ledger_post(ARRAY[$1::text], ARRAY[$2::text], ARRAY[$3::timestamptz], ARRAY[$4::text], ARRAY[$5::text],
                   ARRAY[$6::text], ARRAY[$7::text], ARRAY[$8::bigint], ARRAY[$9::bytea],
                   ARRAY[cardinality($10::text[])::smallint], array_fill(1, ARRAY[cardinality($10::text[])]),
                   $11::smallint[], $10::text[], $12::text[], $13::bigint[], $14::text[], $15::text[], $16::text[],
                   $17::text[], $18::boolean)

-- name: post_pair
-- One entry of two postings that reverses no other (most entries): ledger_post_pair (migration 0058) writes it
-- from scalars, by ledger_post's rules; the second posting is the first's other side, of the same amount and
-- currency. $4 idempotency key, $9 first account, $10 its side, $11 second account, $12 amount, $13 currency.
SELECT o_ord, o_id, o_status, o_recorded_at
  FROM ledger_post_pair($1::text, $2::text, $3::timestamptz, $4::text, $5::text, $6::text, $7::text, $8::bytea,
                        $9::text, $10::text, $11::text, $12::bigint, $13::text, $14::boolean)

-- name: entries_by_id
SELECT e.id, e.kind, e.description, e.effective_at, e.recorded_at, e.idempotency_key, e.invoice_id,
       e.payment_id, e.settlement_id, e.reverses, e.content_hash, s.position AS seal_position, s.chain_hash
  FROM ledger_entries e LEFT JOIN ledger_seals s ON s.entry_id = e.id
 WHERE e.id = ANY($1::bigint[])

-- name: postings_of_entries
SELECT p.entry_id, p.line, a.code AS account, p.side, p.amount, p.currency
  FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
 WHERE p.entry_id = ANY($1::bigint[])
 ORDER BY p.entry_id, p.line

-- name: reversal_of
SELECT id FROM ledger_entries WHERE reverses = $1

-- name: entries_page
-- Newest first. $1: only entries touching an account whose code starts with this prefix (NULL = all);
-- $2 kind, $3 invoice, $4 payment, $5 settlement, $6 effective from (incl.), $7 effective to (excl.),
-- $8 account code, $9 before this id (cursor), $10 limit.
SELECT e.id
  FROM ledger_entries e
 WHERE ($1::text IS NULL OR EXISTS (
            SELECT 1 FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
             WHERE p.entry_id = e.id AND starts_with(a.code, $1)))
   AND ($2::text IS NULL OR e.kind = $2)
   AND ($3::text IS NULL OR e.invoice_id = $3)
   AND ($4::text IS NULL OR e.payment_id = $4)
   AND ($5::text IS NULL OR e.settlement_id = $5)
   AND ($6::timestamptz IS NULL OR e.effective_at >= $6)
   AND ($7::timestamptz IS NULL OR e.effective_at < $7)
   AND ($8::text IS NULL OR EXISTS (
            SELECT 1 FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
             WHERE p.entry_id = e.id AND a.code = $8))
   AND ($9::bigint IS NULL OR e.id < $9)
 ORDER BY e.id DESC
 LIMIT $10
