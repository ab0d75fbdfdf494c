-- Per-agency sequence numbers are given to events after they commit, by a sequencer, instead of inside
-- the writing transaction. Numbering inside it meant every invoice and payment of an agency queued on
-- that agency's counter row until commit (measured: ~500 invoices/s for one agency on 2 cores).

ALTER TABLE outbox_events ALTER COLUMN seq DROP NOT NULL;
-- The order events were written in; the sequencer numbers an agency's committed events by it.
ALTER TABLE outbox_events ADD COLUMN pos bigint GENERATED ALWAYS AS IDENTITY;
CREATE INDEX outbox_unsequenced ON outbox_events (agency_id, pos) WHERE seq IS NULL;

-- Every agency has its counter row from the start, so the sequencer can lock it.
INSERT INTO agency_event_seq (agency_id) SELECT id FROM agencies ON CONFLICT DO NOTHING;
