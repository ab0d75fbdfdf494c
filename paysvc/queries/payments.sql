-- name: capture_target
-- One round trip: the KHQR code the notice names and its invoice, or else the invoice with the notice's bill
-- number, the invoice row locked so captures for one invoice queue (its columns NULL when none is found);
-- `own`: the payment this provider transaction ($3, $4) was captured as, or the payment it was reported for
-- (payment_reports), with the notice it came with and its source; `on_code`: the payments on this code, in
-- their order on it, each with the providers that reported it. Both are read with the statement's snapshot,
-- taken before any wait for the lock: a concurrent capture of the same money that commits while this one waits
-- is not in them, but its row is in the unique indexes (payments on provider + transaction id and on code +
-- number; reports on provider + transaction id and on payment + provider), so what this transaction then
-- writes conflicts, writes nothing, and the capture reads again and finds it.
-- `md5` is NULL when $1 names no code of the invoice found (none, or one we never issued).
WITH target AS (
    SELECT k.md5, k.to_account, k.created_at AS code_created_at, i.id, i.agency_id, a.code AS agency_code,
           a.bakong_account, i.status, i.currency, i.amount, i.amount_paid, i.expires_at,
           i.created_at AS invoice_created_at
      FROM invoices i
      JOIN agencies a ON a.id = i.agency_id
      LEFT JOIN khqr_codes k ON k.md5 = $1 AND k.invoice_id = i.id
     WHERE i.id = coalesce((SELECT invoice_id FROM khqr_codes WHERE md5 = $1),
                           (SELECT id FROM invoices WHERE bill_number = $2))
       FOR UPDATE OF i
)
SELECT t.*,
       coalesce((SELECT jsonb_build_object('id', p.id, 'invoice_id', p.invoice_id, 'agency_id', p.agency_id,
                                           'amount', p.amount, 'currency', p.currency,
                                           'notice', p.evidence -> 'notice', 'source', p.evidence ->> 'source')
                   FROM payments p
                  WHERE p.provider = $3 AND p.provider_transaction_id = $4),
                (SELECT jsonb_build_object('id', p.id, 'invoice_id', p.invoice_id, 'agency_id', p.agency_id,
                                           'amount', p.amount, 'currency', p.currency,
                                           'notice', r.notice, 'source', r.source)
                   FROM payment_reports r JOIN payments p ON p.id = r.payment_id
                  WHERE r.provider = $3 AND r.provider_transaction_id = $4)) AS own,
       coalesce((SELECT jsonb_agg(jsonb_build_object('id', p.id, 'provider', p.provider,
                                                     'seq', coalesce(p.khqr_seq, 1),  -- NULL: 1 (0038)
                                                     'invoice_id', p.invoice_id, 'amount', p.amount,
                                                     'currency', p.currency,
                                                     -- captured from its provider's file under the file's own
                                                     -- reference (see capture.same_money)
                                                     'file_ref', p.source = 'settlement' AND coalesce(
                                                         (p.evidence #>> '{notice,raw,id_is_reference}')::boolean,
                                                         false),
                                                     'reported_by', ARRAY(SELECT r.provider FROM payment_reports r
                                                                           WHERE r.payment_id = p.id))
                                  ORDER BY coalesce(p.khqr_seq, 1))
                   FROM payments p
                  WHERE p.khqr_md5 = $1),
                '[]'::jsonb) AS on_code
  FROM (SELECT) AS one
  LEFT JOIN target t ON true

-- name: payment_insert
-- The payment, its code marked captured (once: a later payment on it leaves the time of the first), and when it
-- pays its invoice ($19), the invoice's new amount and state. $20: its number on the code (NULL without one).
-- No row back when the same money was captured first by a concurrent transaction (a unique index), or reported
-- meanwhile as another channel's payment (a report of this provider transaction, read by this new statement).
WITH pay AS (
    INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, khqr_md5, bill_number,
                          currency, amount, applied_amount, suspense_amount, to_account, from_account, paid_at,
                          captured_at, source, inbox_id, evidence, khqr_seq)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $20
     WHERE NOT EXISTS (SELECT 1 FROM payment_reports r WHERE r.provider = $2 AND r.provider_transaction_id = $3)
    ON CONFLICT DO NOTHING
    RETURNING id, invoice_id, khqr_md5, applied_amount, paid_at, captured_at
), code AS (
    -- The code is paid: the Bakong poller stops asking about it.
    UPDATE khqr_codes k SET captured_at = pay.captured_at FROM pay
     WHERE k.md5 = pay.khqr_md5 AND k.captured_at IS NULL
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

-- name: report_insert
-- A channel's report of money captured under another: kept, with its notice, once per provider transaction
-- and once per payment and provider. No row back when either is taken (a concurrent capture got there first),
-- or when this provider transaction was captured as a payment meanwhile (read by this new statement).
INSERT INTO payment_reports (provider, provider_transaction_id, payment_id, source, inbox_id, notice, reported_at)
SELECT $1, $2, $3, $4, $5, $6, $7
 WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.provider = $1 AND p.provider_transaction_id = $2)
ON CONFLICT DO NOTHING
RETURNING payment_id

-- name: capture_events
-- The capture's outbox events (arrays as outbox.events_args gives them; bodies as text, cast here so no
-- connection codec encodes them twice) and, when $6 is set, its inbox row marked processed: the row is done
-- exactly when its payment is, in the same statement.
WITH ev AS (
    INSERT INTO outbox_events (id, agency_id, type, occurred_at, data)
    SELECT id, agency_id, type, $4, data::jsonb
      FROM unnest($1::uuid[], $2::bigint[], $3::text[], $5::text[]) AS e (id, agency_id, type, data)
)
UPDATE provider_inbox SET state = 'processed', processed_at = $4, reason = NULL
 WHERE $6::bigint IS NOT NULL AND id = $6 AND state = 'received'

-- name: exception_insert
-- Returns the id, or nothing when an exception with this id is open already: an id derived from what it is
-- about (conflicting_notice) opens it once however often that is reported; a random id never conflicts.
INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, invoice_id, agency_id, currency, amount,
                                       business_date, evidence, opened_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: payments_of_invoice
SELECT id, provider, provider_transaction_id, amount, currency, paid_at,
       CASE WHEN suspense_amount = 0 THEN 'captured' ELSE 'exception' END AS status
  FROM payments WHERE invoice_id = $1 ORDER BY paid_at

-- name: payments_booked_otherwise
-- Every payment must have exactly one capture entry (payment.captured or payment.suspense, naming it) whose
-- postings are the payment's: its provider's clearing debited with its amount, its agency's revenue credited
-- with the applied part, suspense with the held part; and every capture entry must name a payment. One row per
-- payment or entry that is not so (`paysvc ledger reconcile`). A capture undone by a reversal (not itself
-- undone) is left out.
WITH RECURSIVE undone (capture_id, reversal_id, depth) AS (
    -- each capture's chain of reversals (a reversal may itself be reversed once, and so on)
    SELECT e.id, r.id, 1
      FROM ledger_entries e JOIN ledger_entries r ON r.reverses = e.id
     WHERE e.kind IN ('payment.captured', 'payment.suspense')
    UNION ALL
    SELECT u.capture_id, r.id, u.depth + 1 FROM undone u JOIN ledger_entries r ON r.reverses = u.reversal_id
), cap AS (
    SELECT e.id, e.payment_id,
           jsonb_agg(jsonb_build_array(a.code, l.side, l.amount) ORDER BY a.code, l.side, l.amount) AS lines
      FROM ledger_entries e
      JOIN ledger_postings l ON l.entry_id = e.id
      JOIN ledger_accounts a ON a.id = l.account_id
     WHERE e.kind IN ('payment.captured', 'payment.suspense')
       -- a capture reversed (a correction) no longer books the payment: its re-posted capture does; one whose
       -- reversal was itself reversed does again (found by two reviews: a reversed capture counted as booked,
       -- and a restored one as missing)
       AND coalesce((SELECT max(u.depth) FROM undone u WHERE u.capture_id = e.id), 0) % 2 = 0
     GROUP BY e.id, e.payment_id
), expected AS (
    SELECT p.id, p.amount, p.currency,
           (SELECT jsonb_agg(x ORDER BY x ->> 0, x ->> 1, (x ->> 2)::bigint)
              FROM (VALUES (jsonb_build_array('provider:' || p.provider || ':clearing:' || p.currency, 'debit', p.amount)),
                           (CASE WHEN p.applied_amount > 0 THEN jsonb_build_array(
                                'agency:' || ag.code || ':revenue:' || p.currency, 'credit', p.applied_amount) END),
                           (CASE WHEN p.suspense_amount > 0 THEN jsonb_build_array(
                                'suspense:unmatched:' || p.currency, 'credit', p.suspense_amount) END)) v (x)
             WHERE x IS NOT NULL) AS lines
      FROM payments p LEFT JOIN agencies ag ON ag.id = p.agency_id
), counted AS (
    SELECT payment_id, count(*) AS n FROM cap GROUP BY payment_id
)
SELECT coalesce(x.id, c.payment_id) AS payment_id, c.id AS entry_id,
       CASE WHEN x.id IS NULL THEN 'the capture entry names no payment'
            WHEN c.id IS NULL THEN 'the payment has no capture entry'
            WHEN n.n > 1 THEN 'the payment has ' || n.n || ' capture entries'
            ELSE 'the entry''s postings ' || c.lines::text || ' are not the payment''s ' || x.lines::text END AS problem
  FROM expected x
  FULL JOIN cap c ON c.payment_id = x.id
  LEFT JOIN counted n ON n.payment_id = x.id
 WHERE x.id IS NULL OR c.id IS NULL OR n.n > 1 OR x.lines <> c.lines
 ORDER BY 1, 2

-- name: entries_without_their_record
-- Every entry that is not a capture stands on a record of the service, and every such record on its entry
-- (`paysvc ledger reconcile`; found by an auditor's walk-through: a forged resolution entry, and an entry whose
-- exception was deleted, passed every check). A resolution entry (exception_resolved) is named by exactly one
-- resolved exception, whose id its idempotency key carries; a settlement entry by its settlement, whose id it
-- carries; an exception's or a settlement's entry exists and is of its kind (a settled_late exception names the
-- settlement's entry that settled it); a reversal undoes a capture (or a reversal), the only entries the service
-- corrects so (found by review: reversing a settlement or a resolution passed); a refund entry is named by its
-- payout, whose id its idempotency key carries, and moves what the payout says; and no entry is of a kind the
-- service does not write. The exceptions and settlements naming entries are counted once, grouped, and joined
-- (found by review: a count per entry read every exception, 105 s at 100,000 entries). One row per problem.
WITH resolutions AS (
    SELECT resolution_entry_id AS entry_id, count(*) AS n,
           count(*) FILTER (WHERE state = 'resolved') AS resolved, min(id) AS exception_id
      FROM reconciliation_exceptions
     WHERE resolution_entry_id IS NOT NULL
     GROUP BY resolution_entry_id
), settled AS (
    SELECT journal_entry_id AS entry_id, count(*) AS n, min(id) AS settlement_id
      FROM settlements WHERE journal_entry_id IS NOT NULL GROUP BY journal_entry_id
), paid_out AS (
    SELECT entry_id, min(id) AS payout_id FROM refund_payouts GROUP BY entry_id
)
SELECT e.id AS entry_id, NULL::text AS record,
       CASE WHEN e.kind NOT IN ('payment.captured', 'payment.suspense', 'settlement', 'exception_resolved',
                                'reversal', 'refund_paid')
                THEN 'an entry of kind ' || e.kind || ', which the service never writes'
            WHEN e.kind = 'reversal'
                THEN 'a reversal of entry ' || e.reverses || ' (' || coalesce(r.kind, 'missing')
                     || '): the service corrects only captures so'
            WHEN e.kind = 'exception_resolved'
                THEN 'the resolution entry is named by ' || coalesce(x.n, 0) || ' exceptions ('
                     || coalesce(x.resolved, 0) || ' resolved), not one resolved exception whose id its '
                     || 'idempotency key carries'
            WHEN e.kind = 'refund_paid'
                THEN 'the refund entry is named by no refund payout whose id its idempotency key carries'
            ELSE 'the settlement entry is named by ' || coalesce(t.n, 0) || ' settlements, not the one whose id it '
                 || 'carries'
       END AS problem
  FROM ledger_entries e
  LEFT JOIN ledger_entries r ON r.id = e.reverses
  LEFT JOIN resolutions x ON x.entry_id = e.id::text
  LEFT JOIN settled t ON t.entry_id = e.id
  LEFT JOIN paid_out o ON o.entry_id = e.id
 WHERE e.kind NOT IN ('payment.captured', 'payment.suspense')
   AND (e.kind NOT IN ('settlement', 'exception_resolved', 'reversal', 'refund_paid')
        OR (e.kind = 'reversal' AND coalesce(r.kind, '') NOT IN ('payment.captured', 'payment.suspense', 'reversal'))
        -- coalesce: with nothing naming the entry the comparison is null, which NOT would leave out as no problem
        OR (e.kind = 'exception_resolved'
            AND NOT coalesce(x.n = 1 AND x.resolved = 1 AND e.idempotency_key = 'resolution:' || x.exception_id, false))
        OR (e.kind = 'settlement' AND NOT coalesce(t.n = 1 AND e.settlement_id = t.settlement_id, false))
        OR (e.kind = 'refund_paid' AND NOT coalesce(e.idempotency_key = 'refund-payout:' || o.payout_id, false)))
UNION ALL
SELECT e.id, 'exception ' || x.id,
       CASE WHEN e.id IS NULL THEN 'the exception''s resolution entry ' || x.resolution_entry_id || ' does not exist'
            ELSE 'the exception''s resolution entry is of kind ' || e.kind END
  FROM reconciliation_exceptions x
  LEFT JOIN ledger_entries e ON e.id = CASE WHEN x.resolution_entry_id ~ '^[0-9]{1,18}$'
                                            THEN x.resolution_entry_id::bigint END
 WHERE x.resolution_entry_id IS NOT NULL
   AND (e.id IS NULL OR e.kind NOT IN ('exception_resolved', 'settlement'))
UNION ALL
SELECT e.id, 'settlement ' || s.id,
       CASE WHEN e.id IS NULL THEN 'the settlement''s entry ' || s.journal_entry_id || ' does not exist'
            ELSE 'the settlement''s entry is of kind ' || e.kind END
  FROM settlements s
  LEFT JOIN ledger_entries e ON e.id = s.journal_entry_id
 WHERE s.journal_entry_id IS NOT NULL AND (e.id IS NULL OR e.kind <> 'settlement')
UNION ALL
-- A refund payout's entry moves what the payout says, from refunds-due to the bank account it left from, and
-- names the payout's payment, which is its exception's (found by review: a payout moved to another case passed,
-- and the case it left could then be paid again).
SELECT r.entry_id, 'refund payout ' || r.id,
       CASE WHEN e.id IS NULL THEN 'the payout''s entry ' || r.entry_id || ' does not exist'
            WHEN e.kind <> 'refund_paid' THEN 'the payout''s entry is of kind ' || e.kind
            WHEN x.id IS NULL THEN 'the payout''s exception ' || r.exception_id || ' does not exist'
            WHEN r.payment_id IS DISTINCT FROM x.payment_id
                THEN 'the payout names payment ' || coalesce(r.payment_id, 'none') || ', its exception '
                     || x.id || ' payment ' || coalesce(x.payment_id, 'none')
            WHEN e.payment_id IS DISTINCT FROM r.payment_id
                THEN 'the payout''s entry names payment ' || coalesce(e.payment_id, 'none') || ', the payout '
                     || coalesce(r.payment_id, 'none')
            ELSE 'the payout''s entry does not move ' || r.amount || ' ' || r.currency
                 || ' from suspense:refunds-due to treasury:bank:' || r.bank_account END
  FROM refund_payouts r
  LEFT JOIN ledger_entries e ON e.id = r.entry_id
  LEFT JOIN reconciliation_exceptions x ON x.id = r.exception_id
 WHERE e.id IS NULL OR e.kind <> 'refund_paid' OR x.id IS NULL OR r.payment_id IS DISTINCT FROM x.payment_id
    OR e.payment_id IS DISTINCT FROM r.payment_id
    OR (SELECT array_agg(a.code || ' ' || p.side || ' ' || p.amount ORDER BY p.side DESC, a.code)
          FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id WHERE p.entry_id = r.entry_id)
       IS DISTINCT FROM ARRAY['suspense:refunds-due:' || r.currency || ' debit ' || r.amount,
                              'treasury:bank:' || r.bank_account || ':' || r.currency || ' credit ' || r.amount]
UNION ALL
-- No case is paid out more than its resolutions owed it (the refund_cases view: what was put in and taken from
-- refunds-due is summed once over that account's postings; found by review, a sum per case read the whole ledger
-- once per case, minutes at a million entries).
SELECT NULL, 'refund case ' || case_id, 'paid out ' || paid || ' ' || currency || ', more than the ' || due
       || ' owed back'
  FROM refund_cases
 WHERE paid > due
 ORDER BY 1 NULLS FIRST, 2
