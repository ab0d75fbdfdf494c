-- name: exceptions_list
SELECT e.id, e.reason, e.state, e.provider, e.payment_id, e.invoice_id, a.code AS agency, e.currency, e.amount,
       e.business_date, e.evidence, e.opened_at, e.resolved_at, e.resolved_by, e.resolution, e.resolution_note,
       e.resolution_entry_id::bigint AS resolution_entry_id
  FROM reconciliation_exceptions e LEFT JOIN agencies a ON a.id = e.agency_id
 WHERE ($1::text IS NULL OR e.provider = $1)
   AND ($2::date IS NULL OR e.business_date = $2)
   AND ($3::text IS NULL OR e.reason = $3)
   AND ($4::text IS NULL OR e.state = $4)
   AND ($5::timestamptz IS NULL OR (e.opened_at, e.id) < ($5, $6::text))
 ORDER BY e.opened_at DESC, e.id DESC
 LIMIT $7
