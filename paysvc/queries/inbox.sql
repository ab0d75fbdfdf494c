-- name: inbox_insert
INSERT INTO provider_inbox (provider, received_at, headers, body, state, reason, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id

-- name: inbox_get
SELECT id, provider, received_at, headers, body, state, attempts FROM provider_inbox WHERE id = $1

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
