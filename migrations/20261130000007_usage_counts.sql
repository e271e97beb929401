-- Usage of every account, whatever its plan: sends charged, released, and
-- refused by reason, per 15-minute UTC bucket (every time zone's hours and
-- days are whole buckets, so reads group them in the account's zone) and
-- campaign. Written in the same statement as the change it counts. Each
-- counter is spread over a few shards, so concurrent batches of one hot
-- account do not queue on one row; reads sum the shards. Independent of
-- reservations: it outlives any retention of them.
CREATE TABLE usage_counts (
    account_id  text        NOT NULL,
    bucket      timestamptz NOT NULL,
    campaign_id text        NOT NULL DEFAULT '',
    kind        text        NOT NULL,
    shard       smallint    NOT NULL,
    n           bigint      NOT NULL,
    CONSTRAINT usage_counts_pkey PRIMARY KEY (account_id, bucket, campaign_id, kind, shard)
);
