-- name: outbox_add_event
-- No sequence number here: the sequencer gives it after commit, so writers never queue on a counter.
INSERT INTO outbox_events (id, agency_id, type, occurred_at, data) VALUES ($1, $2, $3, $4, $5)

-- name: outbox_sequence
-- Number the committed events that have none yet, per agency, in the order they were written (pos),
-- continuing from the agency's counter. An agency whose counter another sequencer holds is skipped
-- (SKIP LOCKED): it is being numbered. $1: only these agencies (NULL: all).
WITH cand AS (
    SELECT DISTINCT agency_id FROM outbox_events
     WHERE seq IS NULL AND ($1::bigint[] IS NULL OR agency_id = ANY ($1::bigint[]))
), locked AS (
    SELECT s.agency_id, s.last_seq FROM agency_event_seq s
     WHERE s.agency_id IN (SELECT agency_id FROM cand)
     ORDER BY s.agency_id
       FOR UPDATE SKIP LOCKED
), todo AS (
    SELECT o.id, o.agency_id, l.last_seq + row_number() OVER (PARTITION BY o.agency_id ORDER BY o.pos) AS seq
      FROM outbox_events o JOIN locked l USING (agency_id)
     WHERE o.seq IS NULL
), numbered AS (
    UPDATE outbox_events o SET seq = t.seq FROM todo t WHERE o.id = t.id
    RETURNING o.agency_id, o.seq
)
UPDATE agency_event_seq s SET last_seq = m.top
  FROM (SELECT agency_id, max(seq) AS top, count(*) AS n FROM numbered GROUP BY agency_id) m
 WHERE s.agency_id = m.agency_id
RETURNING m.n

-- name: agency_event_seq_init
INSERT INTO agency_event_seq (agency_id) VALUES ($1) ON CONFLICT DO NOTHING
