-- The overdue check (missing_in_settlement) read every payment of its provider each time it ran, at every
-- import and once a business day, settled ones included: 1.4-2.3 s per million payments on the 2-core
-- machine, under the provider's settlement lock, and growing with the provider's history.
--
-- A payment needs checking only until it is settled by a line or raised, and both are for good (payments and
-- settlement lines are never rewritten, and a payment is raised once). So each provider keeps a mark of its
-- last check: every payment of that provider whose time (its payment time, or its capture time when that is
-- earlier) is at or before checked_until, and which was recorded before checked_at less an hour, is settled or
-- raised. The next check reads only payments paid after checked_until or recorded since checked_at less an
-- hour, and moves the mark forward. recorded_at is the database's clock at the start of the transaction that
-- recorded the payment (captured_at is the capturing instance's clock, and a caller's to choose); the hour
-- covers a recording transaction still open when a check began. Rows already in the table read the time of
-- this migration, so the first check after it reads them all, as before. A BRIN index finds the recent ones
-- (payments are appended in recording order).
ALTER TABLE payments ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX payments_by_recorded_at ON payments USING brin (recorded_at);

CREATE TABLE settlement_overdue_marks (
    provider       text PRIMARY KEY,
    checked_until  timestamptz NOT NULL,
    checked_at     timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON settlement_overdue_marks TO paysvc_app;
