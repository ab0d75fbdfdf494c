-- A settlement line may be named by the bank's own reference rather than by the provider's transaction id (a
-- camt.053 entry without EndToEndId or TxId): the import keeps that with the lines it captures, so that the
-- provider's callback for the same payment, under its transaction id, is known for what it is (capture's
-- same_money). The scratch table's shape gains the column; it never holds rows.
ALTER TABLE settlement_staging_shape ADD COLUMN id_is_reference boolean NOT NULL DEFAULT false;

-- Payments captured from a file before this migration (found by review): the mark from their line, where it
-- can be told. A line with no id; a camt.053 line whose id is its AcctSvcrRef (what the reader falls back to).
-- One named by NtryRef alone cannot be told from one named by EndToEndId or TxId, and stays unmarked.
UPDATE payments p
   SET evidence = jsonb_set(p.evidence, '{notice,raw,id_is_reference}',
                            to_jsonb(sl.transaction_id IS NULL OR (s.format = 'camt053' AND sl.transaction_id = sl.reference)))
  FROM settlement_lines sl JOIN settlements s ON s.id = sl.settlement_id
 WHERE p.source = 'settlement' AND p.evidence #> '{notice,raw}' IS NOT NULL
   AND NOT (p.evidence #> '{notice,raw}' ? 'id_is_reference')
   AND sl.settlement_id = p.evidence #>> '{notice,raw,settlement_id}'
   AND sl.line_no = (p.evidence #>> '{notice,raw,line_no}')::int;
