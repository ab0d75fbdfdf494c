-- A settlement line may be named by the bank's own reference rather than by the provider's transaction id (a
-- camt.053 entry without EndToEndId or TxId): the import keeps that with the lines it captures, so that the
-- provider's callback for the same payment, under its transaction id, is known for what it is (capture's
-- same_money). The scratch table's shape gains the column; it never holds rows.
ALTER TABLE settlement_staging_shape ADD COLUMN id_is_reference boolean NOT NULL DEFAULT false;
