-- name: pay_page_invoice
-- What the public payment page may show: no payer data, no reference, no metadata.
SELECT i.id, i.status, i.currency, i.amount, i.amount_paid, i.description, i.bill_number, i.expires_at,
       i.paid_at, a.name AS agency_name, a.name_km AS agency_name_km
  FROM invoices i JOIN agencies a ON a.id = i.agency_id
 WHERE i.id = $1
