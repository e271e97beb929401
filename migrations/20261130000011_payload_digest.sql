-- A charge keeps the first 16 bytes of its payload's SHA-256, not all 32
-- (`PayloadDigest` in the core): 16 bytes less in every row and its WAL,
-- and still no two different payloads under one key taken for the same.
-- Charges written before keep their 32 bytes; the gate compares their
-- first 16. Instant on a table of any size: a rename, and a check that new
-- rows are held to without reading the old ones (which all have 32).
ALTER TABLE reservations RENAME COLUMN payload_sha256 TO payload_digest;
ALTER TABLE reservations DROP CONSTRAINT reservations_payload_sha256_length;
ALTER TABLE reservations ADD CONSTRAINT reservations_payload_digest_length
    CHECK (octet_length(payload_digest) IN (16, 32)) NOT VALID;
