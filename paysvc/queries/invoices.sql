-- name: agency_by_id
SELECT id, code, name, name_km, bakong_account, merchant_id, acquiring_bank, mcc, city
  FROM agencies WHERE id = $1

-- name: invoice_numbers
SELECT nextval('invoice_number_seq') AS n FROM generate_series(1, $1)

-- name: invoice_create
-- One round trip: the invoice, its first KHQR code, its idempotency record (when a key was sent) and its
-- invoice.created event. Nothing is written when the reference is taken (created = 0).
WITH inv AS (
    INSERT INTO invoices (id, number, bill_number, agency_id, reference, description, currency, amount,
                          line_items, metadata, payer_key_id, payer_ciphertext, expires_at, created_at,
                          current_khqr_md5)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
    ON CONFLICT (agency_id, reference) DO NOTHING
    RETURNING id, agency_id
), code AS (
    INSERT INTO khqr_codes (md5, invoice_id, payload, to_account, currency, amount, created_at, expires_at)
    SELECT $15, inv.id, $16, $17, $7, $8, $14, $18 FROM inv
    RETURNING md5
), idem AS (
    INSERT INTO idempotency_keys (owner, key, request_hash, status, response)
    SELECT $19, $20, $21, 201, $22 FROM inv WHERE $20::text IS NOT NULL
    RETURNING key
), ev AS (
    INSERT INTO outbox_events (id, agency_id, type, occurred_at, data)
    SELECT $23, inv.agency_id, 'invoice.created', $14, $24 FROM inv
    RETURNING id
)
SELECT (SELECT count(*) FROM inv) AS created, (SELECT count(*) FROM code) AS codes,
       (SELECT count(*) FROM ev) AS events, (SELECT count(*) FROM idem) AS idem

-- name: invoice_reference_owner
SELECT id FROM invoices WHERE agency_id = $1 AND reference = $2

-- name: invoice_get
SELECT i.*, a.code AS agency_code, k.payload AS khqr_payload, k.expires_at AS khqr_expires_at
  FROM invoices i JOIN agencies a ON a.id = i.agency_id LEFT JOIN khqr_codes k ON k.md5 = i.current_khqr_md5
 WHERE i.id = $1 AND ($2::bigint IS NULL OR i.agency_id = $2)

-- name: invoice_lock
-- No join here: under READ COMMITTED a join beside FOR UPDATE would re-check the locked row but keep the
-- joined row it read before waiting, i.e. a code another transaction has just replaced.
SELECT * FROM invoices WHERE id = $1 AND ($2::bigint IS NULL OR agency_id = $2) FOR UPDATE

-- name: khqr_by_md5
SELECT md5, payload, expires_at, created_at FROM khqr_codes WHERE md5 = $1

-- name: invoice_list
-- One agency's invoices, newest first; $9 a bill number.
SELECT i.*, a.code AS agency_code, k.payload AS khqr_payload, k.expires_at AS khqr_expires_at
  FROM invoices i JOIN agencies a ON a.id = i.agency_id LEFT JOIN khqr_codes k ON k.md5 = i.current_khqr_md5
 WHERE i.agency_id = $1
   AND ($2::text IS NULL OR i.status = $2)
   AND ($3::text IS NULL OR i.reference = $3)
   AND ($9::text IS NULL OR i.bill_number = $9)
   AND ($4::timestamptz IS NULL OR i.created_at >= $4)
   AND ($5::timestamptz IS NULL OR i.created_at < $5)
   AND ($6::timestamptz IS NULL OR (i.created_at, i.id) < ($6, $7::text))
 ORDER BY i.created_at DESC, i.id DESC
 LIMIT $8

-- name: khqr_insert
INSERT INTO khqr_codes (md5, invoice_id, payload, to_account, currency, amount, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (md5) DO NOTHING
RETURNING md5

-- name: invoice_set_khqr
UPDATE invoices SET current_khqr_md5 = $2 WHERE id = $1

-- name: invoice_cancel
UPDATE invoices SET status = 'cancelled', cancelled_at = $2
 WHERE id = $1 AND status = 'open'
RETURNING *, (SELECT code FROM agencies WHERE id = agency_id) AS agency_code

-- name: invoice_by_bill
-- The invoice with this bill number, and its agency (bill numbers are unique across agencies).
SELECT id, agency_id FROM invoices WHERE bill_number = $1

-- name: exceptions_of_invoice
-- Every exception about an invoice ($1) or one of its payments ($2), each found through an index: by its
-- payment; open on the invoice; an expired invoice's part; money treasury matched to it, from a payment or
-- from another expired invoice's part (whose exception keeps that invoice's id: found by review).
SELECT id, reason, state, provider, business_date, currency, amount, resolution, opened_at
  FROM reconciliation_exceptions
 WHERE id IN (SELECT id FROM reconciliation_exceptions WHERE payment_id = ANY($2::text[])
              UNION SELECT id FROM reconciliation_exceptions WHERE invoice_id = $1 AND state = 'open'
              UNION SELECT id FROM reconciliation_exceptions WHERE invoice_id = $1 AND reason = 'expired_part_paid'
              UNION SELECT id FROM reconciliation_exceptions WHERE invoice_id = $1 AND resolution = 'match_to_invoice'
              UNION SELECT id FROM reconciliation_exceptions
                     WHERE reason = 'expired_part_paid' AND evidence ->> 'matched_to' = $1)
 ORDER BY opened_at, id

-- name: agency_id_by_code
SELECT id FROM agencies WHERE code = $1

-- name: invoices_expire_due
WITH due AS (
    SELECT id FROM invoices
     WHERE status = 'open' AND expires_at <= $1
     ORDER BY expires_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
UPDATE invoices i SET status = 'expired', expired_at = $1
  FROM due WHERE i.id = due.id
RETURNING i.*

-- name: idempotency_claim
-- The lock is held to the end of the transaction. A request that committed after this statement's
-- snapshot is not seen here; the insert of our own record then fails on the key, and we retry.
SELECT l.locked, k.request_hash, k.status, k.response
  FROM (SELECT pg_try_advisory_xact_lock(hashtextextended($1 || ':' || $2, 7)) AS locked) l
  LEFT JOIN idempotency_keys k ON k.owner = $1 AND k.key = $2

-- name: idempotency_lookup
-- The record of a key, read with a statement of its own (so it sees whatever committed before it started).
SELECT request_hash, status, response FROM idempotency_keys WHERE owner = $1 AND key = $2

-- name: idempotency_prune
DELETE FROM idempotency_keys WHERE created_at < $1

-- name: invoice_erase_payer
-- The payer's details erased (a citizen's request, through the agency's portal). Erasing again changes nothing.
UPDATE invoices SET payer_key_id = NULL, payer_ciphertext = NULL, payer_erased_at = coalesce(payer_erased_at, $3)
 WHERE id = $1 AND agency_id = $2
RETURNING id

-- name: invoices_erase_payers_past_retention
-- Final invoices that became final before $1 and still hold a payer, $3 at a time ($2: now), except those an open
-- reconciliation exception names (treasury may need to reach the payer: a refund, say). Rows another
-- transaction holds are left for the next sweep; the lock taken lets payments that name an invoice be written
-- meanwhile (no key changes).
WITH due AS (
    SELECT i.id FROM invoices i
     WHERE i.payer_key_id IS NOT NULL AND i.status <> 'open'
       AND coalesce(i.paid_at, i.cancelled_at, i.expired_at) < $1
       AND NOT EXISTS (SELECT 1 FROM reconciliation_exceptions e WHERE e.invoice_id = i.id AND e.state = 'open')
     ORDER BY coalesce(i.paid_at, i.cancelled_at, i.expired_at)
     LIMIT $3
       FOR NO KEY UPDATE SKIP LOCKED)
UPDATE invoices i SET payer_key_id = NULL, payer_ciphertext = NULL, payer_erased_at = $2
  FROM due WHERE i.id = due.id
