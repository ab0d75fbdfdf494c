-- name: pay_page_invoice
-- What the public payment page may show: no payer data, no portal reference, no metadata (the fee's lines, like
-- its description, are the bill itself). Once paid, the last payment booked to it (not one held for treasury): its
-- provider and the provider's transaction id, which the citizen's bank also shows. Never the paying account; never
-- a payment captured from a settlement file, whose id may be the bank statement's own reference or the text a
-- payer typed (camt.053's EndToEndId: found by review).
SELECT i.id, i.status, i.currency, i.amount, i.amount_paid, i.description, i.bill_number, i.expires_at,
       i.paid_at, i.line_items, a.name AS agency_name, a.name_km AS agency_name_km,
       p.provider AS paid_with, p.provider_transaction_id AS payment_reference,
       -- a payment on it held for treasury, not resolved yet: the citizen must not pay again (found by a citizen's
       -- walk-through: after paying short the page still asked for the whole amount, and said nothing)
       EXISTS (SELECT 1 FROM reconciliation_exceptions x
                WHERE x.invoice_id = i.id AND x.state = 'open'
                  -- what capture holds on an invoice not paid (overpaid and duplicate_payment come on paid ones;
                  -- unknown_khqr names no invoice)
                  AND x.reason IN ('underpaid', 'currency_mismatch', 'account_mismatch', 'invoice_expired',
                                   'invoice_cancelled', 'paid_at_implausible'))
           AS payment_held
  FROM invoices i JOIN agencies a ON a.id = i.agency_id
  LEFT JOIN LATERAL (SELECT provider, provider_transaction_id FROM payments
                      WHERE invoice_id = i.id AND applied_amount > 0 AND i.status = 'paid'
                        AND source <> 'settlement'
                      ORDER BY captured_at DESC, id DESC LIMIT 1) p ON true
 WHERE i.id = $1
