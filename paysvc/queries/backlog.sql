-- What waits, and since when, for the /metrics gauges (paysvc/backlog.py, which turns the times into ages on
-- the service's clock, the one that wrote them).

-- name: backlog_outbox
-- Each agency's events not yet published to RabbitMQ: how many (counted up to $1, from the partial index the
-- relay reads), and when the next one its relay must publish (the first in seq order) occurred.
SELECT a.code,
       (SELECT count(*)
          FROM (SELECT 1 FROM outbox_events o
                 WHERE o.agency_id = a.id AND o.published_at IS NULL
                 LIMIT $1) x) AS waiting,
       (SELECT o.occurred_at FROM outbox_events o
         WHERE o.agency_id = a.id AND o.published_at IS NULL
         ORDER BY o.agency_id, o.seq
         LIMIT 1) AS since
  FROM agencies a

-- name: backlog_inbox
-- Provider callbacks stored but not yet processed (a crash in between, or a provider that did not confirm yet).
SELECT provider, count(*) AS waiting, min(received_at) AS since
  FROM provider_inbox
 WHERE state = 'received'
 GROUP BY provider

-- name: backlog_webhooks
-- Webhook deliveries still to be made, and the earliest time one of them was due (a retry scheduled for
-- later is not late).
SELECT count(*) AS waiting, min(next_attempt_at) AS since
  FROM webhook_deliveries
 WHERE status = 'pending'

-- name: backlog_exceptions
-- Reconciliation exceptions treasury has not resolved yet, by reason.
SELECT reason, count(*) AS waiting, min(opened_at) AS since
  FROM reconciliation_exceptions
 WHERE state = 'open'
 GROUP BY reason
