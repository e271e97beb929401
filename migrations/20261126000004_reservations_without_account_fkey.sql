-- Reservations keep their account id without a foreign key. The key cost
-- every charged job a lookup and a row lock (FOR KEY SHARE) on its account,
-- shared as a multixact when batches for one account overlap: 15-25% of
-- the database's CPU per job in the benchmark. It guarded nothing the gate
-- relies on: a reservation is only written for an account read in the same
-- batch, and accounts are never deleted (no command deletes one).
-- credit_ledger and daily_usage keep theirs.
ALTER TABLE reservations DROP CONSTRAINT reservations_account_fkey;
