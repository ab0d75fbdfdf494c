-- name: outbox_add_event
-- No sequence number here: the sequencer gives it after commit, so writers never queue on a counter.
INSERT INTO outbox_events (id, agency_id, type, occurred_at, data) VALUES ($1, $2, $3, $4, $5)

-- name: outbox_sequence
-- Number the committed events that have none yet, per agency, in the order they were written (pos),
-- continuing from the agency's counter; an agency whose counter another sequencer holds is skipped (it is
-- being numbered). $1: only these agencies (NULL: all). See migration 0027 for why it is a function.
SELECT outbox_sequence($1::bigint[]) AS n

-- name: agency_event_seq_init
INSERT INTO agency_event_seq (agency_id) VALUES ($1) ON CONFLICT DO NOTHING

-- name: outbox_events_without_agency
-- Events the sequencer never numbers: their agency has no counter (served by outbox_unsequenced).
SELECT count(*) AS n, min(o.occurred_at) AS oldest,
       coalesce(array_agg(DISTINCT o.agency_id), '{}') AS agency_ids
  FROM outbox_events o
 WHERE o.seq IS NULL AND NOT EXISTS (SELECT 1 FROM agency_event_seq s WHERE s.agency_id = o.agency_id)
