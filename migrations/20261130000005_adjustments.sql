-- Support corrections (`accounts adjust`, POST /v1/accounts/{id}/adjustments):
-- who wrote each hand-made ledger row, and one adjustment per client-given
-- key per account, so a retried correction is applied once.
ALTER TABLE credit_ledger ADD COLUMN actor text;
CREATE UNIQUE INDEX credit_ledger_one_adjustment_per_key
    ON credit_ledger (account_id, idempotency_key) WHERE kind = 'adjustment';
