-- One payment, several channels; one code, several payments.
--
-- A citizen's payment on a KHQR code may reach us through more than one channel (a bank's signed callback
-- and the Bakong poll), each with its own transaction id, and a code may be paid more than once (a citizen
-- paying an old code again). Before this migration a code carried at most one payment with its md5; capture
-- took a notice from another provider for the same amount as that one payment, and stored any other payment
-- on the code without its md5. Found by review: a second payment on a code reported by two channels was
-- booked twice (the second report compared itself with the first payment only, and could not find the second,
-- stored without the md5), and a second payment made through a channel that had already reported the first
-- one was taken for the first one and never booked.
--
-- Now every payment on a code keeps its md5, numbered on the code (khqr_seq: 1, 2, ...; unique with the md5,
-- so two captures that each decide to add "the n-th payment" cannot both commit, and the second decides
-- again), and each channel's report of money already captured under another channel is kept in
-- payment_reports: a provider transaction is a payment or a report of one, and a payment is reported at most
-- once by each provider. A settlement line is never kept as a report (a file names its lines by its own
-- references; the import raises a line it cannot match to its provider's payments). A new notice from provider X is the same money as the earliest
-- payment on its code, of another provider, the same amount and currency, that X has not reported yet;
-- otherwise it is a payment.
CREATE TABLE payment_reports (
    provider                 text NOT NULL,
    provider_transaction_id  text NOT NULL,
    payment_id               text NOT NULL REFERENCES payments(id),
    source                   text NOT NULL CHECK (source IN ('callback', 'poll', 'settlement')),
    inbox_id                 bigint REFERENCES provider_inbox(id),
    notice                   jsonb NOT NULL,
    reported_at              timestamptz NOT NULL,
    PRIMARY KEY (provider, provider_transaction_id),
    UNIQUE (payment_id, provider)
);
-- Evidence, like the inbox: written once, never changed.
GRANT SELECT, INSERT ON payment_reports TO paysvc_app;

-- Payments already on a code keep khqr_seq NULL, read as 1 (the index below and every query say
-- coalesce(khqr_seq, 1)): setting it would rewrite every payment row while captures wait (found by review).
-- New payments on a code always carry their number.
ALTER TABLE payments ADD COLUMN khqr_seq integer;
DROP INDEX payments_one_per_khqr;
-- Payments stored without their code's md5 because the code had a payment already: the md5 their notice
-- named, when it is a code of their invoice, numbered after that payment in the order they were captured.
WITH later AS (
    SELECT p.id, k.md5,
           1 + row_number() OVER (PARTITION BY k.md5 ORDER BY p.captured_at, p.id) AS seq
      FROM payments p
      JOIN khqr_codes k ON k.md5 = p.evidence -> 'notice' ->> 'md5' AND k.invoice_id = p.invoice_id
     WHERE p.khqr_md5 IS NULL)
UPDATE payments p SET khqr_md5 = later.md5, khqr_seq = later.seq FROM later WHERE p.id = later.id;
CREATE UNIQUE INDEX payments_nth_on_khqr ON payments (khqr_md5, (coalesce(khqr_seq, 1))) WHERE khqr_md5 IS NOT NULL;
-- Validated by the next migration, in a transaction of its own (its scan then lets captures go on).
ALTER TABLE payments ADD CONSTRAINT payments_numbered_on_their_code
    CHECK (khqr_seq IS NULL OR (khqr_md5 IS NOT NULL AND khqr_seq >= 1)) NOT VALID;
