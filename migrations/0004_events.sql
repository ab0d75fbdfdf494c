-- Events to agencies: outbox retention, webhook endpoints, deliveries and every delivery attempt.
-- (Event signing keys are not stored here: private keys come from PAYSVC_EVENT_SIGNING_KEYS, so the
-- database never holds them and /v1/keys/events serves only what the configuration lists.)

-- The prune job deletes published events older than the retention by occurred_at.
CREATE INDEX outbox_events_occurred ON outbox_events (occurred_at);

-- A portal's HTTPS endpoint. The signing secret is stored encrypted (AES-GCM, the payer-data keys,
-- bound to the endpoint id); it is shown once, when the endpoint is registered.
CREATE TABLE webhook_endpoints (
    id             uuid PRIMARY KEY,
    agency_id      bigint NOT NULL REFERENCES agencies(id),
    url            text NOT NULL CHECK (url ~ '^https?://'),
    event_types    text[] NOT NULL CHECK (cardinality(event_types) > 0),
    description    text NOT NULL DEFAULT '',
    secret_key_id  text NOT NULL,
    secret_blob    bytea NOT NULL,
    -- The agency's event seq up to which deliveries have been created (the fan-out cursor).
    fanout_seq     bigint NOT NULL CHECK (fanout_seq >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);
CREATE INDEX webhook_endpoints_agency ON webhook_endpoints (agency_id) WHERE deleted_at IS NULL;

-- One event to one endpoint. Created by the fan-out step, sent by the worker.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints(id),
    event_id         uuid NOT NULL REFERENCES outbox_events(id) ON DELETE CASCADE,
    seq              bigint NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    next_attempt_at  timestamptz NOT NULL,
    -- While set and in the future, a worker is sending it; after it (a crashed worker), another takes it.
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    last_status_code integer,
    last_error       text,
    -- Set by a replay by hand; the next attempt is recorded as manual.
    replay_requested boolean NOT NULL DEFAULT false,
    UNIQUE (endpoint_id, event_id),
    CHECK (status <> 'delivered' OR delivered_at IS NOT NULL)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at DESC);

CREATE TABLE webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   uuid NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempted_at  timestamptz NOT NULL,
    status_code   integer,
    latency_ms    integer NOT NULL CHECK (latency_ms >= 0),
    error         text,
    manual        boolean NOT NULL DEFAULT false
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
