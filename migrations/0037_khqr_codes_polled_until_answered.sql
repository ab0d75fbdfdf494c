-- The poller asks about a code until Bakong has answered about it once its grace period was over, not just
-- until the grace period is over by the clock. Found by review: a Bakong outage, or a token it refused,
-- longer than PAYSVC_BAKONG_GRACE_MINUTES left every code that expired meanwhile unasked for good, so a
-- payment made on one came only with the next day's settlement file (booked to suspense, the invoice
-- expired and the citizen possibly paying again).
--
-- poll_pending: still to be asked about. A poll answer read at time T clears it for the codes it covered that
-- expired at or before T - grace; a capture takes the code out of the poll anyway (captured_at). The poll
-- gives up on a code that expired longer ago than PAYSVC_BAKONG_GIVE_UP_HOURS (the settlement has it by then).
--
-- Existing rows take false without a table rewrite (the column's default is false when it is added); every
-- code not captured that expired less than the default give-up time (72 hours) ago is set pending, whatever
-- grace this instance had and however long an outage going on now has lasted (found by review: setting only
-- those within the default grace dropped codes still being polled under a longer one); new codes are pending
-- from the start. Each of those is asked about once more after the migration (50 a call).
--
-- Run it at a quiet hour: it holds khqr_codes (invoices cannot be created, nor codes read or captured)
-- while it sets those rows and builds the index, a few seconds per million codes.
ALTER TABLE khqr_codes ADD COLUMN poll_pending boolean NOT NULL DEFAULT false;
ALTER TABLE khqr_codes ALTER COLUMN poll_pending SET DEFAULT true;
UPDATE khqr_codes SET poll_pending = true WHERE captured_at IS NULL AND expires_at > now() - interval '72 hours';
CREATE INDEX khqr_codes_poll_pending ON khqr_codes (expires_at) WHERE poll_pending AND captured_at IS NULL;
DROP INDEX khqr_codes_to_poll;
