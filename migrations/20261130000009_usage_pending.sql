-- Usage counts, written cheaply: each statement that charges, releases or
-- refuses appends one row here with the batch's entries as arrays (one
-- insert, whatever the number of accounts), and a rollup in every sendgate
-- process (one at a time) moves them into usage_counts every second, in one
-- statement. Reads add the rows not rolled up yet, in the same snapshot, so
-- a figure is as fresh as the last committed batch. Before this, each batch
-- upserted one usage_counts row per account it touched.
CREATE TABLE usage_pending (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bucket       timestamptz NOT NULL,
    -- Each entry counts once: (account_ids[i], campaign_ids[i], kind or kinds[i]).
    kind         text,
    account_ids  text[]      NOT NULL,
    campaign_ids text[]      NOT NULL,
    kinds        text[],
    CHECK ((kind IS NULL) <> (kinds IS NULL))
);
