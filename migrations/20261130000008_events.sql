-- The transactional outbox of threshold events (credits.low,
-- credits.exhausted, daily_limit.reached, plan.changed): written in the
-- same transaction as the change that made them, so an event exists exactly
-- when its change committed; relayed to the events exchange with publisher
-- confirms, then marked published. Published rows are removed after
-- [events] retention_days.
CREATE TABLE events (
    id           uuid        PRIMARY KEY,          -- UUIDv7: time-ordered
    type         text        NOT NULL,
    account_id   text        NOT NULL,
    body         jsonb       NOT NULL,             -- the event as published
    -- The scope an event happens at most once in (daily_limit.reached:
    -- account and day); NULL when every occurrence counts.
    once_per     text        UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
-- The relay reads the unpublished ones, oldest first; retention the
-- published ones, oldest first.
CREATE INDEX events_unpublished ON events (id) WHERE published_at IS NULL;
CREATE INDEX events_published_at ON events (published_at) WHERE published_at IS NOT NULL;
