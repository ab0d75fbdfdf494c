-- name: webhooks_create
-- A new endpoint starts after the agency's latest committed event: it gets what happens from now on.
INSERT INTO webhook_endpoints (id, agency_id, url, event_types, description, secret_key_id, secret_blob, fanout_seq,
                               created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7,
        coalesce((SELECT last_seq FROM agency_event_seq WHERE agency_id = $2), 0), $8)
RETURNING id, url, event_types, description, created_at

-- name: webhooks_list
SELECT id, url, event_types, description, created_at
  FROM webhook_endpoints
 WHERE agency_id = $1 AND deleted_at IS NULL
 ORDER BY created_at, id

-- name: webhooks_get
SELECT id, url, event_types, description, created_at
  FROM webhook_endpoints
 WHERE id = $1 AND agency_id = $2 AND deleted_at IS NULL

-- name: webhooks_delete
-- The endpoint stops receiving; its waiting deliveries are cancelled. History stays readable to the worker
-- that may still be sending one (its result is then not recorded).
WITH e AS (
    UPDATE webhook_endpoints SET deleted_at = $3
     WHERE id = $1 AND agency_id = $2 AND deleted_at IS NULL
    RETURNING id
), d AS (
    UPDATE webhook_deliveries SET status = 'cancelled', lease_until = NULL
     WHERE endpoint_id IN (SELECT id FROM e) AND status = 'pending'
    RETURNING 1
)
SELECT (SELECT count(*) FROM e) AS deleted, (SELECT count(*) FROM d) AS cancelled

-- name: webhooks_fanout
-- Deliveries for events after each endpoint's cursor, the cursor then moved past them (whatever their type).
-- Each endpoint row is locked (SKIP LOCKED), so several workers never fan out the same events twice; the
-- UNIQUE (endpoint_id, event_id) makes it harmless anyway. An agency's seqs are given after commit by the
-- sequencer, gap-free and committed with the counter, so nothing below the cursor can appear later.
-- $1 now, $2 events per endpoint per step, $3 attempts a delivery gets
WITH ep AS (
    SELECT e.id, e.agency_id, e.event_types, e.fanout_seq
      FROM webhook_endpoints e
     WHERE e.deleted_at IS NULL
       AND e.fanout_seq < (SELECT s.last_seq FROM agency_event_seq s WHERE s.agency_id = e.agency_id)
       FOR UPDATE SKIP LOCKED
), ev AS (
    SELECT ep.id AS endpoint_id, ep.event_types, o.id AS event_id, o.seq, o.type
      FROM ep
     CROSS JOIN LATERAL (SELECT o.id, o.seq, o.type FROM outbox_events o
                          WHERE o.agency_id = ep.agency_id AND o.seq > ep.fanout_seq
                          ORDER BY o.seq LIMIT $2) o
), ins AS (
    INSERT INTO webhook_deliveries (id, endpoint_id, event_id, seq, max_attempts, next_attempt_at, created_at)
    SELECT gen_random_uuid(), endpoint_id, event_id, seq, $3, $1, $1 FROM ev WHERE type = ANY (event_types)
    ON CONFLICT (endpoint_id, event_id) DO NOTHING
    RETURNING 1
), adv AS (
    UPDATE webhook_endpoints e SET fanout_seq = m.upto
      FROM (SELECT endpoint_id, max(seq) AS upto FROM ev GROUP BY endpoint_id) m
     WHERE e.id = m.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS created, (SELECT count(*) FROM adv) AS endpoints

-- name: webhooks_claim
-- Due deliveries, at most $3 in flight per endpoint (counting those other workers hold), leased until $4.
-- $1 now, $2 how many
WITH busy AS (
    SELECT endpoint_id, count(*) AS n FROM webhook_deliveries
     WHERE status = 'pending' AND lease_until > $1
     GROUP BY endpoint_id
), due AS (
    SELECT d.id, d.endpoint_id,
           row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.seq) AS rn
      FROM webhook_deliveries d
     WHERE d.status = 'pending' AND d.next_attempt_at <= $1 AND (d.lease_until IS NULL OR d.lease_until <= $1)
), pick AS (
    SELECT due.id FROM due LEFT JOIN busy USING (endpoint_id)
     WHERE due.rn + coalesce(busy.n, 0) <= $3
     ORDER BY due.rn
     LIMIT $2
), locked AS (
    SELECT d.id FROM webhook_deliveries d
     WHERE d.id IN (SELECT id FROM pick)
       AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until <= $1)
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d SET lease_until = $4
      FROM locked WHERE d.id = locked.id
    RETURNING d.id, d.endpoint_id, d.event_id, d.attempts, d.replay_requested
)
SELECT c.id AS delivery_id, c.endpoint_id, c.attempts, c.replay_requested,
       e.url, e.secret_key_id, e.secret_blob,
       o.id, a.code AS agency, o.seq, o.type, o.schema_version, o.occurred_at, o.data
  FROM claimed c
  JOIN webhook_endpoints e ON e.id = c.endpoint_id
  JOIN outbox_events o ON o.id = c.event_id
  JOIN agencies a ON a.id = o.agency_id

-- name: webhooks_record_attempt
-- $1 delivery, $2 attempted at, $3 HTTP status or null, $4 latency ms, $5 error or null, $6 succeeded,
-- $7 next attempt (if it failed and attempts remain), $8 manual (after a replay by hand)
WITH d AS (
    UPDATE webhook_deliveries SET
        attempts = attempts + 1,
        status = CASE WHEN $6 THEN 'delivered' WHEN attempts + 1 >= max_attempts THEN 'failed' ELSE 'pending' END,
        delivered_at = CASE WHEN $6 THEN $2 ELSE delivered_at END,
        next_attempt_at = CASE WHEN $6 OR attempts + 1 >= max_attempts THEN next_attempt_at ELSE $7 END,
        lease_until = NULL, last_status_code = $3, last_error = $5, replay_requested = false
     WHERE id = $1 AND status = 'pending'
    RETURNING id, status, attempts, next_attempt_at
), a AS (
    INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error, manual)
    SELECT id, $2, $3, $4, $5, $8 FROM d
)
SELECT status, attempts, next_attempt_at FROM d

-- name: webhooks_deliveries
-- An endpoint's deliveries, newest event first, each with its attempts. $3 = before this seq (paging).
SELECT d.id, d.event_id, o.type AS event_type, d.seq, d.status, d.attempts, d.max_attempts,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       d.created_at, d.delivered_at, d.last_status_code, d.last_error,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'attempted_at', t.attempted_at, 'status_code', t.status_code, 'latency_ms', t.latency_ms,
                    'error', t.error, 'manual', t.manual) ORDER BY t.id)
                   FROM webhook_attempts t WHERE t.delivery_id = d.id), '[]'::jsonb) AS attempt_log
  FROM webhook_deliveries d
  JOIN outbox_events o ON o.id = d.event_id
 WHERE d.endpoint_id = $1 AND ($3::bigint IS NULL OR d.seq < $3)
 ORDER BY d.seq DESC
 LIMIT $2

-- name: webhooks_replay
-- Send again now: one more attempt (even after 'failed' or 'delivered'); recorded as manual. For a delivery still
-- being retried it is on top of the automatic ones, never one of them (found by a portal developer's walk-through:
-- a replay while retries were due used one of the eight up); a replay asked for again before it is sent adds
-- nothing (found by review: a double click granted an automatic attempt more). A failed delivery replayed gets
-- that one attempt; a delivered one keeps its budget, so a replay of it that fails is retried on the schedule.
UPDATE webhook_deliveries
   SET status = 'pending', next_attempt_at = $3, lease_until = NULL, replay_requested = true,
       max_attempts = CASE WHEN replay_requested THEN max_attempts
                           WHEN status = 'pending' THEN max_attempts + 1
                           ELSE greatest(max_attempts, attempts + 1) END
 WHERE id = $1 AND endpoint_id = $2 AND status <> 'cancelled'
RETURNING id
