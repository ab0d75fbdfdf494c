-- The Bakong poller reads only codes that are still unpaid.
--
-- Its claim looked at every code whose window (validity plus the grace period, 40 minutes by default) was
-- still open and dropped the paid ones one by one against payments. Nearly every code is paid within
-- minutes, so the claim's work grew with the payment rate, not with what is left to poll: in
-- load/payments_bench.py, 10,000 pending codes took 0.6-0.8 s of wall time to poll on a quiet database and
-- 5.2 s after the benchmark had paid about 60,000 invoices within the window.
--
-- A code now records when a payment on it was captured (set by the capture's own statement, in the same
-- transaction), and a partial index holds the codes not yet captured. The claim still checks payments
-- too, so a code is never polled after its payment, whichever way it was written.
--
-- On a large database, run it at a quiet hour: it writes every paid code's row once and builds the index
-- inside the migration's transaction, and until it commits, invoice creation, capture and polling wait.

ALTER TABLE khqr_codes ADD COLUMN captured_at timestamptz;

UPDATE khqr_codes k SET captured_at = p.captured_at FROM payments p WHERE p.khqr_md5 = k.md5;

CREATE INDEX khqr_codes_to_poll ON khqr_codes (expires_at) WHERE captured_at IS NULL;
