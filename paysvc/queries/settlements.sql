-- Settlement import and matching: set-based, over a temporary staging table filled by COPY.
-- $tz/$cutoff parameters carry the business-day rule of paysvc/settlement_days.py into SQL.
-- A payment's settling line is one of category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
-- 'settled_after_resolution'), written out so: the partial index settlement_lines_settle_once has that
-- predicate, and the planner cannot prove it from category <> 'duplicate_in_settlement' (the same rows, given
-- the CHECK), which scanned every stored line once per exception line (found by review: an import's time grew
-- with every line ever stored, 25 s for 1,000 exception lines beside 200,000 stored ones).

-- name: settlement_claim
-- The file is its SHA-256: the second import of the same bytes finds the first settlement.
INSERT INTO settlements (id, provider, format, business_date, file_sha256, file_name, file_size, imported_at,
                         imported_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (file_sha256) DO NOTHING
RETURNING id

-- name: settlement_by_sha
SELECT id, provider, format, business_date FROM settlements WHERE file_sha256 = $1

-- name: staging_create
CREATE TEMP TABLE settlement_staging (LIKE settlement_staging_shape) ON COMMIT DROP

-- name: staging_analyze
ANALYZE settlement_staging

-- name: match_by_transaction_id
UPDATE settlement_staging s
   SET payment_id = p.id, matched_by = 'transaction_id'
  FROM payments p
 WHERE p.provider = $1 AND p.provider_transaction_id = s.transaction_id

-- name: match_by_md5
-- A code may be paid more than once (a citizen paying an old code again): lines and payments with the same md5
-- and amount are paired in order (the n-th line with the n-th payment on the code), so none is taken twice.
WITH l AS (
    SELECT line_no, md5, amount, currency,
           row_number() OVER (PARTITION BY md5, amount, currency ORDER BY line_no) AS n
      FROM settlement_staging s
     WHERE payment_id IS NULL AND md5 IS NOT NULL
       -- A line whose transaction id this provider reported as another channel's payment is that payment: it
       -- is left to the capture, which finds the report and raises it (found by review: it took the
       -- provider's own next payment on the code, whose line then came as a duplicate).
       AND NOT EXISTS (SELECT 1 FROM payment_reports r
                        WHERE r.provider = $1 AND r.provider_transaction_id = s.transaction_id)),
p AS (
    SELECT p.id, p.khqr_md5 AS md5, p.amount, p.currency,
           row_number() OVER (PARTITION BY p.khqr_md5, p.amount, p.currency
                              ORDER BY coalesce(p.khqr_seq, 1)) AS n
      FROM payments p
     WHERE p.provider = $1 AND p.khqr_md5 IN (SELECT md5 FROM l)
       AND NOT EXISTS (SELECT 1 FROM settlement_staging x WHERE x.payment_id = p.id)
       AND NOT EXISTS (SELECT 1 FROM settlement_lines sl
                        WHERE sl.payment_id = p.id
                          AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                              'settled_after_resolution')))
UPDATE settlement_staging s SET payment_id = p.id, matched_by = 'md5'
  FROM l JOIN p USING (md5, amount, currency, n)
 WHERE s.line_no = l.line_no

-- name: match_by_bill_number
-- Several payments may carry one bill number: lines and payments with the same bill number and amount are
-- paired in order (the n-th line with the n-th payment), so none is taken twice.
WITH l AS (
    SELECT line_no, bill_number, amount, currency,
           row_number() OVER (PARTITION BY bill_number, amount, currency ORDER BY line_no) AS n
      FROM settlement_staging s
     WHERE payment_id IS NULL AND bill_number IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM payment_reports r  -- as in match_by_md5
                        WHERE r.provider = $1 AND r.provider_transaction_id = s.transaction_id)),
p AS (
    SELECT p.id, p.bill_number, p.amount, p.currency,
           row_number() OVER (PARTITION BY p.bill_number, p.amount, p.currency ORDER BY p.paid_at, p.id) AS n
      FROM payments p
     WHERE p.provider = $1 AND p.bill_number IN (SELECT bill_number FROM l)
       AND NOT EXISTS (SELECT 1 FROM settlement_staging x WHERE x.payment_id = p.id)
       AND NOT EXISTS (SELECT 1 FROM settlement_lines sl
                        WHERE sl.payment_id = p.id
                          AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                              'settled_after_resolution')))
UPDATE settlement_staging s SET payment_id = p.id, matched_by = 'bill_number'
  FROM l JOIN p USING (bill_number, amount, currency, n)
 WHERE s.line_no = l.line_no

-- name: categorize
-- Every line gets exactly one category. A payment is settled by its first line; a later line for it, or a
-- line for a payment an earlier file settled, is a duplicate; so is a repeated unknown transaction id.
-- A first line for a payment whose missing_in_settlement treasury resolved (write_off, refund_due) is
-- settled_after_resolution.
WITH r AS (
    SELECT s.line_no,
           CASE
             WHEN s.payment_id IS NOT NULL AND (
                      row_number() OVER (PARTITION BY s.payment_id ORDER BY s.line_no) > 1
                      OR EXISTS (SELECT 1 FROM settlement_lines sl
                                  WHERE sl.payment_id = s.payment_id
                                    AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                                        'settled_after_resolution')))
               THEN 'duplicate_in_settlement'
             -- Treasury already wrote it off or booked it as returned (missing_in_settlement resolved): the line
             -- settles it but is not posted; the resolution of the exception it raises puts the money right.
             WHEN s.payment_id IS NOT NULL AND EXISTS (
                      SELECT 1 FROM reconciliation_exceptions e
                       WHERE e.payment_id = s.payment_id AND e.reason = 'missing_in_settlement'
                         AND e.state = 'resolved' AND e.resolution IN ('write_off', 'refund_due'))
               THEN 'settled_after_resolution'
             WHEN s.payment_id IS NOT NULL AND p.amount = s.amount AND p.currency = s.currency THEN 'matched'
             WHEN s.payment_id IS NOT NULL THEN 'amount_mismatch'
             WHEN s.transaction_id IS NOT NULL
                  AND row_number() OVER (PARTITION BY s.transaction_id, (s.payment_id IS NULL) ORDER BY s.line_no) > 1
               THEN 'duplicate_in_settlement'
             ELSE 'missing_in_ledger'
           END AS category,
           CASE WHEN s.payment_id IS NOT NULL
                THEN first_value(s.line_no) OVER (PARTITION BY s.payment_id ORDER BY s.line_no)
                WHEN s.transaction_id IS NOT NULL
                THEN first_value(s.line_no) OVER (PARTITION BY s.transaction_id, (s.payment_id IS NULL)
                                                  ORDER BY s.line_no) END AS first_line
      FROM settlement_staging s LEFT JOIN payments p ON p.id = s.payment_id)
UPDATE settlement_staging s
   SET category = r.category,
       duplicate_of = CASE WHEN r.category = 'duplicate_in_settlement' AND r.first_line <> s.line_no
                           THEN r.first_line END
  FROM r
 WHERE s.line_no = r.line_no

-- name: staging_missing
SELECT line_no, transaction_id, md5, bill_number, amount, currency, paid_at, fee, reference, id_is_reference
  FROM settlement_staging WHERE category = 'missing_in_ledger' ORDER BY line_no

-- name: staging_set_captured
-- After capture: each missing line names its new payment (or, when the money was already captured under
-- another channel, becomes a duplicate of that payment, raised with an exception of its own: this provider's
-- clearing never held that money, and the payment's own exceptions, if any, stay as they are). A line whose own
-- payment (this provider, this transaction id) was captured while the import ran, after the matching had
-- looked, is matched to it as the matching would have done. $4 provider.
WITH c AS (
    SELECT c.line_no, c.payment_id, c.created, p.amount, p.currency,
           NOT c.created AND p.provider = $4 AND p.provider_transaction_id IS NOT DISTINCT FROM l.transaction_id
               AS own
      FROM unnest($1::int[], $2::text[], $3::bool[]) AS c (line_no, payment_id, created)
      JOIN payments p ON p.id = c.payment_id
      JOIN settlement_staging l ON l.line_no = c.line_no)
UPDATE settlement_staging s
   SET payment_id = c.payment_id,
       matched_by = CASE WHEN c.own THEN 'transaction_id' ELSE 'captured' END,
       category = CASE WHEN c.created THEN 'missing_in_ledger'
                       WHEN c.own AND c.amount = s.amount AND c.currency = s.currency THEN 'matched'
                       WHEN c.own THEN 'amount_mismatch'
                       ELSE 'duplicate_in_settlement' END,
       exception_id = NULL
  FROM c
 WHERE s.line_no = c.line_no

-- name: staging_duplicates_follow
-- A repeated unknown transaction id duplicates the payment its first line was captured as.
UPDATE settlement_staging s
   SET payment_id = f.payment_id
  FROM settlement_staging f
 WHERE s.category = 'duplicate_in_settlement' AND s.payment_id IS NULL AND s.duplicate_of = f.line_no

-- name: staging_exception_ids
UPDATE settlement_staging
   SET exception_id = 'exc_' || replace(gen_random_uuid()::text, '-', '')
 WHERE category IN ('amount_mismatch', 'duplicate_in_settlement', 'settled_after_resolution')
   AND exception_id IS NULL

-- name: exceptions_from_staging
-- $1 settlement, $2 provider, $3 business date, $4 now
INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, invoice_id, agency_id, currency, amount,
                                       business_date, evidence, opened_at)
SELECT s.exception_id, s.category, $2, s.payment_id, p.invoice_id, p.agency_id, s.currency,
       CASE WHEN s.category = 'amount_mismatch' AND p.currency = s.currency THEN abs(s.amount - p.amount)
            ELSE s.amount END,
       $3,
       jsonb_build_object(
           'settlement_id', $1::text, 'line_no', s.line_no,
           'line', jsonb_build_object('transaction_id', s.transaction_id, 'md5', s.md5,
                                      'bill_number', s.bill_number, 'amount', s.amount, 'currency', s.currency,
                                      'fee', s.fee, 'paid_at', s.paid_at, 'reference', s.reference),
           'payment', CASE WHEN p.id IS NULL THEN NULL ELSE jsonb_build_object(
                          'id', p.id, 'provider', p.provider, 'provider_transaction_id', p.provider_transaction_id,
                          'amount', p.amount, 'currency', p.currency, 'paid_at', p.paid_at,
                          'applied_amount', p.applied_amount, 'suspense_amount', p.suspense_amount) END,
           'duplicate_of_line', s.duplicate_of,
           'earlier_resolution', CASE WHEN s.category = 'settled_after_resolution' THEN (
               SELECT jsonb_build_object('exception_id', e.id, 'reason', e.reason, 'resolution', e.resolution,
                                         'resolution_entry_id', e.resolution_entry_id, 'resolved_by', e.resolved_by)
                 FROM reconciliation_exceptions e
                WHERE e.payment_id = s.payment_id AND e.reason = 'missing_in_settlement') END,
           'settled_by', (SELECT jsonb_build_object('settlement_id', sl.settlement_id, 'line_no', sl.line_no)
                            FROM settlement_lines sl
                           WHERE sl.payment_id = s.payment_id
                             AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                                 'settled_after_resolution'))),
       $4
  FROM settlement_staging s LEFT JOIN payments p ON p.id = s.payment_id
 WHERE s.category IN ('amount_mismatch', 'duplicate_in_settlement', 'settled_after_resolution')

-- name: lines_from_staging
INSERT INTO settlement_lines (settlement_id, line_no, transaction_id, md5, bill_number, amount, currency, paid_at,
                              fee, reference, category, matched_by, payment_id, exception_id)
SELECT $1, line_no, transaction_id, md5, bill_number, amount, currency, paid_at, fee, reference, category,
       matched_by, payment_id, exception_id
  FROM settlement_staging

-- name: staging_posting_totals
-- What the settlement entry posts: the lines whose money the ledger holds in clearing (matched, and the
-- missing ones captured just now).
SELECT currency, sum(amount)::bigint AS gross, sum(fee)::bigint AS fees, count(*) AS lines
  FROM settlement_staging
 WHERE category IN ('matched', 'missing_in_ledger')
 GROUP BY currency ORDER BY currency

-- name: staging_agency_totals
SELECT p.agency_id, s.currency, count(*) AS payments, sum(s.amount)::bigint AS amount,
       sum(s.fee)::bigint AS fees
  FROM settlement_staging s JOIN payments p ON p.id = s.payment_id
 WHERE s.category IN ('matched', 'missing_in_ledger') AND p.agency_id IS NOT NULL
 GROUP BY p.agency_id, s.currency ORDER BY p.agency_id, s.currency

-- name: settled_payments_of_agency
-- The payments of agency $2 a settlement ($1) settled (the lines its settlement.reconciled counts), after line
-- $3, in line order, $4 of them. Read with a custom plan: a generic one read every line of a large file
-- for an agency with few of them (found by review: 1 s a page at a million lines).
SELECT l.line_no, l.category, l.payment_id, p.provider_transaction_id, p.invoice_id, i.reference AS invoice_reference,
       i.bill_number, a.code AS agency, l.currency, l.amount, l.fee, p.paid_at
  FROM settlement_lines l
  JOIN payments p ON p.id = l.payment_id AND p.agency_id = $2
  JOIN agencies a ON a.id = p.agency_id
  LEFT JOIN invoices i ON i.id = p.invoice_id
 WHERE l.settlement_id = $1 AND l.line_no > $3 AND l.category IN ('matched', 'missing_in_ledger')
 ORDER BY l.line_no
 LIMIT $4

-- name: settled_payments_all
-- The same for treasury: every payment the settlement settled, those of no agency too (agency null).
SELECT l.line_no, l.category, l.payment_id, p.provider_transaction_id, p.invoice_id, i.reference AS invoice_reference,
       i.bill_number, a.code AS agency, l.currency, l.amount, l.fee, p.paid_at
  FROM settlement_lines l
  JOIN payments p ON p.id = l.payment_id
  LEFT JOIN agencies a ON a.id = p.agency_id
  LEFT JOIN invoices i ON i.id = p.invoice_id
 WHERE l.settlement_id = $1 AND l.line_no > $2 AND l.category IN ('matched', 'missing_in_ledger')
 ORDER BY l.line_no
 LIMIT $3

-- name: staging_summary
SELECT category, currency, count(*) AS lines, sum(amount)::bigint AS amount, sum(fee)::bigint AS fees
  FROM settlement_staging GROUP BY category, currency ORDER BY category, currency

-- name: settlement_finish
UPDATE settlements SET line_count = $2, journal_entry_id = $3, summary = $4 WHERE id = $1

-- name: line_exceptions_date
-- Exceptions raised at capture for the payments this file's lines captured (unknown_khqr, missing_in_ledger,
-- …) take the file's business date, whatever day their paid_at falls on: it is the day treasury reconciles,
-- and that day is not clean while they are open. $1 business date, $2 the ids of the payments the import
-- captured (known to it: looked up by the payment index; a join with the staging table took 16 s for a
-- 1,000,000-line file).
UPDATE reconciliation_exceptions
   SET business_date = $1
 WHERE payment_id = ANY ($2::text[]) AND business_date IS NULL AND state = 'open'

-- name: day_exceptions_date
-- Exceptions raised at capture for the day's payments take the day's business date.
UPDATE reconciliation_exceptions e
   SET business_date = $4
  FROM payments p
 WHERE e.payment_id = p.id AND e.business_date IS NULL AND e.state = 'open'
   AND p.provider = $1 AND p.paid_at > $2 AND p.paid_at <= $3

-- name: raise_missing_in_settlement
-- Payments paid (or, dated later than captured, captured) on or before $2 (the end of the last business day past
-- its grace) and settled by no line are raised once, dated the business day of the earlier of the two. $1 provider or NULL for all; $3 time zone; $4 cut-off; $5 now.
-- $6, $7: only payments paid after $6 or recorded by a transaction at or above $7 (the provider's mark,
-- settlement_overdue_marks; $6 at the start of time reads them all). raise_overdue sends the bounded read as a
-- statement of its own, so that neither takes the other's cached plan.
INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, invoice_id, agency_id, currency, amount,
                                       business_date, evidence, opened_at)
SELECT 'exc_' || replace(gen_random_uuid()::text, '-', ''), 'missing_in_settlement', p.provider, p.id,
       p.invoice_id, p.agency_id, p.currency, p.amount,
       CASE WHEN (least(p.paid_at, p.captured_at) AT TIME ZONE $3)::time > $4::time
            THEN (least(p.paid_at, p.captured_at) AT TIME ZONE $3)::date + 1
            ELSE (least(p.paid_at, p.captured_at) AT TIME ZONE $3)::date END,
       jsonb_build_object('payment', jsonb_build_object(
           'id', p.id, 'provider_transaction_id', p.provider_transaction_id, 'amount', p.amount,
           'currency', p.currency, 'paid_at', p.paid_at, 'applied_amount', p.applied_amount,
           'suspense_amount', p.suspense_amount), 'raised_after_grace_until', $2::timestamptz),
       $5
  FROM payments p
 WHERE ($1::text IS NULL OR p.provider = $1)
   -- by the reported time, or, for a payment its provider dated later than it reached us (paid_at_implausible),
   -- by its capture: by the reported time it would never be overdue (found by review)
   AND (p.paid_at <= $2 OR (p.paid_at > p.captured_at AND p.captured_at <= $2))
   AND (p.paid_at > $6 OR p.recorded_xid >= $7::xid8)
   AND NOT EXISTS (SELECT 1 FROM settlement_lines sl
                    WHERE sl.payment_id = p.id
                      AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                          'settled_after_resolution'))
ON CONFLICT (payment_id) WHERE reason = 'missing_in_settlement' DO NOTHING
RETURNING id

-- name: business_date_sql
-- The SQL twin of settlement_days.business_date (a test checks they agree).
SELECT CASE WHEN ($1::timestamptz AT TIME ZONE $2)::time > $3::time THEN ($1::timestamptz AT TIME ZONE $2)::date + 1
            ELSE ($1::timestamptz AT TIME ZONE $2)::date END

-- name: settlement_get
SELECT s.id, s.provider, s.format, s.business_date, encode(s.file_sha256, 'hex') AS file_sha256, s.file_name,
       s.file_size, s.line_count, s.imported_at, s.imported_by, s.journal_entry_id, s.summary
  FROM settlements s WHERE s.id = $1

-- name: settlements_list
SELECT s.id, s.provider, s.format, s.business_date, s.line_count, s.imported_at, s.imported_by
  FROM settlements s
 WHERE ($1::text IS NULL OR s.provider = $1) AND ($2::date IS NULL OR s.business_date = $2)
   AND ($3::timestamptz IS NULL OR (s.imported_at, s.id) < ($3, $4::text))
 ORDER BY s.imported_at DESC, s.id DESC
 LIMIT $5

-- name: settlement_line_totals
SELECT category, currency, count(*) AS lines, sum(amount)::bigint AS amount, sum(fee)::bigint AS fees
  FROM settlement_lines WHERE settlement_id = $1 GROUP BY category, currency ORDER BY category, currency

-- name: settlement_lines_page
-- A line's exception: the one the import opened for it (amount_mismatch, duplicate_in_settlement,
-- settled_after_resolution), or for a missing_in_ledger line, the one the capture of its payment opened
-- (missing_in_ledger, or the capture's own reason such as unknown_khqr: one per payment). Found by review: the
-- report named no exception for those lines. Only shown here: settlement_lines.exception_id stays the
-- import's own, which resolution reads as "the line of this exception".
-- A line that settles a payment (matched, or for another amount) whose capture held money for treasury (paid
-- short, a cancelled invoice…) also names that exception (payment_exception_id, _state, _reason): the payment is
-- still treasury's (found by an auditor's walk-through: such lines read "matched", no exception). Not a line that
-- repeats another (duplicate_in_settlement): it settles nothing (found by review).
SELECT l.line_no, l.transaction_id, l.md5, l.bill_number, l.amount, l.currency, l.paid_at, l.fee, l.reference,
       l.category, l.matched_by, l.payment_id, coalesce(l.exception_id, c.id) AS exception_id,
       coalesce(e.state, c.state) AS exception_state,
       pc.id AS payment_exception_id, pc.state AS payment_exception_state, pc.reason AS payment_exception_reason
  FROM settlement_lines l
  LEFT JOIN reconciliation_exceptions e ON e.id = l.exception_id
  LEFT JOIN LATERAL (
      SELECT x.id, x.state FROM reconciliation_exceptions x
       WHERE l.category = 'missing_in_ledger' AND l.exception_id IS NULL AND x.payment_id = l.payment_id
         AND x.reason IN ('missing_in_ledger', 'unknown_khqr', 'currency_mismatch', 'account_mismatch',
                          'invoice_expired', 'invoice_cancelled', 'duplicate_payment', 'underpaid', 'overpaid',
                          'paid_at_implausible')
       ORDER BY x.opened_at, x.id
       LIMIT 1) c ON true
  LEFT JOIN LATERAL (
      SELECT x.id, x.state, x.reason FROM reconciliation_exceptions x
       WHERE l.category IN ('matched', 'amount_mismatch') AND x.payment_id = l.payment_id
         AND x.reason IN ('unknown_khqr', 'currency_mismatch', 'account_mismatch', 'invoice_expired',
                          'invoice_cancelled', 'duplicate_payment', 'underpaid', 'overpaid', 'paid_at_implausible')
       ORDER BY x.opened_at, x.id
       LIMIT 1) pc ON true
 WHERE l.settlement_id = $1 AND l.line_no > $2
 ORDER BY l.line_no
 LIMIT $3

-- name: day_payment_states
-- The day's captured payments of the provider ($2 < paid_at <= $3), each in one state: settled with its
-- line's category, or not settled: raised (missing_in_settlement) or still expected.
SELECT state, currency, count(*) AS payments, sum(amount)::bigint AS amount FROM (
    SELECT p.currency, p.amount,
           coalesce(l.category,
                    CASE WHEN e.id IS NOT NULL THEN 'missing_in_settlement' ELSE 'expected' END) AS state
      FROM payments p
      LEFT JOIN settlement_lines l ON l.payment_id = p.id
                                     AND l.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                                        'settled_after_resolution')
      LEFT JOIN reconciliation_exceptions e ON e.payment_id = p.id AND e.reason = 'missing_in_settlement'
     WHERE p.provider = $1 AND p.paid_at > $2 AND p.paid_at <= $3) d
 GROUP BY state, currency ORDER BY state, currency

-- name: day_unsettled_payments
-- $4: at most this many (NULL: all)
SELECT p.id, p.provider_transaction_id, p.bill_number, p.amount, p.currency, p.paid_at, e.id AS exception_id,
       e.state AS exception_state
  FROM payments p
  LEFT JOIN reconciliation_exceptions e ON e.payment_id = p.id AND e.reason = 'missing_in_settlement'
 WHERE p.provider = $1 AND p.paid_at > $2 AND p.paid_at <= $3
   AND NOT EXISTS (SELECT 1 FROM settlement_lines l
                    WHERE l.payment_id = p.id
                      AND l.category IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'settled_after_resolution'))
 ORDER BY p.paid_at, p.id
 LIMIT $4

-- name: day_open_exceptions
SELECT e.id, e.reason, e.payment_id, e.invoice_id, e.currency, e.amount, e.evidence, e.opened_at
  FROM reconciliation_exceptions e
 WHERE e.provider = $1 AND e.business_date = $2 AND e.state = 'open'
 ORDER BY e.opened_at, e.id

-- name: day_open_exception_count
SELECT count(*) FROM reconciliation_exceptions e
 WHERE e.provider = $1 AND e.business_date = $2 AND e.state = 'open'

-- name: day_open_exceptions_page
-- A page of the day's open exceptions, oldest first, after exception $3 (NULL: from the first). The cursor
-- is an exception's id: it still orders the page once that exception is resolved.
-- With what treasury needs to decide each one (found by a treasury walk-through: reason, payment and amount
-- alone): the bill it names, the payment's provider id, amount and time, the file line's amount.
SELECT e.id, e.reason, e.payment_id, e.invoice_id, e.currency, e.amount, e.opened_at,
       coalesce(i.bill_number, p.bill_number, e.evidence -> 'line' ->> 'bill_number') AS bill_number,
       p.provider_transaction_id, p.amount AS payment_amount, p.currency AS payment_currency,
       p.paid_at AS payment_paid_at, (e.evidence ->> 'line_no')::int AS line_no,
       (e.evidence -> 'line' ->> 'amount')::bigint AS line_amount, e.evidence -> 'line' ->> 'currency' AS line_currency
  FROM reconciliation_exceptions e
  LEFT JOIN payments p ON p.id = e.payment_id
  LEFT JOIN invoices i ON i.id = e.invoice_id
 WHERE e.provider = $1 AND e.business_date = $2 AND e.state = 'open'
   AND ($3::text IS NULL
        OR (e.opened_at, e.id) > (SELECT c.opened_at, c.id FROM reconciliation_exceptions c WHERE c.id = $3))
 ORDER BY e.opened_at, e.id
 LIMIT $4

-- name: day_remaining
-- What the day leaves in the provider's clearing account, and why: money captured for the day's payments
-- that no posted line settled (expected, missing in settlement, amount mismatch) and whose exception, if
-- any, is still open.
SELECT why, currency, count(*) AS payments, sum(amount)::bigint AS amount FROM (
    SELECT p.currency, p.amount,
           CASE WHEN l.category = 'amount_mismatch' THEN 'amount_mismatch'
                WHEN e.id IS NOT NULL THEN 'missing_in_settlement' ELSE 'expected' END AS why,
           coalesce(xm.state, e.state, 'open') AS open_state
      FROM payments p
      LEFT JOIN settlement_lines l ON l.payment_id = p.id
                                     AND l.category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                                        'settled_after_resolution')
      LEFT JOIN reconciliation_exceptions xm ON xm.id = l.exception_id AND l.category = 'amount_mismatch'
      LEFT JOIN reconciliation_exceptions e ON e.payment_id = p.id AND e.reason = 'missing_in_settlement'
     WHERE p.provider = $1 AND p.paid_at > $2 AND p.paid_at <= $3
       AND (l.category IS NULL OR l.category = 'amount_mismatch')) d
 WHERE open_state = 'open'
 GROUP BY why, currency ORDER BY why, currency

-- name: day_grid
-- Business days × providers from $1 to $2: which have a settlement, and how many exceptions are open.
WITH days AS (SELECT d::date AS business_date FROM generate_series($1::date, $2::date, interval '1 day') d),
provs AS (SELECT unnest($3::text[]) AS provider UNION SELECT DISTINCT provider FROM settlements
          WHERE business_date BETWEEN $1 AND $2)
SELECT d.business_date, v.provider,
       (SELECT count(*) FROM settlements s WHERE s.business_date = d.business_date AND s.provider = v.provider)
           AS settlements,
       (SELECT count(*) FROM reconciliation_exceptions e
         WHERE e.business_date = d.business_date AND e.provider = v.provider AND e.state = 'open') AS open_exceptions
  FROM days d CROSS JOIN provs v
 ORDER BY d.business_date DESC, v.provider

-- name: settlements_of_day
SELECT id, format, file_name, line_count, imported_at, imported_by
  FROM settlements WHERE provider = $1 AND business_date = $2 ORDER BY imported_at, id

-- name: settlement_entry_postings
SELECT a.code AS account, p.side, p.amount, p.currency
  FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
 WHERE p.entry_id = $1 ORDER BY p.line

-- name: exception_for_resolve
SELECT e.id, e.reason, e.state, e.provider, e.payment_id, e.invoice_id, e.currency, e.amount, e.business_date,
       e.evidence
  FROM reconciliation_exceptions e WHERE e.id = $1 FOR UPDATE

-- name: payment_for_resolve
SELECT p.id, p.provider, p.invoice_id, p.amount, p.currency, p.applied_amount, p.suspense_amount,
       a.code AS agency_code
  FROM payments p LEFT JOIN agencies a ON a.id = p.agency_id WHERE p.id = $1

-- name: payment_write_off_loss
-- The loss booked to $2 (expense:write-offs:{provider}:{cur}) by the write-off of payment $1's
-- missing_in_settlement (0 when it was not written off), and what entries about the payment have credited back
-- to that account since (lines that arrived after all and made it good).
SELECT coalesce((SELECT p.amount
                   FROM reconciliation_exceptions x
                   JOIN ledger_entries e ON e.idempotency_key = 'resolution:' || x.id
                   JOIN ledger_postings p ON p.entry_id = e.id
                   JOIN ledger_accounts a ON a.id = p.account_id
                  WHERE x.payment_id = $1 AND x.reason = 'missing_in_settlement' AND x.resolution = 'write_off'
                    AND a.code = $2 AND p.side = 'debit'), 0)::bigint AS written_off,
       coalesce((SELECT sum(p.amount)
                   FROM ledger_entries e
                   JOIN ledger_postings p ON p.entry_id = e.id
                   JOIN ledger_accounts a ON a.id = p.account_id
                  WHERE e.payment_id = $1 AND a.code = $2 AND p.side = 'credit'), 0)::bigint AS recovered

-- name: line_of_exception
SELECT settlement_id, line_no, amount, currency, fee FROM settlement_lines WHERE exception_id = $1

-- name: invoice_for_resolve
SELECT i.id, i.agency_id, a.code AS agency_code, i.status, i.currency, i.amount, i.amount_paid, i.reference,
       i.bill_number
  FROM invoices i JOIN agencies a ON a.id = i.agency_id WHERE i.id = $1 FOR UPDATE OF i

-- name: invoices_for_restore
-- The invoices a refund lowered ($1), locked in id order, with what each owes now.
SELECT i.id, a.code AS agency_code, i.status, i.amount - i.amount_paid AS owed
  FROM invoices i JOIN agencies a ON a.id = i.agency_id WHERE i.id = ANY($1::text[])
 ORDER BY i.id FOR UPDATE OF i

-- name: invoice_apply_resolution
-- A part payment leaves the invoice without a current code: the one it had asks for the whole amount, and the
-- next code issued (GET .../khqr, the payment page) asks for what is left.
UPDATE invoices
   SET amount_paid = amount_paid + $2,
       status = CASE WHEN amount_paid + $2 >= amount THEN 'paid' ELSE status END,
       paid_at = CASE WHEN amount_paid + $2 >= amount AND paid_at IS NULL THEN $3 ELSE paid_at END,
       current_khqr_md5 = CASE WHEN amount_paid + $2 >= amount THEN current_khqr_md5 END
 WHERE id = $1 AND status IN ('open', 'expired')
RETURNING id, agency_id, status, amount, amount_paid, currency, reference, bill_number

-- name: exception_resolve
-- The state change is guarded here: only an open exception is resolved, once.
UPDATE reconciliation_exceptions
   SET state = 'resolved', resolved_at = $2, resolved_by = $3, resolution = $4, resolution_note = $5,
       resolution_entry_id = $6, invoice_id = coalesce($7, invoice_id)
 WHERE id = $1 AND state = 'open'
RETURNING id

-- name: close_missing_settled_late
-- Payments raised as missing_in_settlement that a line of this file now settles, resolved by this
-- settlement. A matched line: this settlement's entry ($3, text) credited their clearing. A line for
-- another amount: the line's amount_mismatch exception now carries the payment (no entry of its own yet).
-- $1 settlement, $2 now.
UPDATE reconciliation_exceptions e
   SET state = 'resolved', resolved_at = $2, resolved_by = 'settlement:' || $1, resolution = 'settled_late',
       resolution_note = CASE s.category
           WHEN 'matched' THEN format('settled late: line %s of settlement %s', s.line_no, $1)
           ELSE format('settled late for another amount: line %s of settlement %s; exception %s carries it',
                       s.line_no, $1, s.exception_id) END,
       resolution_entry_id = CASE s.category WHEN 'matched' THEN $3 END
  FROM settlement_staging s
 WHERE e.payment_id = s.payment_id AND e.reason = 'missing_in_settlement' AND e.state = 'open'
   AND s.category IN ('matched', 'amount_mismatch')
RETURNING e.id

-- name: provider_lock
-- One provider's settlement work at a time, to the end of the transaction: imports, the overdue check, and
-- resolutions of the exceptions an import reads or closes (missing_in_settlement, settled_after_resolution).
SELECT pg_advisory_xact_lock(hashtextextended('paysvc:settlement:' || $1, 0))

-- name: provider_try_lock
-- provider_lock without waiting: false when another transaction holds it.
SELECT pg_try_advisory_xact_lock(hashtextextended('paysvc:settlement:' || $1, 0))

-- name: settled_providers
-- Every provider a settlement was imported for, in order.
SELECT DISTINCT provider FROM settlements ORDER BY provider

-- name: overdue_mark
-- Before an overdue check reads payments: the oldest transaction still running now (every payment this check
-- cannot see was recorded at or above it), and the provider's mark of its last check, if any ($1 NULL: none).
SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin, m.checked_until, m.checked_xmin
  FROM (SELECT) AS one LEFT JOIN settlement_overdue_marks m ON m.provider = $1

-- name: overdue_marks_set
-- After a check of these providers up to $2, which read what the transactions below $3 recorded: a bounded
-- check moves the mark forward, never back (up to an earlier time it read less than the mark stands for); a
-- check that read every payment ($4) sets it.
INSERT INTO settlement_overdue_marks AS m (provider, checked_until, checked_xmin, checked_at)
SELECT provider, $2, $3, now() FROM unnest($1::text[]) AS provider
ON CONFLICT (provider) DO UPDATE
   SET checked_until = EXCLUDED.checked_until, checked_xmin = EXCLUDED.checked_xmin, checked_at = EXCLUDED.checked_at
 WHERE $4 OR m.checked_until <= EXCLUDED.checked_until

-- name: payment_providers
-- Every provider that has payments, in order: one index probe per provider (a loose index scan).
WITH RECURSIVE p AS (
    (SELECT provider FROM payments ORDER BY provider LIMIT 1)
    UNION ALL
    SELECT (SELECT q.provider FROM payments q WHERE q.provider > p.provider ORDER BY q.provider LIMIT 1)
      FROM p WHERE p.provider IS NOT NULL
)
SELECT provider FROM p WHERE provider IS NOT NULL

-- name: exception_reason_provider
-- Read before the exception's row lock (none of them ever changes), to take its provider's lock and its
-- payment's refund lock first.
SELECT reason, provider, payment_id, invoice_id FROM reconciliation_exceptions WHERE id = $1

-- name: settling_line_of_payment
SELECT l.settlement_id, l.line_no, l.category, l.exception_id, s.journal_entry_id
  FROM settlement_lines l JOIN settlements s ON s.id = l.settlement_id
 WHERE l.payment_id = $1
   AND l.category IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'settled_after_resolution')

-- name: invoices_refunded_part
-- Open (or expired) invoices that treasury gave part of payment $1 (match_to_invoice of its capture exceptions,
-- reasons $2): that part is refunded, so each asks for it again (and drops its code, which asked for less).
UPDATE invoices i
   SET amount_paid = i.amount_paid - m.amount, current_khqr_md5 = NULL
  FROM (SELECT invoice_id, sum(amount)::bigint AS amount FROM reconciliation_exceptions
         WHERE payment_id = $1 AND reason = ANY ($2::text[]) AND state = 'resolved'
           AND resolution = 'match_to_invoice' AND invoice_id IS NOT NULL
         GROUP BY invoice_id) m
 WHERE i.id = m.invoice_id AND i.status IN ('open', 'expired')
RETURNING i.id, m.amount

-- name: exception_record_lowered
-- Which invoices a refund lowered and by how much ($2, [{"invoice_id", "amount"}]), kept with its exception for
-- the line that may still settle the payment (settled_after_resolution gives exactly that back).
UPDATE reconciliation_exceptions SET evidence = evidence || jsonb_build_object('invoices_lowered', $2::jsonb)
 WHERE id = $1

-- name: exception_lowered
SELECT evidence -> 'invoices_lowered' AS lowered FROM reconciliation_exceptions WHERE id = $1

-- name: exception_close_settled_late
-- A missing_in_settlement whose payment a line settles, closed as close_missing_settled_late would have.
-- $1 exception, $2 now, $3 settlement, $4 line, $5 the line's category, $6 the line's exception, $7 entry.
UPDATE reconciliation_exceptions
   SET state = 'resolved', resolved_at = $2, resolved_by = 'settlement:' || $3::text, resolution = 'settled_late',
       resolution_note = CASE $5::text
           WHEN 'matched' THEN format('settled late: line %s of settlement %s', $4::int, $3::text)
           ELSE format('settled late (%s): line %s of settlement %s%s', $5::text, $4::int, $3::text,
                       CASE WHEN $6::text IS NOT NULL THEN '; exception ' || $6::text || ' carries it' ELSE '' END)
           END,
       resolution_entry_id = CASE $5::text WHEN 'matched' THEN $7::text END
 WHERE id = $1 AND state = 'open'
RETURNING id, resolved_by, resolution_note, resolution_entry_id

-- name: exception_open_part_paid
-- expired_part_paid for invoice $2 if it is expired holding part of its amount that is not the agency's to keep
-- ($5, what earlier write_offs of its expired_part_paid kept: part_paid_kept; not raised again, found by
-- review), and none is open for it (the partial unique index). Its provider: the one of the last payment
-- treasury applied to it (so the day's page lists it). $1 id, $3 business date, $4 now.
INSERT INTO reconciliation_exceptions (id, reason, provider, invoice_id, agency_id, currency, amount, business_date,
                                       evidence, opened_at)
SELECT $1, 'expired_part_paid',
       coalesce((SELECT x.provider FROM reconciliation_exceptions x
                  WHERE x.invoice_id = i.id AND x.resolution = 'match_to_invoice'
                  ORDER BY x.resolved_at DESC, x.id DESC LIMIT 1),
                (SELECT x.provider FROM reconciliation_exceptions x
                  WHERE x.reason = 'expired_part_paid' AND x.evidence ->> 'matched_to' = i.id
                  ORDER BY x.resolved_at DESC, x.id DESC LIMIT 1),
                (SELECT p.provider FROM payments p WHERE p.invoice_id = i.id
                  ORDER BY p.captured_at DESC, p.id DESC LIMIT 1), 'none'),
       i.id, i.agency_id, i.currency, i.amount_paid - $5, $3,
       jsonb_build_object('invoice', jsonb_build_object(
           'id', i.id, 'amount', i.amount, 'amount_paid', i.amount_paid, 'kept_before', $5::bigint,
           'bill_number', i.bill_number, 'expires_at', i.expires_at)),
       $4
  FROM invoices i
 WHERE i.id = $2 AND i.status = 'expired' AND i.amount_paid - $5 > 0 AND i.amount_paid < i.amount
ON CONFLICT DO NOTHING
RETURNING id, agency_id, invoice_id, currency, amount

-- name: part_paid_kept
-- What write_offs of invoice $1's expired_part_paid left with the agency (it is not raised, refunded or carried
-- again).
SELECT coalesce(sum((evidence ->> 'kept')::bigint), 0)::bigint
  FROM reconciliation_exceptions
 WHERE invoice_id = $1 AND reason = 'expired_part_paid' AND resolution = 'write_off'

-- name: exception_add_evidence
UPDATE reconciliation_exceptions SET evidence = evidence || $2::jsonb WHERE id = $1 AND state = 'open'

-- name: part_paid_unsettled_payments
-- The payments whose money treasury applied to invoice $1 (match_to_invoice) and whose provider may still give it
-- back: not settled by any line, and no missing_in_settlement of theirs resolved (a refund of it took its part
-- back from the invoice already; a write-off of it leaves it there for good).
SELECT DISTINCT x.payment_id
  FROM reconciliation_exceptions x
 WHERE x.invoice_id = $1 AND x.resolution = 'match_to_invoice' AND x.payment_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM settlement_lines sl
                    WHERE sl.payment_id = x.payment_id
                      AND sl.category IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'settled_after_resolution'))
   AND NOT EXISTS (SELECT 1 FROM reconciliation_exceptions m
                    WHERE m.payment_id = x.payment_id AND m.reason = 'missing_in_settlement' AND m.state = 'resolved')
 ORDER BY x.payment_id

-- name: invoice_clear_part_paid
-- What an expired invoice held of its amount ($2) leaves it: refunded or carried to another invoice.
UPDATE invoices SET amount_paid = amount_paid - $2
 WHERE id = $1 AND status = 'expired' AND amount_paid >= $2
RETURNING id

-- name: exceptions_close_paid_in_full
-- The open expired_part_paid of invoice $1, paid in full since (treasury applied the rest): nothing is left to
-- decide. Skips one being resolved at this moment (its resolution sees the invoice paid and closes it itself).
UPDATE reconciliation_exceptions
   SET state = 'resolved', resolved_at = $2, resolved_by = $3, resolution = 'paid_in_full',
       resolution_note = 'the invoice was paid in full after it expired (' || $3 || ')'
 WHERE id IN (SELECT id FROM reconciliation_exceptions
               WHERE invoice_id = $1 AND reason = 'expired_part_paid' AND state = 'open'
                 FOR UPDATE SKIP LOCKED)
RETURNING id, resolution_note

-- name: exception_part_paid_amount
-- The open expired_part_paid of invoice $1 says what the invoice holds now, less $2 (what write-offs kept:
-- part_paid_kept). Found by the session's own note: money applied, or a provider's refund taken back, while it
-- was open left its amount as when it was opened.
UPDATE reconciliation_exceptions x
   SET amount = greatest(i.amount_paid - $2, 0)
  FROM invoices i
 WHERE i.id = $1 AND x.invoice_id = i.id AND x.reason = 'expired_part_paid' AND x.state = 'open'

-- name: payment_duplicates_owed
-- What resolutions of payment $1's duplicate_in_settlement lines have left owed back in $2 (its refunds-due
-- account): a line in another provider's file, resolved before the payment's missing_in_settlement was written
-- off, found no loss to make good. None of it can have been paid out: a payout waits for the payment to be
-- settled or its missing_in_settlement resolved.
SELECT coalesce(sum(CASE p.side WHEN 'credit' THEN p.amount ELSE -p.amount END), 0)::bigint
  FROM reconciliation_exceptions x
  JOIN ledger_entries e ON e.idempotency_key = 'resolution:' || x.id
  JOIN ledger_postings p ON p.entry_id = e.id
  JOIN ledger_accounts a ON a.id = p.account_id
 WHERE x.payment_id = $1 AND x.reason = 'duplicate_in_settlement' AND a.code = $2
