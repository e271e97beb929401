-- Retention of charges. Reservations are split by `slot` (LIST
-- partitions):
--
-- - slot 0, `reservations_kept`: Free charges, kept forever (an account has
--   at most its signup credits of them, plus credits added by hand);
-- - slots 1 and 2, `reservations_ring_1` and `_2`: Pro and Scale charges.
--   New ones go to the current slot (`reservation_ring`). Once the current
--   slot has been current for the deduplication window
--   ([reservations] dedup_window_secs), the other slot is emptied whole
--   (TRUNCATE: no dead rows, no vacuum, no index to shrink) and becomes
--   current. Every row in the slot emptied was written before the slot
--   still current became current, so a key is remembered for at least the
--   window and at most twice it.
--
-- A partition's unique index can only be on columns that include the
-- partition key, so the primary key is (account_id, idempotency_key, slot).
-- One row per key still holds: the gate reads a key's reservation from
-- every slot before charging it, locks a metered account before reading
-- its keys, and a key charged afresh after a release takes its earlier row
-- out of a slot other than the one it is written to (src/store/sql.rs).
--
-- Usage (usage_counts), the ledger and daily_usage are separate tables and
-- survive the rotation.

CREATE TABLE reservation_ring (
    only_row boolean     NOT NULL DEFAULT true,
    current  smallint    NOT NULL,
    since    timestamptz NOT NULL,
    CONSTRAINT reservation_ring_pkey PRIMARY KEY (only_row),
    CONSTRAINT reservation_ring_one_row CHECK (only_row),
    CONSTRAINT reservation_ring_slot CHECK (current IN (1, 2))
);
INSERT INTO reservation_ring (current, since) VALUES (1, now());

ALTER TABLE reservations RENAME TO reservations_unpartitioned;
ALTER INDEX reservations_pkey RENAME TO reservations_unpartitioned_pkey;
DROP INDEX reservations_held_since;

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
    state             text        NOT NULL DEFAULT 'held',
    settled_at        timestamptz,
    settle_detail     text,
    batch_id          uuid,
    slot              smallint    NOT NULL,
    CONSTRAINT reservations_pkey PRIMARY KEY (account_id, idempotency_key, slot),
    CONSTRAINT reservations_plan_known CHECK (plan IN ('free', 'pro', 'scale')),
    CONSTRAINT reservations_charge_known CHECK (charge IN ('credit', 'daily_slot', 'unmetered')),
    CONSTRAINT reservations_payload_sha256_length CHECK (octet_length(payload_sha256) = 32),
    CONSTRAINT reservations_state_known CHECK (state IN ('held', 'committed', 'released')),
    -- Free charges are never in a slot that is emptied.
    CONSTRAINT reservations_free_kept CHECK ((plan = 'free') = (slot = 0))
) PARTITION BY LIST (slot);

CREATE TABLE reservations_kept PARTITION OF reservations FOR VALUES IN (0);
CREATE TABLE reservations_ring_1 PARTITION OF reservations FOR VALUES IN (1);
CREATE TABLE reservations_ring_2 PARTITION OF reservations FOR VALUES IN (2);

-- The expiry sweep finds old holds without scanning settled reservations.
CREATE INDEX reservations_held_since ON reservations (created_at) WHERE state = 'held';

INSERT INTO reservations
    (id, account_id, idempotency_key, payload_sha256, plan, charge, usage_day, remaining,
     forward_confirmed, created_at, confirmed_at, state, settled_at, settle_detail,
     batch_id, slot)
SELECT id, account_id, idempotency_key, payload_sha256, plan, charge, usage_day, remaining,
       forward_confirmed, created_at, confirmed_at, state, settled_at, settle_detail,
       batch_id, CASE WHEN plan = 'free' THEN 0 ELSE 1 END
FROM reservations_unpartitioned;

DROP TABLE reservations_unpartitioned;

-- The runtime role neither deletes reservations nor truncates tables: it
-- calls these two functions, which run as the schema's owner and do only
-- this.

-- Empties the other ring slot and makes it current, when the current slot
-- has been current for `dedup_window`; returns the slot emptied, or NULL
-- when none was due. The ring's row is locked, so two processes never
-- rotate twice. TRUNCATE must wait for statements reading the slot, and
-- every statement after it waits for it: it gives up after 2 s, to be
-- tried again at the next sweep.
CREATE FUNCTION rotate_reservation_ring(dedup_window interval) RETURNS smallint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
SET lock_timeout = '2s'
AS $$
DECLARE
    ring public.reservation_ring;
    emptied smallint;
BEGIN
    SELECT * INTO ring FROM public.reservation_ring FOR UPDATE;
    IF now() - ring.since < dedup_window THEN
        RETURN NULL;
    END IF;
    emptied := 3 - ring.current;
    IF emptied = 1 THEN
        TRUNCATE public.reservations_ring_1;
    ELSE
        TRUNCATE public.reservations_ring_2;
    END IF;
    UPDATE public.reservation_ring SET current = emptied, since = now();
    RETURN emptied;
END;
$$;

-- Takes out the released reservations of keys about to be charged afresh
-- (the new charge may belong in another slot); inert rows, whose credit
-- or daily slot was given back already.
CREATE FUNCTION remove_released_reservations(accounts text[], keys text[]) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    DELETE FROM public.reservations r
    USING unnest(accounts, keys) AS k(account_id, idempotency_key)
    WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
      AND r.state = 'released'
$$;

REVOKE ALL ON FUNCTION rotate_reservation_ring(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION remove_released_reservations(text[], text[]) FROM PUBLIC;

-- Forward batches are removed once confirmed (the sweep): a reservation
-- whose batch row is gone was confirmed. Confirmed ones are found by id
-- (UUIDv7, time-ordered) through the primary key.
