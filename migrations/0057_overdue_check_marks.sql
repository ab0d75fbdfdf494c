-- The overdue check (missing_in_settlement) read every payment of its provider each time it ran, at every
-- import and once a business day, settled ones included: 1.4-2.3 s per million payments on the 2-core
-- machine, under the provider's settlement lock, and growing with the provider's history.
--
-- A payment needs checking only until it is settled by a line or raised, and both are for good (payments and
-- settlement lines are never rewritten, and a payment is raised once). So each provider keeps a mark of its
-- last check: every payment of that provider whose time (its payment time, or its capture time when that is
-- earlier) is at or before checked_until, and whose recording transaction's id is below checked_xmin, is
-- settled or raised. checked_xmin is the oldest transaction still running when that check read the payments
-- (pg_snapshot_xmin of a snapshot taken before its read): a payment the check could not see was recorded by a
-- transaction at or above it, however long that transaction stayed open. The next check reads only payments
-- paid after checked_until or recorded at or above checked_xmin, and moves the mark.
--
-- recorded_xid is the recording transaction's id (pg_current_xact_id(), 64-bit, never wraps). Rows already in
-- the table have none (NULL: recorded before this migration); the first check of each provider after it has no
-- mark and reads every payment, as before. The column is added without a default first, so the table is not
-- rewritten; the index holds only rows that have one.
ALTER TABLE payments ADD COLUMN recorded_xid xid8;
ALTER TABLE payments ALTER COLUMN recorded_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX payments_by_recorded_xid ON payments (recorded_xid) WHERE recorded_xid IS NOT NULL;

CREATE TABLE settlement_overdue_marks (
    provider       text PRIMARY KEY,
    checked_until  timestamptz NOT NULL,
    checked_xmin   xid8 NOT NULL,
    checked_at     timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON settlement_overdue_marks TO paysvc_app;
