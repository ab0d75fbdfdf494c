-- Two rules on journal entries, found by review (each reproduced by writing rows as the service role):
--
-- * An entry's effective time must be a real instant between 0001-01-02 and 9999-12-30 (UTC). An entry dated
--   'infinity', 10000-01-01 or 4000 BC committed, and then `paysvc ledger verify` stopped with a traceback
--   (Python's dates end there) instead of reporting, and every page of entries or of an account's statement
--   holding it answered 400.
-- * An entry reverses an earlier one (a lower id). Two entries inserted by one statement could each name the
--   other as the entry it reverses (the foreign key is checked at the statement's end, and each mirrored
--   the other's postings), so neither was an original and both counted as reversed for good. Entries posted
--   through ledger_post always have a higher id than what they reverse (the sequence), so nothing changes
--   for them; the rule rules out every cycle, an entry reversing itself included.
--
-- Added NOT VALID so this transaction does not scan the table; migration 0036 validates both in a transaction
-- of its own (a lock that lets entries be posted during the scan).
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_effective_at_in_range
    CHECK (isfinite(effective_at) AND effective_at >= '0001-01-02 00:00:00+00'
           AND effective_at < '9999-12-31 00:00:00+00') NOT VALID;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_reverses_an_earlier_entry
    CHECK (reverses IS NULL OR reverses < id) NOT VALID;
