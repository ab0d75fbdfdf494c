-- name: agency_by_id
SELECT id, code, name, name_km, bakong_account, merchant_id, acquiring_bank, mcc, city
  FROM agencies WHERE id = $1

-- name: invoice_insert
INSERT INTO invoices (id, agency_id, reference, description, currency, amount,
                      line_items, metadata, payer_key_id, payer_ciphertext, expires_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (agency_id, reference) DO NOTHING
RETURNING *

-- name: invoice_reference_owner
SELECT id FROM invoices WHERE agency_id = $1 AND reference = $2

-- name: invoice_get
SELECT i.*, k.payload AS khqr_payload, k.expires_at AS khqr_expires_at
  FROM invoices i LEFT JOIN khqr_codes k ON k.md5 = i.current_khqr_md5
 WHERE i.id = $1 AND ($2::bigint IS NULL OR i.agency_id = $2)

-- name: invoice_lock
-- No join here: under READ COMMITTED a join beside FOR UPDATE would re-check the locked row but keep the
-- joined row it read before waiting, i.e. a code another transaction has just replaced.
SELECT * FROM invoices WHERE id = $1 AND ($2::bigint IS NULL OR agency_id = $2) FOR UPDATE

-- name: khqr_by_md5
SELECT md5, payload, expires_at, created_at FROM khqr_codes WHERE md5 = $1

-- name: invoice_list
SELECT i.*, k.payload AS khqr_payload, k.expires_at AS khqr_expires_at
  FROM invoices i LEFT JOIN khqr_codes k ON k.md5 = i.current_khqr_md5
 WHERE i.agency_id = $1
   AND ($2::text IS NULL OR i.status = $2)
   AND ($3::text IS NULL OR i.reference = $3)
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
RETURNING *

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

-- name: idempotency_lock
SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))

-- name: idempotency_get
SELECT request_hash, status, response FROM idempotency_keys WHERE owner = $1 AND key = $2

-- name: idempotency_put
INSERT INTO idempotency_keys (owner, key, request_hash, status, response) VALUES ($1, $2, $3, $4, $5)

-- name: idempotency_prune
DELETE FROM idempotency_keys WHERE created_at < $1
