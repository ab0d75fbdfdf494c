-- name: outbox_add_event
WITH next AS (
    INSERT INTO agency_event_seq AS s (agency_id, last_seq) VALUES ($2, 1)
    ON CONFLICT (agency_id) DO UPDATE SET last_seq = s.last_seq + 1
    RETURNING last_seq
)
INSERT INTO outbox_events (id, agency_id, seq, type, occurred_at, data)
SELECT $1, $2, next.last_seq, $3, $4, $5 FROM next
