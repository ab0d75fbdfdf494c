-- name: relay_claim_agencies
-- Agencies with unpublished events, in random order (so several relays spread over them), each taken only if
-- no other relay holds it: the transaction-scoped advisory lock is this relay's claim until it commits.
-- Namespace 1919249529 ("rely") keeps these locks apart from every other advisory lock. $1 = how many;
-- $2 = agencies this relay is leaving alone for now (their events came back unrouted: retried later).
SELECT c.agency_id
  FROM (SELECT s.agency_id
          FROM agency_event_seq s
         WHERE EXISTS (SELECT 1 FROM outbox_events o WHERE o.agency_id = s.agency_id AND o.published_at IS NULL)
           AND NOT (s.agency_id = ANY ($2::bigint[]))
         ORDER BY random()) c
 WHERE pg_try_advisory_xact_lock(1919249529, c.agency_id::integer)
 LIMIT $1

-- name: relay_unpublished
-- The claimed agencies' unpublished events in seq order, at most $2 per agency. Run after the claim, in a
-- statement of its own: its snapshot then sees whatever the previous holder of the lock committed.
SELECT o.id, o.agency_id, a.code AS agency, o.seq, o.type, o.schema_version, o.occurred_at, o.data
  FROM unnest($1::bigint[]) AS c(agency_id)
  JOIN agencies a ON a.id = c.agency_id
 CROSS JOIN LATERAL (
        SELECT * FROM outbox_events o
         WHERE o.agency_id = c.agency_id AND o.published_at IS NULL AND o.seq IS NOT NULL
         ORDER BY o.seq
         LIMIT $2) o
 ORDER BY o.agency_id, o.seq

-- name: relay_mark_published
UPDATE outbox_events SET published_at = now() WHERE id = ANY($1::uuid[]) AND published_at IS NULL

-- name: relay_backlog
SELECT count(*) FROM outbox_events WHERE published_at IS NULL

-- name: events_prune
-- Events published before $1 (now - retention), a slice at a time: retention counts from publication, so
-- an event that waited long in the outbox is still kept the full retention once published. Unpublished
-- events (published_at NULL) are never pruned. Served by outbox_events_published (migration 0029).
DELETE FROM outbox_events
 WHERE id IN (SELECT id FROM outbox_events
               WHERE published_at < $1
               LIMIT $2)

-- name: events_agency_by_code
SELECT id, code FROM agencies WHERE code = $1

-- name: events_feed
-- One agency's events after a seq, published or not, in seq order.
SELECT o.id, o.agency_id, a.code AS agency, o.seq, o.type, o.schema_version, o.occurred_at, o.data
  FROM outbox_events o
  JOIN agencies a ON a.id = o.agency_id
 WHERE o.agency_id = $1 AND o.seq > $2
 ORDER BY o.seq
 LIMIT $3

-- name: events_head
-- The newest seq an agency's feed has given (0 before its first event).
SELECT last_seq FROM agency_event_seq WHERE agency_id = $1

-- name: events_exceptions_opened_from_staging
-- One reconciliation.exception_opened event per exception the settlement import just opened from its staging
-- table (exceptions_from_staging: amount_mismatch, duplicate_in_settlement, settled_after_resolution) whose
-- payment has an agency, in one statement in the import's transaction, in line order; data as capture writes
-- it. $1 now.
INSERT INTO outbox_events (id, agency_id, type, occurred_at, data)
SELECT gen_random_uuid(), e.agency_id, 'reconciliation.exception_opened', $1,
       jsonb_build_object('exception_id', e.id, 'reason', e.reason, 'payment_id', e.payment_id,
                          'invoice_id', e.invoice_id, 'currency', e.currency, 'amount', e.amount)
  FROM settlement_staging s
  JOIN reconciliation_exceptions e ON e.id = s.exception_id
 WHERE s.category IN ('amount_mismatch', 'duplicate_in_settlement', 'settled_after_resolution')
   AND e.agency_id IS NOT NULL
 ORDER BY s.line_no

-- name: events_exceptions_opened
-- One reconciliation.exception_opened event per exception in $1 (ids just opened, e.g. missing_in_settlement
-- by raise_overdue) that has an agency, in one statement in the caller's transaction; data as capture
-- writes it. $2 now.
INSERT INTO outbox_events (id, agency_id, type, occurred_at, data)
SELECT gen_random_uuid(), e.agency_id, 'reconciliation.exception_opened', $2,
       jsonb_build_object('exception_id', e.id, 'reason', e.reason, 'payment_id', e.payment_id,
                          'invoice_id', e.invoice_id, 'currency', e.currency, 'amount', e.amount)
  FROM reconciliation_exceptions e
 WHERE e.id = ANY($1::text[]) AND e.agency_id IS NOT NULL
 ORDER BY e.opened_at, e.id
