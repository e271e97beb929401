-- Retention's authority. The deduplication window is a setting of the
-- database, written by `sendgate migrate` (the owner role) from
-- [reservations] dedup_window_secs; rotation reads it here. The runtime
-- role can read it, not change it, and no longer passes a window of its
-- own: a process with a shorter window, or a runtime role in the wrong
-- hands, cannot empty a slot early.
CREATE TABLE retention_settings (
    only_row     boolean  NOT NULL DEFAULT true,
    -- NULL: keep every charge.
    dedup_window interval,
    CONSTRAINT retention_settings_pkey PRIMARY KEY (only_row),
    CONSTRAINT retention_settings_one_row CHECK (only_row),
    CONSTRAINT retention_settings_window_positive CHECK (dedup_window > interval '0')
);
INSERT INTO retention_settings (dedup_window) VALUES (interval '7 days');

DROP FUNCTION rotate_reservation_ring(interval);

-- Empties the other ring slot and makes it current, when the current slot
-- has been current for the stored window; returns the slot emptied, or
-- NULL when none was due (or the window is off).
CREATE FUNCTION rotate_reservation_ring() RETURNS smallint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
SET lock_timeout = '2s'
AS $$
DECLARE
    ring public.reservation_ring;
    dedup_window interval;
    emptied smallint;
BEGIN
    SELECT s.dedup_window INTO dedup_window FROM public.retention_settings s;
    IF dedup_window IS NULL THEN
        RETURN NULL;
    END IF;
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
REVOKE ALL ON FUNCTION rotate_reservation_ring() FROM PUBLIC;

-- Released reservations of keys about to be charged afresh, taken out of
-- the ring slots only. A kept (Free) charge is never deleted by the runtime
-- role: a released Free key charged afresh on the Free plan is written over
-- in place, and a released Free charge of a key now charged on another
-- plan stays until it is older than the window (purge_released_kept);
-- reads prefer a key's charge that is not released.
CREATE OR REPLACE FUNCTION remove_released_reservations(accounts text[], keys text[]) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    DELETE FROM public.reservations r
    USING unnest(accounts, keys) AS k(account_id, idempotency_key)
    WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
      AND r.state = 'released' AND r.slot <> 0
$$;

-- Free charges released by a failed delivery are kept for the window (a
-- copy of the job within it is charged afresh, in place), then removed:
-- an account keeps at most its credits' worth of charges, plus released
-- ones younger than the window. At most `max_rows` at a time, oldest first;
-- returns how many. Nothing when the window is off.
CREATE INDEX reservations_kept_released ON reservations_kept (settled_at)
    WHERE state = 'released';
CREATE FUNCTION purge_released_kept(max_rows bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    dedup_window interval;
    removed bigint;
BEGIN
    SELECT s.dedup_window INTO dedup_window FROM public.retention_settings s;
    IF dedup_window IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM public.reservations_kept WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM public.reservations_kept
        WHERE state = 'released' AND settled_at < now() - dedup_window
        ORDER BY settled_at LIMIT max_rows));
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END;
$$;
REVOKE ALL ON FUNCTION purge_released_kept(bigint) FROM PUBLIC;
