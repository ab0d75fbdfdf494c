-- A provider's API token renewed by the service (Bakong's tokens last 90 days), shared by every instance: the
-- instance whose token is refused first renews it and stores it here; another instance whose token is then
-- refused takes the stored one instead of renewing again. Found by review: each instance renewing on its own
-- (a renewal may end the token before it) had the instances refuse each other's tokens in turn.
--
-- The token is encrypted like payer data (PAYSVC_PII_KEYS, with the provider bound in as associated data;
-- read with an older key, it is stored again under the active one). attempted_at: when a renewal was last
-- asked, by the database's clock, whatever came of it: renewals are at most one per 10 minutes across all
-- instances.
CREATE TABLE provider_tokens (
    provider      text PRIMARY KEY,
    key_id        text,
    ciphertext    bytea,
    renewed_at    timestamptz,
    attempted_at  timestamptz NOT NULL,
    CHECK ((key_id IS NULL) = (ciphertext IS NULL) AND (ciphertext IS NULL) = (renewed_at IS NULL))
);
GRANT SELECT, INSERT, UPDATE ON provider_tokens TO paysvc_app;
