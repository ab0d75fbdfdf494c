-- name: poll_claim
-- Codes still payable, or expired less than the grace period ago, not yet paid, not leased, not asked lately.
UPDATE khqr_codes k SET poll_lease_until = $5
 WHERE k.md5 IN (
        SELECT c.md5 FROM khqr_codes c
         WHERE c.captured_at IS NULL
           AND c.expires_at > $2
           AND c.created_at <= $1
           AND (c.poll_lease_until IS NULL OR c.poll_lease_until < $1)
           AND (c.last_polled_at IS NULL OR c.last_polled_at <= $3)
           AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.khqr_md5 = c.md5)
         ORDER BY c.last_polled_at NULLS FIRST, c.created_at
         LIMIT $4
           FOR NO KEY UPDATE SKIP LOCKED)
RETURNING k.md5, k.currency, k.amount, k.to_account, k.expires_at,
          (SELECT bill_number FROM invoices i WHERE i.id = k.invoice_id) AS bill_number

-- name: poll_release
-- Codes locked by a capture in progress are skipped, not waited for: a capture marks its code, and a
-- settlement import may hold many codes until its file is done, which would make this statement wait on it
-- (or deadlock with it, taking the same codes in another order). A skipped code keeps its lease until the
-- lease runs out, and once captured it is not polled again anyway.
UPDATE khqr_codes SET poll_lease_until = NULL, last_polled_at = $2
 WHERE md5 IN (SELECT md5 FROM khqr_codes WHERE md5 = ANY($1::text[]) FOR NO KEY UPDATE SKIP LOCKED)
