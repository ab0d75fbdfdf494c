-- Retention counts from publication: the prune job deletes events published before now - retention
-- (it used occurred_at, so an event that waited weeks in the outbox was pruned just after it was published).
-- This index serves that delete; unpublished events are left out of it, they are never pruned. The index on
-- occurred_at existed only for the prune job (0004) and goes.
CREATE INDEX outbox_events_published ON outbox_events (published_at) WHERE published_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_events_occurred;
