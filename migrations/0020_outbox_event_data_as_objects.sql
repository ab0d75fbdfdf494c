-- Repair: event data written as a JSON string holding the object, instead of the object.
--
-- Since the capture began writing its events with one statement (an array of jsonb), the connection's
-- JSON codec encoded each already-encoded body a second time, so invoice.paid, journal.posted and
-- reconciliation.exception_opened events from a capture were stored as JSON strings and published to
-- agencies that way. The statements now pass the bodies as text and cast them in SQL. This turns the
-- events still stored as strings back into the objects they hold (every event body is an object, so a
-- string here is always one of these). Events already published cannot be recalled; they keep their
-- sequence numbers and ids, and the events API and any republish now give the object.
UPDATE outbox_events SET data = (data #>> '{}')::jsonb
 WHERE jsonb_typeof(data) = 'string' AND left(data #>> '{}', 1) = '{';
