-- name: poll_claim
-- Codes still to be asked about (poll_pending: payable, or expired and not yet answered about once the grace
-- was over; migration 0037), expired less than the give-up time ($1) ago, not yet paid, not leased, not asked
-- in the last $2; longest waiting first, codes of the same millisecond by md5 (RETURNING gives the rows in the
-- table's order, so the order is applied after it). $3 codes at most, leased for $4. Leases and the times codes
-- were asked are the database's clock, so instances whose clocks differ never take each other's codes (before,
-- each instance's own clock set and judged them: a skew of about 10 s let two ask about one code at once).
-- lease_until: the same for every code claimed, and what names this claim's lease (renew and release). (No
-- condition on created_at, which the issuing instance's clock set: one ahead held its codes back by its skew,
-- found by review; a code being issued is not seen before it commits anyway.)
WITH claimed AS (
UPDATE khqr_codes k SET poll_lease_until = now() + $4::interval
 WHERE k.md5 IN (
        SELECT c.md5 FROM khqr_codes c
         WHERE c.poll_pending AND c.captured_at IS NULL
           AND c.expires_at > now() - $1::interval
           AND (c.poll_lease_until IS NULL OR c.poll_lease_until < now())
           AND (c.last_polled_at IS NULL OR c.last_polled_at <= now() - $2::interval)
           AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.khqr_md5 = c.md5)
         ORDER BY c.last_polled_at NULLS FIRST, c.created_at, c.md5
         LIMIT $3
           FOR NO KEY UPDATE SKIP LOCKED)
RETURNING k.md5, k.currency, k.amount, k.to_account, k.expires_at, k.last_polled_at, k.created_at,
          k.poll_lease_until, (SELECT bill_number FROM invoices i WHERE i.id = k.invoice_id) AS bill_number
)
SELECT md5, currency, amount, to_account, expires_at, bill_number, poll_lease_until AS lease_until
  FROM claimed
 ORDER BY last_polled_at NULLS FIRST, created_at, md5

-- name: poll_renew
-- Extend the lease of codes the caller still holds: $2 is the poll_lease_until its claim (or last renewal)
-- set; the new one is $3 from now, by the database's clock. Returns the codes renewed, with their new lease; a
-- code another instance took over is not, nor one a capture holds (skipped as in poll_release below) or has
-- marked paid meanwhile: the caller drops those from its pass (a paid code's lease simply runs out; it is
-- never claimed again).
UPDATE khqr_codes SET poll_lease_until = now() + $3::interval
 WHERE md5 IN (SELECT md5 FROM khqr_codes
                WHERE md5 = ANY($1::text[]) AND poll_lease_until = $2::timestamptz AND captured_at IS NULL
                  FOR NO KEY UPDATE SKIP LOCKED)
RETURNING md5, poll_lease_until AS lease_until

-- name: poll_release
-- Only the caller's own lease is cleared: $3 is the poll_lease_until its claim (or last renewal) set. A code
-- whose lease ran out and was claimed by another instance carries that instance's lease, and is left to it.
-- $2: the codes were asked about (now, by the database's clock); false frees codes that were claimed but not
-- asked (their turn kept).
-- Codes locked by a capture in progress are skipped, not waited for: a capture marks its code, and a
-- settlement import may hold many codes until its file is done, which would make this statement wait on it
-- (or deadlock with it, taking the same codes in another order). A skipped code keeps its lease until the
-- lease runs out, and once captured it is not polled again anyway.
-- $4: codes that expired at or before it are no longer pending (an answer read after their grace was over);
-- NULL when the call failed. $5: codes the answer could not be read about, left pending.
UPDATE khqr_codes SET poll_lease_until = NULL, last_polled_at = CASE WHEN $2::boolean THEN now() ELSE last_polled_at END,
       poll_pending = poll_pending AND NOT coalesce(expires_at <= $4::timestamptz AND md5 <> ALL ($5::text[]), false)
 WHERE md5 IN (SELECT md5 FROM khqr_codes
                WHERE md5 = ANY($1::text[]) AND poll_lease_until IS NOT DISTINCT FROM $3::timestamptz
                  FOR NO KEY UPDATE SKIP LOCKED)

-- name: token_lock
-- One instance at a time looks at a provider's token and decides whether to renew it (the transaction's
-- advisory lock, held for a few statements: never across the call to the provider).
SELECT pg_advisory_xact_lock(hashtextextended('provider_token:' || $1, 0))

-- name: token_stored
-- The stored token, and whether a renewal was asked less than $2 ago by the database's clock (found by review:
-- an instance whose clock ran ahead wrote a time that kept the others from renewing for as long).
SELECT key_id, ciphertext, renewed_at, attempted_at, attempted_at > now() - $2::interval AS too_soon
  FROM provider_tokens WHERE provider = $1

-- name: token_attempt
-- A renewal is about to be asked: it counts towards the pace of renewals whatever comes of it. Returns its time,
-- which names the attempt.
INSERT INTO provider_tokens (provider, attempted_at) VALUES ($1, now())
ON CONFLICT (provider) DO UPDATE SET attempted_at = excluded.attempted_at
RETURNING attempted_at

-- name: token_renewed
-- The token the attempt $4 got, unless a later attempt was made meanwhile (found by review: a store delayed past
-- the pace of renewals overwrote the newer token with the one that renewal had ended). Returns the provider.
UPDATE provider_tokens SET key_id = $2, ciphertext = $3, renewed_at = now() WHERE provider = $1 AND attempted_at = $4
RETURNING provider

-- name: tokens_under_older_keys
SELECT provider, key_id, ciphertext FROM provider_tokens WHERE ciphertext IS NOT NULL AND key_id <> $1

-- name: token_reencrypted
-- The stored token under the active key (it was read with an older one), unless it changed meanwhile.
UPDATE provider_tokens SET key_id = $2, ciphertext = $3 WHERE provider = $1 AND ciphertext = $4
