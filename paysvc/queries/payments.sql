-- name: payment_by_provider_tx
SELECT id, invoice_id FROM payments WHERE provider = $1 AND provider_transaction_id = $2

-- name: payment_by_khqr
SELECT id, provider, invoice_id, amount, currency FROM payments WHERE khqr_md5 = $1

-- name: khqr_for_capture
SELECT md5, invoice_id, to_account, currency, amount, created_at, expires_at FROM khqr_codes WHERE md5 = $1

-- name: invoice_for_capture
SELECT i.id, i.agency_id, a.code AS agency_code, a.bakong_account, i.status, i.currency, i.amount,
       i.amount_paid, i.expires_at
  FROM invoices i JOIN agencies a ON a.id = i.agency_id
 WHERE i.id = $1
   FOR UPDATE OF i

-- name: invoice_for_capture_by_bill
SELECT i.id, i.agency_id, a.code AS agency_code, a.bakong_account, i.status, i.currency, i.amount,
       i.amount_paid, i.expires_at
  FROM invoices i JOIN agencies a ON a.id = i.agency_id
 WHERE i.bill_number = $1
   FOR UPDATE OF i

-- name: payment_insert
INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, khqr_md5, bill_number,
                      currency, amount, applied_amount, suspense_amount, to_account, from_account, paid_at,
                      captured_at, source, inbox_id, evidence)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT DO NOTHING
RETURNING id

-- name: invoice_mark_paid
UPDATE invoices
   SET amount_paid = amount_paid + $2,
       status = CASE WHEN amount_paid + $2 >= amount THEN 'paid' ELSE status END,
       paid_at = CASE WHEN amount_paid + $2 >= amount THEN $3 ELSE paid_at END
 WHERE id = $1
RETURNING *

-- name: exception_insert
INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, invoice_id, agency_id, currency, amount,
                                       business_date, evidence, opened_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)

-- name: payments_of_invoice
SELECT id, provider, provider_transaction_id, amount, currency, paid_at,
       CASE WHEN suspense_amount = 0 THEN 'captured' ELSE 'exception' END AS status
  FROM payments WHERE invoice_id = $1 ORDER BY paid_at
