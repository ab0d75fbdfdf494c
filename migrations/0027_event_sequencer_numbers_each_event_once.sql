-- The event sequencer numbers each event once, without gaps, however many sequencers run (see docs/events.md).
--
-- Found by review: numbering was one statement that locked the agency's counter (FOR UPDATE SKIP LOCKED) and
-- read the events still unnumbered with the snapshot the statement started with. When another sequencer
-- committed between that snapshot and the lock, the lock returned the counter as that sequencer left it,
-- but the events it had just numbered still looked unnumbered: they were numbered again, higher, and the
-- numbers they first held were never used. One service instance was enough (the background sequencer, the
-- relay, webhook fan-out and every GET /v1/events call it): 34 numbers missing in three runs of 480 events.
--
-- Now the counters are locked first, and the events numbered by a later statement: in READ COMMITTED each
-- statement of a (volatile) function takes a new snapshot, which sees whatever the previous holder of those
-- counters committed. The statement that numbers also only touches events still without a number.
CREATE FUNCTION outbox_sequence(agencies bigint[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    held bigint[];
    numbered bigint;
BEGIN
    -- Agencies with unnumbered events whose counter no other sequencer holds (one that does is numbering them).
    SELECT array_agg(c.agency_id) INTO held
      FROM (SELECT s.agency_id FROM agency_event_seq s
             WHERE s.agency_id IN (SELECT DISTINCT agency_id FROM outbox_events
                                    WHERE seq IS NULL AND (agencies IS NULL OR agency_id = ANY (agencies)))
             ORDER BY s.agency_id
               FOR UPDATE SKIP LOCKED) c;
    IF held IS NULL THEN
        RETURN 0;
    END IF;
    WITH todo AS (
        SELECT o.id, s.last_seq + row_number() OVER (PARTITION BY o.agency_id ORDER BY o.pos) AS seq
          FROM outbox_events o JOIN agency_event_seq s USING (agency_id)
         WHERE o.seq IS NULL AND o.agency_id = ANY (held)
    ), given AS (
        UPDATE outbox_events o SET seq = t.seq FROM todo t WHERE o.id = t.id AND o.seq IS NULL
        RETURNING o.agency_id, o.seq
    ), counters AS (
        UPDATE agency_event_seq s SET last_seq = m.top
          FROM (SELECT agency_id, max(seq) AS top, count(*) AS n FROM given GROUP BY agency_id) m
         WHERE s.agency_id = m.agency_id
        RETURNING m.n
    )
    SELECT coalesce(sum(n), 0) INTO numbered FROM counters;
    RETURN numbered;
END $$;
