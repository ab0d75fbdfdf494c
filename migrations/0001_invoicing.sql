-- Agencies, API keys, invoices with their KHQR codes, idempotency keys and the event outbox.

CREATE TABLE agencies (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code            text NOT NULL UNIQUE CHECK (code ~ '^[A-Z][A-Z0-9_]{1,15}$'),
    name            text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 25),
    name_km         text NOT NULL CHECK (char_length(name_km) BETWEEN 1 AND 25),
    bakong_account  text NOT NULL CHECK (char_length(bakong_account) <= 32 AND position('@' IN bakong_account) > 1),
    merchant_id     text CHECK (char_length(merchant_id) BETWEEN 1 AND 32),
    acquiring_bank  text CHECK (char_length(acquiring_bank) BETWEEN 1 AND 32),
    mcc             text NOT NULL DEFAULT '9399' CHECK (mcc ~ '^[0-9]{4}$'),
    city            text NOT NULL DEFAULT 'Phnom Penh' CHECK (char_length(city) BETWEEN 1 AND 15),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- tag 30 (corporate) needs both; tag 29 (individual) neither
    CHECK ((merchant_id IS NULL) = (acquiring_bank IS NULL))
);

CREATE TABLE api_keys (
    id           text PRIMARY KEY,            -- public part of the key, shown in logs
    name         text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    agency_id    bigint REFERENCES agencies(id),
    scopes       text[] NOT NULL CHECK (scopes <@ ARRAY['invoices:write','invoices:read','treasury','admin']::text[]
                                        AND cardinality(scopes) > 0),
    secret_hash  bytea NOT NULL,              -- sha256 of the secret part; the key itself is never stored
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE SEQUENCE invoice_number_seq;

CREATE TABLE invoices (
    id               text PRIMARY KEY,
    number           bigint NOT NULL UNIQUE DEFAULT nextval('invoice_number_seq'),
    -- the short number a citizen's bank app shows (KHQR tag 62.01, at most 25 characters)
    bill_number      text NOT NULL UNIQUE CHECK (bill_number ~ '^PS[0-9]{8,23}$'),
    agency_id        bigint NOT NULL REFERENCES agencies(id),
    reference        text NOT NULL,
    description      text NOT NULL,
    currency         text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    amount           bigint NOT NULL CHECK (amount > 0),
    amount_paid      bigint NOT NULL DEFAULT 0 CHECK (amount_paid >= 0),
    line_items       jsonb NOT NULL DEFAULT '[]',
    metadata         jsonb NOT NULL DEFAULT '{}',
    payer_key_id     text,
    payer_ciphertext bytea,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid', 'expired', 'cancelled')),
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    paid_at          timestamptz,
    cancelled_at     timestamptz,
    expired_at       timestamptz,
    current_khqr_md5 text,
    UNIQUE (agency_id, reference),
    CHECK ((payer_key_id IS NULL) = (payer_ciphertext IS NULL)),
    CHECK (status <> 'paid' OR paid_at IS NOT NULL),
    CHECK (status <> 'cancelled' OR cancelled_at IS NOT NULL),
    CHECK (status <> 'expired' OR expired_at IS NOT NULL)
);
CREATE INDEX invoices_agency_listing ON invoices (agency_id, created_at DESC, id DESC);
CREATE INDEX invoices_open_by_expiry ON invoices (expires_at) WHERE status = 'open';

-- Every KHQR code an invoice issued: a payment on any of them pays the invoice.
CREATE TABLE khqr_codes (
    md5          text PRIMARY KEY CHECK (md5 ~ '^[0-9a-f]{32}$'),
    invoice_id   text NOT NULL REFERENCES invoices(id),
    payload      text NOT NULL,
    to_account   text NOT NULL,
    currency     text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    amount       bigint NOT NULL CHECK (amount > 0),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
CREATE INDEX khqr_codes_by_invoice ON khqr_codes (invoice_id, created_at DESC);
CREATE INDEX khqr_codes_by_expiry ON khqr_codes (expires_at);

ALTER TABLE invoices ADD FOREIGN KEY (current_khqr_md5) REFERENCES khqr_codes(md5) DEFERRABLE INITIALLY DEFERRED;

-- Idempotency-Key records: the first response, replayed for the same key and body.
CREATE TABLE idempotency_keys (
    owner         text NOT NULL,      -- whose key space: the agency code
    key           text NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    request_hash  text NOT NULL,
    status        integer NOT NULL,
    response      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

-- Transactional outbox: events commit with the change that caused them.
CREATE TABLE agency_event_seq (
    agency_id  bigint PRIMARY KEY REFERENCES agencies(id),
    last_seq   bigint NOT NULL DEFAULT 0
);

CREATE TABLE outbox_events (
    id              uuid PRIMARY KEY,
    agency_id       bigint NOT NULL REFERENCES agencies(id),
    seq             bigint NOT NULL,
    type            text NOT NULL,
    schema_version  integer NOT NULL DEFAULT 1,
    occurred_at     timestamptz NOT NULL,
    data            jsonb NOT NULL,
    published_at    timestamptz,
    UNIQUE (agency_id, seq)
);
CREATE INDEX outbox_unpublished ON outbox_events (agency_id, seq) WHERE published_at IS NULL;
