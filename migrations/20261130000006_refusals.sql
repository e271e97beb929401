-- The latest refusal of each job key, for job status (`accounts job`,
-- GET /v1/accounts/{id}/jobs/{key}): a scheduler can ask what happened to a
-- job after its dead letter is gone. Kept for [jobs] refusal_retention_days.
-- The gate never reads it when deciding: a refused job sent again is judged
-- afresh. No foreign key: a job for an unknown account is refused too.
CREATE TABLE refusals (
    account_id      text        NOT NULL,
    idempotency_key text        NOT NULL,
    reason          text        NOT NULL,
    detail          text        NOT NULL,
    refused_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT refusals_pkey PRIMARY KEY (account_id, idempotency_key)
);
-- Retention removes the oldest first.
CREATE INDEX refusals_refused_at ON refusals (refused_at);
