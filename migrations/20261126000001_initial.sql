-- Accounts, the append-only credit ledger, reservations (one per charged
-- job) and per-day Pro usage. Constraint names are mapped to domain errors
-- in src/store.rs.

CREATE TABLE accounts (
    id             text        NOT NULL,
    plan           text        NOT NULL,
    timezone       text        NOT NULL DEFAULT 'UTC',
    credit_balance bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_pkey PRIMARY KEY (id),
    CONSTRAINT accounts_id_length CHECK (char_length(id) BETWEEN 1 AND 128),
    CONSTRAINT accounts_plan_known CHECK (plan IN ('free', 'pro', 'scale')),
    CONSTRAINT accounts_credit_balance_non_negative CHECK (credit_balance >= 0)
);

CREATE TABLE credit_ledger (
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    account_id      text        NOT NULL,
    delta           bigint      NOT NULL,
    kind            text        NOT NULL,
    balance_after   bigint      NOT NULL,
    idempotency_key text,
    reservation_id  uuid,
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_ledger_pkey PRIMARY KEY (id),
    CONSTRAINT credit_ledger_account_fkey FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT credit_ledger_kind_known
        CHECK (kind IN ('signup_grant', 'send', 'release', 'adjustment')),
    CONSTRAINT credit_ledger_balance_after_non_negative CHECK (balance_after >= 0)
);

-- The signup grant is given once per account, whatever retries happen.
CREATE UNIQUE INDEX credit_ledger_one_signup_grant
    ON credit_ledger (account_id) WHERE kind = 'signup_grant';
-- At most one send row per reservation: a charge is never written twice.
CREATE UNIQUE INDEX credit_ledger_one_send_per_reservation
    ON credit_ledger (reservation_id) WHERE kind = 'send';
CREATE INDEX credit_ledger_account_recent ON credit_ledger (account_id, id DESC);

-- Append-only: rows are never changed or removed.
CREATE FUNCTION credit_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only' USING ERRCODE = 'raise_exception';
END;
$$;

CREATE TRIGGER credit_ledger_append_only
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

CREATE TABLE reservations (
    id                uuid        NOT NULL,
    account_id        text        NOT NULL,
    idempotency_key   text        NOT NULL,
    payload_sha256    bytea       NOT NULL,
    plan              text        NOT NULL,
    charge            text        NOT NULL,
    usage_day         date,
    remaining         bigint,
    forward_confirmed boolean     NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    confirmed_at      timestamptz,
    -- One charge per (account, key), ever. The reservation id travels in
    -- headers and the ledger; nothing looks a reservation up by it.
    CONSTRAINT reservations_pkey PRIMARY KEY (account_id, idempotency_key),
    CONSTRAINT reservations_account_fkey FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT reservations_plan_known CHECK (plan IN ('free', 'pro', 'scale')),
    CONSTRAINT reservations_charge_known CHECK (charge IN ('credit', 'daily_slot', 'unmetered')),
    CONSTRAINT reservations_payload_sha256_length CHECK (octet_length(payload_sha256) = 32)
);

CREATE TABLE daily_usage (
    account_id  text    NOT NULL,
    day         date    NOT NULL,
    used        integer NOT NULL,
    daily_limit integer NOT NULL,
    CONSTRAINT daily_usage_pkey PRIMARY KEY (account_id, day),
    CONSTRAINT daily_usage_account_fkey FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT daily_usage_within_limit CHECK (used >= 0 AND used <= daily_limit)
);
