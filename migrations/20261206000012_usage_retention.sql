-- Usage counts are kept for [usage] retention_days; the sweep removes the
-- oldest buckets first, found through this index.
CREATE INDEX usage_counts_bucket ON usage_counts (bucket);
