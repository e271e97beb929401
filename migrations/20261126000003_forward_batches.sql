-- Forwards are confirmed a batch at a time: a reservation points at the
-- batch that charged it, and one row per batch records the broker's confirm,
-- instead of rewriting every reservation row.
CREATE TABLE forward_batches (
    id           uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz,
    CONSTRAINT forward_batches_pkey PRIMARY KEY (id)
);

ALTER TABLE reservations ADD COLUMN batch_id uuid;
