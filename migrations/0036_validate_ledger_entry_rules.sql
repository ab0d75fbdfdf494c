-- Validates the two rules migration 0035 added NOT VALID. Should it fail, the entries that break a rule are
-- `SELECT id, effective_at FROM ledger_entries WHERE NOT (isfinite(effective_at) AND effective_at >=
-- '0001-01-02+00' AND effective_at < '9999-12-31+00')` and `SELECT id, reverses FROM ledger_entries WHERE
-- reverses >= id`: they were written around ledger_post, and are corrected with reversing entries once the
-- rule is dropped and added back NOT VALID, or by the ledger's owner.
ALTER TABLE ledger_entries VALIDATE CONSTRAINT ledger_entries_effective_at_in_range;
ALTER TABLE ledger_entries VALIDATE CONSTRAINT ledger_entries_reverses_an_earlier_entry;
