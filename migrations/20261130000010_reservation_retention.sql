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
-- partition key, so the primary key is (key digest, slot).
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

-- Also made smaller (bytes per charge, measured by `sendgate-bench`):
-- - the primary key indexes a 16-byte digest of (account, key) instead of
--   both texts: its index entries are 36 bytes instead of ~68 (the texts
--   stay in the row, and every read compares them too);
-- - the payload is kept as the first 16 bytes of its SHA-256, not 32;
-- - no `plan` column: a charge's plan follows from its kind.
-- Fixed-width columns come first, widest first, so none is padded.
CREATE TABLE reservations (
    key_digest        uuid        NOT NULL,
    id                uuid        NOT NULL,
    batch_id          uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    confirmed_at      timestamptz,
    settled_at        timestamptz,
    remaining         bigint,
    usage_day         date,
    slot              smallint    NOT NULL,
    forward_confirmed boolean     NOT NULL DEFAULT false,
    account_id        text        NOT NULL,
    idempotency_key   text        NOT NULL,
    payload_digest    bytea       NOT NULL,
    charge            text        NOT NULL,
    state             text        NOT NULL DEFAULT 'held',
    settle_detail     text,
    CONSTRAINT reservations_pkey PRIMARY KEY (key_digest, slot),
    CONSTRAINT reservations_charge_known CHECK (charge IN ('credit', 'daily_slot', 'unmetered')),
    CONSTRAINT reservations_payload_digest_length CHECK (octet_length(payload_digest) = 16),
    CONSTRAINT reservations_state_known CHECK (state IN ('held', 'committed', 'released')),
    -- Free charges (credits) are never in a slot that is emptied.
    CONSTRAINT reservations_free_kept CHECK ((charge = 'credit') = (slot = 0))
) PARTITION BY LIST (slot);

CREATE TABLE reservations_kept PARTITION OF reservations FOR VALUES IN (0);
CREATE TABLE reservations_ring_1 PARTITION OF reservations FOR VALUES IN (1);
CREATE TABLE reservations_ring_2 PARTITION OF reservations FOR VALUES IN (2);

-- The expiry sweep finds old holds without scanning settled reservations.
CREATE INDEX reservations_held_since ON reservations (created_at) WHERE state = 'held';

-- The digest as sendgate computes it (sendgate_core::ids::key_digest).
CREATE FUNCTION reservation_key_digest(account_id text, idempotency_key text) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN encode(substr(sha256(int4send(octet_length(account_id))
                            || convert_to(account_id, 'UTF8')
                            || convert_to(idempotency_key, 'UTF8')), 1, 16), 'hex')::uuid;

INSERT INTO reservations
    (key_digest, id, batch_id, created_at, confirmed_at, settled_at, remaining, usage_day,
     slot, forward_confirmed, account_id, idempotency_key, payload_digest, charge, state,
     settle_detail)
SELECT reservation_key_digest(account_id, idempotency_key), id, batch_id, created_at,
       confirmed_at, settled_at, remaining, usage_day,
       CASE WHEN charge = 'credit' THEN 0 ELSE 1 END, forward_confirmed, account_id,
       idempotency_key, substr(payload_sha256, 1, 16), charge, state, settle_detail
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
CREATE FUNCTION remove_released_reservations(digests uuid[], accounts text[], keys text[])
RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    DELETE FROM public.reservations r
    USING unnest(digests, accounts, keys) AS k(key_digest, account_id, idempotency_key)
    WHERE r.key_digest = k.key_digest
      AND r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
      AND r.state = 'released'
$$;

REVOKE ALL ON FUNCTION rotate_reservation_ring(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION remove_released_reservations(uuid[], text[], text[]) FROM PUBLIC;

-- Forward batches are removed once confirmed (the sweep): a reservation
-- whose batch row is gone was confirmed. Confirmed ones are found by id
-- (UUIDv7, time-ordered) through the primary key.
