-- Treasury page sessions (paysvc/treasury_pages.py).

-- name: treasury_session_create
INSERT INTO treasury_sessions (token_hash, key_id, key_name, csrf_token, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)

-- name: treasury_session_get
-- A session lives until it expires or its API key is revoked.
SELECT s.key_id, s.key_name, s.csrf_token, s.expires_at
  FROM treasury_sessions s JOIN api_keys k ON k.id = s.key_id
 WHERE s.token_hash = $1 AND s.expires_at > $2 AND k.revoked_at IS NULL

-- name: treasury_session_delete
DELETE FROM treasury_sessions WHERE token_hash = $1

-- name: treasury_sessions_prune
DELETE FROM treasury_sessions WHERE expires_at <= $1
