-- name: inbox_insert
-- No row back when $8 (a replay key) is already in the inbox: the same signed message was received before.
-- An insert that meets a concurrent copy waits for it to commit, so of identical copies exactly one is stored.
INSERT INTO provider_inbox (provider, received_at, headers, body, state, reason, next_attempt_at, replay_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (provider, replay_key) WHERE replay_key IS NOT NULL DO NOTHING
RETURNING id

-- name: inbox_replayed
SELECT id FROM provider_inbox WHERE provider = $1 AND replay_key = $2

-- name: inbox_get
SELECT id, provider, received_at, headers, body, state, attempts, reason FROM provider_inbox WHERE id = $1

-- name: inbox_reject
UPDATE provider_inbox SET state = 'rejected', reason = $2 WHERE id = $1 AND state = 'received'

-- name: inbox_processed
UPDATE provider_inbox SET state = 'processed', processed_at = $2, reason = NULL WHERE id = $1 AND state = 'received'

-- name: inbox_defer
UPDATE provider_inbox SET next_attempt_at = $2, reason = $3 WHERE id = $1 AND state = 'received'

-- name: inbox_claim
-- The lease grows with each attempt (to an hour at most): a row that keeps failing is retried ever more
-- slowly but never dropped; its attempts and reason show it to operators.
UPDATE provider_inbox SET attempts = attempts + 1,
       next_attempt_at = $2 + least($3::interval * (2 ^ least(attempts, 6))::int, interval '1 hour')
 WHERE id IN (SELECT id FROM provider_inbox
               WHERE state = 'received' AND next_attempt_at <= $2
               ORDER BY id LIMIT $1
                 FOR UPDATE SKIP LOCKED)
RETURNING id

-- name: inbox_bill_is_ours
-- An open invoice of ours has this bill number (one that could be paid now).
SELECT EXISTS (SELECT 1 FROM invoices WHERE bill_number = $1 AND status = 'open')

-- name: inbox_prune_rejected
-- Rejected rows older than $1, at most $2 at a time; none that anything references.
DELETE FROM provider_inbox i
 WHERE i.id IN (SELECT r.id FROM provider_inbox r
                 WHERE r.state = 'rejected' AND r.received_at < $1
                   AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.inbox_id = r.id)
                   AND NOT EXISTS (SELECT 1 FROM payment_reports pr WHERE pr.inbox_id = r.id)
                 ORDER BY r.received_at
                 LIMIT $2)
