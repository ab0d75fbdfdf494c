-- An idempotency record keeps an invoice's first answer for replays; it kept the payer's name, phone and email
-- in clear text there (for 48 hours), beside the invoice that holds them only encrypted (AES-256-GCM).
-- Found by review. The service now stores the marker below instead and decrypts the payer from the invoice
-- when it replays; the records already written get the same marker.
UPDATE idempotency_keys
   SET response = jsonb_set(response, '{payer}', '"encrypted in the invoice"')
 WHERE jsonb_typeof(response -> 'payer') = 'object';
