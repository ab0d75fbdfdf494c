-- What waits, and since when, for the /metrics gauges (paysvc/backlog.py). Ages are measured on the
-- database's clock, as the times were written.

-- name: backlog_outbox
-- Each agency's events not yet published to RabbitMQ: how many (counted up to $1, from the partial index the
-- relay reads), and the age of the next one its relay must publish (the first in seq order).
SELECT a.code,
       (SELECT count(*)
          FROM (SELECT 1 FROM outbox_events o
                 WHERE o.agency_id = a.id AND o.published_at IS NULL
                 LIMIT $1) x) AS waiting,
       extract(epoch FROM clock_timestamp() - (
           SELECT o.occurred_at FROM outbox_events o
            WHERE o.agency_id = a.id AND o.published_at IS NULL
            ORDER BY o.agency_id, o.seq
            LIMIT 1))::float8 AS oldest_seconds
  FROM agencies a

-- name: backlog_inbox
-- Provider callbacks stored but not yet processed (a crash in between, or a provider that did not confirm yet).
SELECT provider, count(*) AS waiting,
       extract(epoch FROM clock_timestamp() - min(received_at))::float8 AS oldest_seconds
  FROM provider_inbox
 WHERE state = 'received'
 GROUP BY provider

-- name: backlog_webhooks
-- Webhook deliveries still to be made (first tries and retries).
SELECT count(*) AS waiting,
       extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS oldest_seconds
  FROM webhook_deliveries
 WHERE status = 'pending'

-- name: backlog_exceptions
-- Reconciliation exceptions treasury has not resolved yet, by reason.
SELECT reason, count(*) AS open,
       extract(epoch FROM clock_timestamp() - min(opened_at))::float8 AS oldest_seconds
  FROM reconciliation_exceptions
 WHERE state = 'open'
 GROUP BY reason
