-- name: capture_target
-- The KHQR code the notice names and its invoice, or else the invoice with the notice's bill number;
-- the invoice row is locked, so captures for one invoice queue. Columns are NULL for what was not found.
SELECT k.md5, k.to_account, i.id, i.agency_id, a.code AS agency_code, a.bakong_account, i.status, i.currency,
       i.amount, i.amount_paid, i.expires_at
  FROM invoices i
  JOIN agencies a ON a.id = i.agency_id
  LEFT JOIN khqr_codes k ON k.md5 = $1 AND k.invoice_id = i.id
 WHERE i.id = coalesce((SELECT invoice_id FROM khqr_codes WHERE md5 = $1),
                       (SELECT id FROM invoices WHERE bill_number = $2))
   FOR UPDATE OF i

-- name: capture_prior
-- Payments already captured for this provider transaction, or on this KHQR code (that one first).
SELECT id, provider, provider_transaction_id, invoice_id, amount, currency
  FROM payments
 WHERE (provider = $1 AND provider_transaction_id = $2) OR khqr_md5 = $3
 ORDER BY (khqr_md5 IS NOT DISTINCT FROM $3) DESC

-- name: payment_insert
-- The payment, and when it pays its invoice ($19), the invoice's new amount and state. No row back when the
-- same money was captured first by a concurrent transaction (either unique index).
WITH pay AS (
    INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, khqr_md5, bill_number,
                          currency, amount, applied_amount, suspense_amount, to_account, from_account, paid_at,
                          captured_at, source, inbox_id, evidence)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
    ON CONFLICT DO NOTHING
    RETURNING id, invoice_id, applied_amount, paid_at
), inv AS (
    UPDATE invoices i
       SET amount_paid = i.amount_paid + pay.applied_amount,
           status = CASE WHEN i.amount_paid + pay.applied_amount >= i.amount THEN 'paid' ELSE i.status END,
           paid_at = CASE WHEN i.amount_paid + pay.applied_amount >= i.amount THEN pay.paid_at ELSE i.paid_at END
      FROM pay
     WHERE $19::boolean AND i.id = pay.invoice_id
    RETURNING i.reference, i.bill_number, i.status, i.currency, i.amount, i.amount_paid
)
SELECT pay.id, inv.* FROM pay LEFT JOIN inv ON true

-- name: exception_insert
INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, invoice_id, agency_id, currency, amount,
                                       business_date, evidence, opened_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)

-- name: payments_of_invoice
SELECT id, provider, provider_transaction_id, amount, currency, paid_at,
       CASE WHEN suspense_amount = 0 THEN 'captured' ELSE 'exception' END AS status
  FROM payments WHERE invoice_id = $1 ORDER BY paid_at
