-- A reservation is held when its job is forwarded, then settled once by the
-- delivery outcome: committed (delivered, or no outcome within the hold
-- time) or released (delivery failed: the credit or daily slot comes back).
ALTER TABLE reservations
    ADD COLUMN state         text NOT NULL DEFAULT 'held',
    ADD COLUMN settled_at    timestamptz,
    ADD COLUMN settle_detail text,
    ADD CONSTRAINT reservations_state_known CHECK (state IN ('held', 'committed', 'released'));

-- The expiry sweep finds old holds without scanning settled reservations.
CREATE INDEX reservations_held_since ON reservations (created_at) WHERE state = 'held';
