-- Payments from providers: the raw inbox, captured payments, and reconciliation exceptions.

-- Every callback exactly as it arrived, stored before anything else happens.
CREATE TABLE provider_inbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider         text NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    headers          jsonb NOT NULL,
    body             bytea NOT NULL,
    -- received: waiting to be processed; processed: its notices were captured; rejected: failed verification
    -- or the provider did not confirm it (kept as evidence, never processed)
    state            text NOT NULL DEFAULT 'received' CHECK (state IN ('received', 'processed', 'rejected')),
    reason           text,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    processed_at     timestamptz,
    CHECK (state <> 'rejected' OR reason IS NOT NULL)
);
CREATE INDEX provider_inbox_due ON provider_inbox (next_attempt_at) WHERE state = 'received';

CREATE TABLE payments (
    id                       text PRIMARY KEY,
    provider                 text NOT NULL,
    provider_transaction_id  text NOT NULL,
    invoice_id               text REFERENCES invoices(id),
    agency_id                bigint REFERENCES agencies(id),
    khqr_md5                 text REFERENCES khqr_codes(md5),
    bill_number              text,
    currency                 text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    amount                   bigint NOT NULL CHECK (amount > 0),
    applied_amount           bigint NOT NULL CHECK (applied_amount >= 0),   -- booked to the agency's revenue
    suspense_amount          bigint NOT NULL CHECK (suspense_amount >= 0),  -- booked to suspense, raised to treasury
    to_account               text,
    from_account             text,
    paid_at                  timestamptz NOT NULL,
    captured_at              timestamptz NOT NULL DEFAULT now(),
    source                   text NOT NULL CHECK (source IN ('callback', 'poll', 'settlement')),
    inbox_id                 bigint REFERENCES provider_inbox(id),
    evidence                 jsonb NOT NULL DEFAULT '{}',
    UNIQUE (provider, provider_transaction_id),
    CHECK (applied_amount + suspense_amount = amount),
    CHECK (applied_amount = 0 OR invoice_id IS NOT NULL)
);
-- A dynamic KHQR code is paid once; a second channel reporting the same code is the same money.
CREATE UNIQUE INDEX payments_one_per_khqr ON payments (khqr_md5) WHERE khqr_md5 IS NOT NULL;
CREATE INDEX payments_by_invoice ON payments (invoice_id);
CREATE INDEX payments_by_provider_day ON payments (provider, paid_at);

CREATE TABLE reconciliation_exceptions (
    id            text PRIMARY KEY,
    reason        text NOT NULL CHECK (reason IN (
                      'unknown_khqr', 'currency_mismatch', 'account_mismatch', 'invoice_expired',
                      'invoice_cancelled', 'duplicate_payment', 'underpaid', 'overpaid',
                      'amount_mismatch', 'missing_in_ledger', 'missing_in_settlement', 'duplicate_in_settlement')),
    state         text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    provider      text NOT NULL,
    payment_id    text REFERENCES payments(id),
    invoice_id    text REFERENCES invoices(id),
    agency_id     bigint REFERENCES agencies(id),
    currency      text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    amount        bigint NOT NULL CHECK (amount >= 0),   -- the money in question (e.g. what went to suspense)
    business_date date,
    evidence      jsonb NOT NULL DEFAULT '{}',
    opened_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    resolved_by   text,
    resolution    text CHECK (resolution IN ('match_to_invoice', 'refund_due', 'write_off')),
    resolution_note   text,
    resolution_entry_id text,
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL AND resolution IS NOT NULL AND resolution_note IS NOT NULL))
);
CREATE INDEX reconciliation_exceptions_open ON reconciliation_exceptions (opened_at DESC) WHERE state = 'open';
CREATE INDEX reconciliation_exceptions_by_payment ON reconciliation_exceptions (payment_id);

-- Bakong polling: which codes are being polled now, by whom, and when each was last asked about.
ALTER TABLE khqr_codes ADD COLUMN poll_lease_until timestamptz;
ALTER TABLE khqr_codes ADD COLUMN last_polled_at timestamptz;
