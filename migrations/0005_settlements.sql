-- Settlement files, their lines and how each was matched; treasury page sessions. See docs/settlement.md.

-- One imported file. The file is its SHA-256: importing the same bytes again changes nothing.
CREATE TABLE settlements (
    id                text PRIMARY KEY,
    provider          text NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]{0,63}$'),  -- whose payments it settles
    format            text NOT NULL CHECK (format ~ '^[a-z][a-z0-9_]{0,63}$'),    -- the parser that read it
    business_date     date NOT NULL,
    file_sha256       bytea NOT NULL UNIQUE CHECK (octet_length(file_sha256) = 32),
    file_name         text CHECK (char_length(file_name) <= 255),
    file_size         bigint NOT NULL CHECK (file_size >= 0),
    line_count        bigint NOT NULL DEFAULT 0 CHECK (line_count >= 0),
    imported_at       timestamptz NOT NULL,
    imported_by       text NOT NULL CHECK (char_length(imported_by) BETWEEN 1 AND 100),
    journal_entry_id  bigint REFERENCES ledger_entries (id),
    -- totals per category at import time (the first report), kept as the record of what was found then
    summary           jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX settlements_by_day ON settlements (business_date DESC, provider);

-- Every line of every file, with the category matching gave it.
CREATE TABLE settlement_lines (
    settlement_id   text NOT NULL REFERENCES settlements (id),
    line_no         integer NOT NULL CHECK (line_no >= 1),
    transaction_id  text,
    md5             text,
    bill_number     text,
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL CHECK (currency IN ('KHR', 'USD')),
    paid_at         timestamptz,
    fee             bigint NOT NULL DEFAULT 0 CHECK (fee >= 0),
    reference       text,
    category        text NOT NULL CHECK (category IN ('matched', 'amount_mismatch', 'missing_in_ledger',
                                                      'duplicate_in_settlement')),
    matched_by      text CHECK (matched_by IN ('transaction_id', 'md5', 'bill_number', 'captured')),
    payment_id      text REFERENCES payments (id),
    exception_id    text REFERENCES reconciliation_exceptions (id),
    PRIMARY KEY (settlement_id, line_no),
    CHECK ((category = 'duplicate_in_settlement') OR payment_id IS NOT NULL),
    CHECK ((category IN ('matched')) = (exception_id IS NULL) OR category = 'missing_in_ledger')
);
-- A payment is settled by at most one line, ever: the database refuses a second.
CREATE UNIQUE INDEX settlement_lines_settle_once ON settlement_lines (payment_id)
    WHERE category IN ('matched', 'amount_mismatch', 'missing_in_ledger');
CREATE INDEX settlement_lines_by_exception ON settlement_lines (exception_id) WHERE exception_id IS NOT NULL;

-- A payment not settled after the grace period is raised once.
CREATE UNIQUE INDEX reconciliation_exceptions_missing_once ON reconciliation_exceptions (payment_id)
    WHERE reason = 'missing_in_settlement';
CREATE INDEX reconciliation_exceptions_by_day ON reconciliation_exceptions (business_date, provider);
CREATE INDEX payments_by_bill ON payments (bill_number) WHERE bill_number IS NOT NULL;

-- A resolution names the journal entry that moved the money (NULL: the action only acknowledged it).
ALTER TABLE reconciliation_exceptions ADD CONSTRAINT reconciliation_exceptions_resolved_by
    CHECK (state = 'open' OR resolved_by IS NOT NULL);
-- Once resolved, an exception stays resolved as it was: the database refuses a second resolution.
CREATE FUNCTION reconciliation_exception_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'resolved' THEN
        RAISE EXCEPTION 'reconciliation exception % is already resolved', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reconciliation_exceptions_resolve_once BEFORE UPDATE ON reconciliation_exceptions
    FOR EACH ROW EXECUTE FUNCTION reconciliation_exception_guard();

-- Treasury page sessions: an API key exchanged for a cookie. Only the token's SHA-256 is stored.
CREATE TABLE treasury_sessions (
    token_hash  bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    key_id      text NOT NULL REFERENCES api_keys (id),
    key_name    text NOT NULL,
    csrf_token  text NOT NULL CHECK (char_length(csrf_token) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
CREATE INDEX treasury_sessions_expiry ON treasury_sessions (expires_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON settlements, settlement_lines, treasury_sessions TO paysvc_app;

-- The shape of the per-import scratch table: an import copies it into a temporary table
-- (CREATE TEMP TABLE … (LIKE settlement_staging_shape) ON COMMIT DROP), fills it with COPY, and matches
-- with joins. Never holds rows itself.
CREATE TABLE settlement_staging_shape (
    line_no         integer NOT NULL,
    transaction_id  text,
    md5             text,
    bill_number     text,
    amount          bigint NOT NULL,
    currency        text NOT NULL,
    paid_at         timestamptz,
    fee             bigint NOT NULL,
    reference       text,
    payment_id      text,
    matched_by      text,
    category        text,
    exception_id    text,
    duplicate_of    integer
);
CREATE FUNCTION settlement_staging_shape_empty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'settlement_staging_shape only gives its shape to temporary tables'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER settlement_staging_shape_empty BEFORE INSERT ON settlement_staging_shape
    FOR EACH ROW EXECUTE FUNCTION settlement_staging_shape_empty();
GRANT SELECT ON settlement_staging_shape TO paysvc_app;
