//! The long SQL texts, each next to the reasoning for it. Short statements
//! stay next to the code that runs them.
//!
//! A theme runs through them: a statement's plan is prepared once per
//! connection, often while the tables are still small and have no
//! statistics. A join the planner chose then would scan the whole table for
//! every batch once it has grown (until the next ANALYZE), so the hot
//! statements probe each key through the primary key (LATERAL subqueries,
//! fenced by `OFFSET 0` so the planner cannot turn them into joins), and the
//! cold ones that must join are planned at every run ([`BEGIN_PLANNED`]).
//!
//! The two statements with most parameters, [`RECORD_METERED`] and
//! [`RECORD_UNMETERED`], are bound only through their parameter structs
//! here ([`RecordMetered`], [`RecordUnmetered`]), in placeholder order.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::bind_refusals;
use super::{Query, Refusal, bind_changes};
use crate::domain::decision::{Effects, NewReservation};

/// Begins a transaction whose statements are planned at every run, with
/// the batch's own arrays and the tables as they are now. Used by settling
/// outcomes and expiring holds, whose statements join `reservations`.
/// Deciding does not use it: planning its statements for batches of 250 cost
/// 30-60% more database CPU per job in the benchmark.
pub const BEGIN_PLANNED: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// SQL text (a literal, for `concat!`): the earlier reservations of a
/// batch's keys (`$accounts`, `$keys`: two parallel text arrays), as
/// `kind = 'reservation'` rows in the column order of
/// [`super::rows::prior_reservation`]. Each key is probed on its own, in
/// every slot (see `slot_of_new!`). A forward is confirmed by its own row,
/// or by its batch's; a batch row is removed only once confirmed
/// ([`PURGE_FORWARD_BATCHES`]), so a missing one counts as confirmed. Its
/// latest forward's lease (`$lease`, an interval) is judged by the
/// database's clock, as the forward's start was written.
macro_rules! reservation_lookup {
    ($accounts:literal, $keys:literal, $lease:literal) => {
        concat!(
            "SELECT 'reservation', k.account_id, k.idempotency_key, NULL::int8, r.id,
                    r.payload_digest, r.plan, r.charge, r.remaining, r.forward_confirmed,
                    r.state, NULL::text, NULL::int8, r.last_forward_at,
                    r.last_forward_at + ",
            $lease,
            "::interval <= now()
             FROM unnest(",
            $accounts,
            "::text[], ",
            $keys,
            "::text[])
                  AS k(account_id, idempotency_key)
             CROSS JOIN LATERAL (
                 SELECT r.id, r.payload_digest, r.plan, r.charge, r.remaining,
                        r.forward_confirmed OR b.confirmed_at IS NOT NULL
                            OR (r.batch_id IS NOT NULL AND b.id IS NULL) AS forward_confirmed,
                        r.state, coalesce(r.forwarded_at, r.created_at) AS last_forward_at
                 FROM reservations r LEFT JOIN forward_batches b ON b.id = r.batch_id
                 WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
                 -- A released Free charge may be kept beside the key's
                 -- charge on another plan: the one not released counts.
                 ORDER BY r.state = 'released' LIMIT 1
             ) r"
        )
    };
}

/// Pro usage ($1 accounts, $2 days) and earlier reservations ($3, $4,
/// forward lease $5), read once the batch's metered accounts are locked.
pub const PRIOR_READ: &str = concat!(
    "SELECT 'usage' AS kind, k.account_id, NULL::text AS idempotency_key,
            u.used::int8 AS used, NULL::uuid AS id, NULL::bytea AS payload_digest,
            NULL::text AS plan, NULL::text AS charge, NULL::int8 AS remaining,
            NULL::bool AS forward_confirmed, NULL::text AS state,
            NULL::text AS timezone, NULL::int8 AS credit_balance,
            NULL::timestamptz AS last_forward_at, NULL::bool AS lease_expired
     FROM unnest($1::text[], $2::date[]) AS k(account_id, day)
     CROSS JOIN LATERAL (
         SELECT u.used FROM daily_usage u
         WHERE u.account_id = k.account_id AND u.day = k.day OFFSET 0
     ) u
     UNION ALL ",
    reservation_lookup!("$3", "$4", "$5")
);

/// Accounts ($1) and earlier reservations ($2, $3, forward lease $4) in
/// one unlocked read, for a batch of scale accounts.
pub const UNLOCKED_READ: &str = concat!(
    "SELECT 'account' AS kind, a.id AS account_id, NULL::text AS idempotency_key,
            NULL::int8 AS used, NULL::uuid AS id, NULL::bytea AS payload_digest,
            a.plan, NULL::text AS charge, NULL::int8 AS remaining,
            NULL::bool AS forward_confirmed, NULL::text AS state,
            a.timezone, a.credit_balance,
            NULL::timestamptz AS last_forward_at, NULL::bool AS lease_expired
     FROM accounts a WHERE a.id = ANY($1)
     UNION ALL ",
    reservation_lookup!("$2", "$3", "$4")
);

/// Forward leases taken over by replays ($1 accounts, $2 keys, $3
/// reservations, $4 the latest forward's start as read): each is written
/// only where the charge's latest forward is still the one read, so of two
/// copies racing for one lease exactly one writes it. Returns how many
/// were taken: fewer than asked means another copy won (decide again).
pub const TAKE_LEASES: &str = "
    UPDATE reservations r SET forwarded_at = now()
    FROM unnest($1::text[], $2::text[], $3::uuid[], $4::timestamptz[])
         AS l(account_id, idempotency_key, id, seen)
    WHERE r.account_id = l.account_id AND r.idempotency_key = l.idempotency_key
      AND r.id = l.id AND coalesce(r.forwarded_at, r.created_at) = l.seen";

/// The batch's accounts ($1, sorted), metered ones (free, pro) locked.
///
/// The ids are probed in the array's order, so every statement that locks
/// accounts this way locks them in one order (Rust's byte order, which is
/// `COLLATE "C"`, whatever the database's collation) and two workers never
/// deadlock. Rows read after waiting for a lock are the committed ones (the
/// `m` columns); the outer scan's snapshot may be older, so only locked
/// values are trusted for metered accounts. Scale accounts have no balance
/// to protect and stay unlocked, so a hot scale account does not serialize
/// its workers.
pub const LOCK_METERED: &str = "
    SELECT k.id, coalesce(m.plan, a.plan) AS plan,
           coalesce(m.timezone, a.timezone) AS timezone,
           coalesce(m.credit_balance, a.credit_balance) AS credit_balance,
           (m.plan IS NOT NULL) AS locked
    FROM unnest($1::text[]) AS k(id)
    CROSS JOIN LATERAL (
        SELECT plan, timezone, credit_balance FROM accounts
        WHERE id = k.id OFFSET 0
    ) a
    LEFT JOIN LATERAL (
        SELECT plan, timezone, credit_balance FROM accounts
        WHERE id = k.id AND plan <> 'scale' OFFSET 0 FOR UPDATE
    ) m ON true";

/// Accounts ($1, sorted) locked whatever their plan, in the array's order
/// (see [`LOCK_METERED`]): for accounts that changed plan while a batch
/// waited, and for settling.
pub const LOCK_ALL: &str = "
    SELECT k.id, a.plan, a.timezone, a.credit_balance
    FROM unnest($1::text[]) AS k(id)
    CROSS JOIN LATERAL (
        SELECT plan, timezone, credit_balance FROM accounts
        WHERE id = k.id OFFSET 0 FOR UPDATE
    ) a";

/// SQL text (a literal, for `concat!`): a CTE `usage_counted` appending
/// the batch's new charges to `usage_pending` in bucket `$bucket`, one
/// entry per charge (`$2`: the reservations' accounts; `$campaigns`: their
/// campaigns, in the same order): one row however many accounts the batch
/// has. The rollup counts them into `usage_counts` ([`ROLL_UP_USAGE`]).
macro_rules! count_charges {
    ($bucket:literal, $campaigns:literal) => {
        concat!(
            "usage_counted AS (
        INSERT INTO usage_pending (bucket, kind, account_ids, campaign_ids)
        SELECT ",
            $bucket,
            ", 'charged', $2::text[], ",
            $campaigns,
            "::text[]
        WHERE cardinality($2::text[]) > 0
    )"
        )
    };
}

/// SQL text (a literal, for `concat!`): CTEs recording a batch's refusals
/// for job status, the latest of each key (`$a` accounts, `$k` keys, `$r`
/// reasons, `$d` details; one row per key), and counting every refusal in
/// the usage of bucket `$bucket` (`$ca` accounts, `$cc` campaigns, `$cr`
/// reasons). With empty arrays they write nothing.
macro_rules! record_refusals {
    ($a:literal, $k:literal, $r:literal, $d:literal, $bucket:literal,
     $ca:literal, $cc:literal, $cr:literal) => {
        concat!(
            "refusals_recorded AS (
        INSERT INTO refusals (account_id, idempotency_key, reason, detail)
        SELECT * FROM unnest(",
            $a,
            "::text[], ",
            $k,
            "::text[], ",
            $r,
            "::text[], ",
            $d,
            "::text[])
        ON CONFLICT (account_id, idempotency_key) DO UPDATE
        SET reason = EXCLUDED.reason, detail = EXCLUDED.detail, refused_at = now()
    ), refusals_counted AS (
        INSERT INTO usage_pending (bucket, account_ids, campaign_ids, kinds)
        SELECT ",
            $bucket,
            ", ",
            $ca,
            "::text[], ",
            $cc,
            "::text[], ",
            $cr,
            "::text[]
        WHERE cardinality(",
            $ca,
            "::text[]) > 0
    )"
        )
    };
}

/// SQL text (a literal, for `concat!`): the slot a new reservation of
/// plan `$plan` is written to. Free charges are kept forever (slot 0); the
/// others go to the ring's current slot, which retention empties whole
/// once it has been out of use for the deduplication window
/// ([`ROTATE_READ`]). Read in the statement's own snapshot, so a statement
/// never writes to a slot emptied after it began.
macro_rules! slot_of_new {
    ($plan:literal) => {
        concat!(
            "CASE WHEN ",
            $plan,
            " = 'free' THEN 0::int2 ELSE (SELECT current FROM reservation_ring) END"
        )
    };
}

/// SQL text (a literal, for `concat!`): inserts a batch's new charges
/// ($1-$8, see `bind_reservations`) under forward batch `$batch`, each in
/// its slot (`slot_of_new!`).
macro_rules! insert_reservations {
    ($batch:literal) => {
        concat!(
            "INSERT INTO reservations
        (id, account_id, idempotency_key, payload_digest, plan, charge, usage_day,
         remaining, batch_id, slot)
    SELECT n.*, ",
            $batch,
            "::uuid, ",
            slot_of_new!("n.plan"),
            "
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[],
                $5::text[], $6::text[], $7::date[], $8::int8[])
         AS n(id, account_id, idempotency_key, payload_digest, plan, charge, usage_day,
              remaining)"
        )
    };
}

/// A batch's new charges ($1-$8, see `bind_reservations`) under forward
/// batch $9, counted in the usage of bucket $10 (campaigns $11), and its
/// refusals ($12-$18, see [`record_refusals`]),
/// without a transaction: scale accounts only. A key another worker charged
/// in between fails the whole statement on the primary key, usage and all.
pub const RECORD_UNMETERED: &str = concat!(
    "
    WITH forward_batch AS (
        INSERT INTO forward_batches (id) VALUES ($9)
    ), ",
    count_charges!("$10", "$11"),
    ", ",
    record_refusals!("$12", "$13", "$14", "$15", "$10", "$16", "$17", "$18"),
    " ",
    insert_reservations!("$9")
);

/// The parameters of [`RECORD_UNMETERED`], bound in the order of its
/// placeholders by [`RecordUnmetered::bind`].
pub(super) struct RecordUnmetered<'q> {
    pub reservations: &'q [NewReservation],
    pub batch: Uuid,
    pub bucket: DateTime<Utc>,
    pub campaigns: Vec<String>,
    pub refusals: &'q [Refusal],
}

impl<'q> RecordUnmetered<'q> {
    pub fn bind(self) -> Query<'q> {
        let query = sqlx::query(RECORD_UNMETERED);
        let query = bind_reservations(query, self.reservations) // $1-$8
            .bind(self.batch) // $9
            .bind(self.bucket) // $10
            .bind(self.campaigns); // $11
        bind_refusals(query, self.refusals) // $12-$18
    }
}

/// Takes out the released reservations of keys ($1 accounts, $2 keys)
/// about to be charged afresh, before the charge is written: the new charge
/// may belong in another slot than the old one (a key released in an
/// earlier slot, or under another plan), and a key has one row. In the
/// locked batch's transaction, so the insert that follows sees them gone.
/// A function run as the schema's owner: the runtime role deletes no
/// reservation itself.
pub const REMOVE_RELEASED: &str = "SELECT remove_released_reservations($1, $2)";

/// Everything a locked batch writes, in one statement: reservations ($1-$8)
/// under forward batch $19, ledger rows ($9-$12), balances ($13, $14), Pro
/// usage ($15-$17, limit $18), the usage counts of bucket $20
/// (campaigns $21) and the batch's refusals ($22-$28, see
/// [`record_refusals`]). Returns how many reservations were written: fewer
/// than asked means another worker won a race for a key (and the
/// transaction is rolled back).
pub const RECORD_METERED: &str = concat!(
    "
    WITH forward_batch AS (
        INSERT INTO forward_batches (id) VALUES ($19)
    ), ",
    count_charges!("$20", "$21"),
    ", ",
    record_refusals!("$22", "$23", "$24", "$25", "$20", "$26", "$27", "$28"),
    ", new_reservations AS (",
    insert_reservations!("$19"),
    "
        -- A released reservation is charged afresh (one in another slot was
        -- removed first: REMOVE_RELEASED); any other existing row means
        -- another worker won the race.
        ON CONFLICT (account_id, idempotency_key, slot) DO UPDATE SET
            id = EXCLUDED.id, payload_digest = EXCLUDED.payload_digest,
            plan = EXCLUDED.plan, charge = EXCLUDED.charge,
            usage_day = EXCLUDED.usage_day, remaining = EXCLUDED.remaining,
            forward_confirmed = false, confirmed_at = NULL, created_at = now(),
            batch_id = EXCLUDED.batch_id,
            state = 'held', settled_at = NULL, settle_detail = NULL
        WHERE reservations.state = 'released'
        RETURNING 1
    ), ledger AS (
        INSERT INTO credit_ledger
            (account_id, delta, kind, balance_after, idempotency_key, reservation_id)
        SELECT account_id, -1, 'send', balance_after, idempotency_key, reservation_id
        FROM unnest($9::text[], $10::int8[], $11::text[], $12::uuid[])
             AS t(account_id, balance_after, idempotency_key, reservation_id)
    ), balances AS (
        UPDATE accounts a SET credit_balance = b.balance, updated_at = now()
        FROM unnest($13::text[], $14::int8[]) AS b(id, balance)
        WHERE a.id = b.id
    ), usage AS (
        INSERT INTO daily_usage (account_id, day, used, daily_limit)
        SELECT account_id, day, used, $18
        FROM unnest($15::text[], $16::date[], $17::int4[]) AS u(account_id, day, used)
        ON CONFLICT (account_id, day)
        DO UPDATE SET used = EXCLUDED.used, daily_limit = EXCLUDED.daily_limit
    )
    SELECT count(*) FROM new_reservations"
);

/// The parameters of [`RECORD_METERED`], bound in the order of its
/// placeholders by [`RecordMetered::bind`]: one wrong index would be a
/// silent wrong charge, so they are bound here and nowhere else.
pub(super) struct RecordMetered<'q> {
    pub effects: &'q Effects,
    /// The Pro daily limit the usage rows record.
    pub daily_limit: i32,
    pub batch: Uuid,
    pub bucket: DateTime<Utc>,
    pub campaigns: Vec<String>,
    pub refusals: &'q [Refusal],
}

impl<'q> RecordMetered<'q> {
    pub fn bind(self) -> Query<'q> {
        let (e, l) = (self.effects, &self.effects.ledger);
        let query = sqlx::query(RECORD_METERED);
        let query = bind_reservations(query, &e.reservations) // $1-$8
            .bind(l.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>()) // $9
            .bind(l.iter().map(|x| x.balance_after).collect::<Vec<_>>()) // $10
            .bind(
                l.iter()
                    .map(|x| x.idempotency_key.as_str())
                    .collect::<Vec<_>>(),
            ) // $11
            .bind(l.iter().map(|x| x.reservation_id).collect::<Vec<_>>()); // $12
        let query = bind_changes(query, &e.balances, &e.usage) // $13-$17
            .bind(self.daily_limit) // $18
            .bind(self.batch) // $19
            .bind(self.bucket) // $20
            .bind(self.campaigns); // $21
        bind_refusals(query, self.refusals) // $22-$28
    }
}

/// Binds new reservations as parameters $1 to $8 (parallel arrays).
pub(super) fn bind_reservations<'q>(query: Query<'q>, r: &'q [NewReservation]) -> Query<'q> {
    query
        .bind(r.iter().map(|x| x.id).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
        .bind(
            r.iter()
                .map(|x| x.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|x| x.payload_digest.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(r.iter().map(|x| x.plan.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.charge.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.usage_day).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.remaining).collect::<Vec<_>>())
}

/// The reservations named by reports ($1 accounts, $2 keys), locked, with
/// the Pro usage of their day (columns of [`super::rows::held`]).
pub const HELD_READ: &str = "
    SELECT r.account_id, r.idempotency_key, r.id, r.charge, r.usage_day, r.state, u.used,
           r.forwarded_at IS NOT NULL AS forwarded_again
    FROM reservations r
    LEFT JOIN daily_usage u ON u.account_id = r.account_id AND u.day = r.usage_day
    WHERE (r.account_id, r.idempotency_key) IN
          (SELECT * FROM unnest($1::text[], $2::text[]))
    FOR UPDATE OF r";

/// Everything settling writes, in one statement: new states ($1-$4),
/// release ledger rows ($5-$8), balances ($9, $10), Pro usage ($11-$13) and
/// the releases that gave something back ($15, one account each) counted in
/// the usage of bucket $14 (under no campaign).
pub const SETTLE_WRITE: &str = "
    WITH usage_counted AS (
        INSERT INTO usage_pending (bucket, kind, account_ids, campaign_ids)
        SELECT $14, 'released', $15::text[],
               array_fill(''::text, ARRAY[cardinality($15::text[])])
        WHERE cardinality($15::text[]) > 0
    ), settled AS (
        UPDATE reservations r
        SET state = s.state, settled_at = now(), settle_detail = s.detail
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
             AS s(account_id, idempotency_key, state, detail)
        WHERE r.account_id = s.account_id AND r.idempotency_key = s.idempotency_key
          AND r.state = 'held'
    ), releases AS (
        INSERT INTO credit_ledger
            (account_id, delta, kind, balance_after, idempotency_key, reservation_id, note)
        SELECT account_id, 1, 'release', balance_after, idempotency_key, reservation_id,
               'delivery failed'
        FROM unnest($5::text[], $6::int8[], $7::text[], $8::uuid[])
             AS t(account_id, balance_after, idempotency_key, reservation_id)
    ), balances AS (
        UPDATE accounts a SET credit_balance = b.balance, updated_at = now()
        FROM unnest($9::text[], $10::int8[]) AS b(id, balance)
        WHERE a.id = b.id
    )
    UPDATE daily_usage d SET used = u.used
    FROM unnest($11::text[], $12::date[], $13::int4[]) AS u(account_id, day, used)
    WHERE d.account_id = u.account_id AND d.day = u.day";

/// Commits holds older than $1 that never got an outcome, at most $2 at a
/// time. Rows another sweep is committing are skipped, never done twice.
pub const EXPIRE_HOLDS: &str = "
    UPDATE reservations r SET state = 'committed', settled_at = now(),
           settle_detail = 'no outcome within the hold time'
    FROM (SELECT account_id, idempotency_key, slot FROM reservations
          WHERE state = 'held' AND created_at < now() - $1::interval
          ORDER BY created_at LIMIT $2
          FOR UPDATE SKIP LOCKED) old
    WHERE r.account_id = old.account_id AND r.idempotency_key = old.idempotency_key
      AND r.slot = old.slot AND r.state = 'held'";

/// Confirmed forwards: whole batches by id ($1, one row each), and forwards
/// of earlier charges by key and reservation ($2, $3, $4). A mark names the
/// reservation it confirms, so a late mark of an earlier attempt never marks
/// the charge a key got after a release.
pub const CONFIRM_FORWARDS: &str = "
    WITH batches AS (
        UPDATE forward_batches SET confirmed_at = now()
        WHERE id = ANY($1) AND confirmed_at IS NULL
    )
    UPDATE reservations r SET forward_confirmed = true, confirmed_at = now()
    FROM unnest($2::text[], $3::text[], $4::uuid[]) AS k(account_id, idempotency_key, id)
    WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
      AND r.id = k.id AND NOT r.forward_confirmed";

/// The runtime role's privileges, granted by every `sendgate migrate` (run
/// as the owner) when the role exists: exactly the DML the gate needs. The
/// ledger is append-only (no UPDATE, no DELETE), nothing but refusals and
/// published events past their retention (and usage rows the rollup moves)
/// may be deleted, and the role
/// creates and alters nothing. See `deploy/postgres/roles.sql`.
pub const RUNTIME_GRANTS: &str = "
    DO $$
    BEGIN
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sendgate_app') THEN
            GRANT SELECT, INSERT, UPDATE
                ON accounts, reservations, daily_usage, forward_batches TO sendgate_app;
            GRANT SELECT, INSERT ON credit_ledger TO sendgate_app;
            -- Retention: the ring's slots are emptied in turn and released
            -- reservations charged afresh are taken out, only through two
            -- functions run as the owner; confirmed forward batches are
            -- removed.
            GRANT SELECT ON reservation_ring TO sendgate_app;
            GRANT EXECUTE ON FUNCTION rotate_reservation_ring(),
                remove_released_reservations(text[], text[]),
                purge_released_kept(bigint) TO sendgate_app;
            GRANT SELECT ON retention_settings TO sendgate_app;
            GRANT DELETE ON forward_batches TO sendgate_app;
            -- Job status: the latest refusal per key, removed by retention.
            GRANT SELECT, INSERT, UPDATE, DELETE ON refusals TO sendgate_app;
            -- Usage counts past [usage] retention_days are removed.
            GRANT SELECT, INSERT, UPDATE, DELETE ON usage_counts TO sendgate_app;
            -- Usage not rolled up yet: the rollup moves (deletes) it.
            GRANT SELECT, INSERT, DELETE ON usage_pending TO sendgate_app;
            -- The events outbox: published rows are removed by retention.
            GRANT SELECT, INSERT, UPDATE, DELETE ON events TO sendgate_app;
            GRANT SELECT ON _sqlx_migrations TO sendgate_app;
        END IF;
    END $$";

/// A batch's refusals alone (bucket $1, then $2-$8, see
/// [`record_refusals`]), for a batch that charged nothing.
pub const RECORD_REFUSALS: &str = concat!(
    "WITH ",
    record_refusals!("$2", "$3", "$4", "$5", "$1", "$6", "$7", "$8"),
    " SELECT 1"
);

/// Moves up to $1 rows of `usage_pending`, oldest first, into
/// `usage_counts`, counted per account, bucket, campaign and kind; returns
/// how many rows it moved. One statement, so a reader sees each entry
/// either pending or counted, never both or neither. Run by one process at
/// a time ([`USAGE_ROLLUP_LOCK`]).
pub const ROLL_UP_USAGE: &str = "
    WITH moved AS (
        DELETE FROM usage_pending WHERE id IN (
            SELECT id FROM usage_pending ORDER BY id LIMIT $1)
        RETURNING bucket, kind, account_ids, campaign_ids, kinds
    ), counted AS (
        INSERT INTO usage_counts (account_id, bucket, campaign_id, kind, shard, n)
        SELECT u.account_id, m.bucket, u.campaign_id, coalesce(m.kind, u.kind), 0, count(*)
        FROM moved m
        CROSS JOIN LATERAL unnest(m.account_ids, m.campaign_ids, coalesce(m.kinds, '{}'))
            AS u(account_id, campaign_id, kind)
        GROUP BY 1, 2, 3, 4
        ON CONFLICT (account_id, bucket, campaign_id, kind, shard)
        DO UPDATE SET n = usage_counts.n + EXCLUDED.n
    )
    SELECT count(*) FROM moved";

/// Taken (for the transaction) by the process that rolls usage up; the
/// others skip their turn rather than wait.
pub const USAGE_ROLLUP_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtextextended('sendgate.usage_rollup', 0))";

/// Removes refusals older than $1, at most $2 at a time, oldest first.
pub const PURGE_REFUSALS: &str = "
    DELETE FROM refusals WHERE (account_id, idempotency_key) IN (
        SELECT account_id, idempotency_key FROM refusals
        WHERE refused_at < now() - $1::interval
        ORDER BY refused_at LIMIT $2)";

/// Removes usage counts of buckets older than $1, at most $2 rows at a
/// time, oldest first (through `usage_counts_bucket`).
pub const PURGE_USAGE_COUNTS: &str = "
    DELETE FROM usage_counts WHERE (account_id, bucket, campaign_id, kind, shard) IN (
        SELECT account_id, bucket, campaign_id, kind, shard FROM usage_counts
        WHERE bucket < now() - $1::interval
        ORDER BY bucket LIMIT $2)";

/// Empties the retention ring's other slot and makes it current, when the
/// current one has been current for the deduplication window stored in
/// `retention_settings`; returns the slot emptied, or NULL. A function run as the schema's owner
/// (see its migration): the runtime role truncates nothing itself.
pub const ROTATE_RING: &str = "SELECT rotate_reservation_ring()";

/// Removes up to $1 released Free charges older than the stored window
/// (a function run as the schema's owner); returns how many.
pub const PURGE_RELEASED_KEPT: &str = "SELECT purge_released_kept($1)";

/// Stores the deduplication window ($1, an interval; NULL keeps every
/// charge): run by `migrate`, as the owner.
pub const SET_DEDUP_WINDOW: &str = "UPDATE retention_settings SET dedup_window = $1::interval";

/// Removes confirmed forward batches with ids below $1 (UUIDv7, so: older
/// than a time), at most $2, oldest first. A reservation whose batch row is
/// gone counts as confirmed ([`PRIOR_READ`]).
pub const PURGE_FORWARD_BATCHES: &str = "
    DELETE FROM forward_batches WHERE id IN (
        SELECT id FROM forward_batches
        WHERE id < $1 AND confirmed_at IS NOT NULL
        ORDER BY id LIMIT $2)";

/// An account's usage ($1) from $2 to $3: per local `$4` (hour or day) in
/// time zone $6, or, when $5, per campaign, only the campaigns after $7
/// (all when NULL), in order, at most $8 of them; and the totals over the
/// whole range (`total` rows, every campaign). The entries not rolled up
/// yet are added from the same snapshot.
pub const USAGE_READ: &str = "
    WITH c AS (
        SELECT bucket, campaign_id, kind, n FROM usage_counts
        WHERE account_id = $1 AND bucket >= $2 AND bucket < $3
        UNION ALL
        SELECT p.bucket, u.campaign_id, coalesce(p.kind, u.kind), 1
        FROM usage_pending p
        CROSS JOIN LATERAL unnest(p.account_ids, p.campaign_ids, coalesce(p.kinds, '{}'))
             AS u(account_id, campaign_id, kind)
        WHERE p.bucket >= $2 AND p.bucket < $3 AND u.account_id = $1
    ), grouped AS (
        SELECT CASE WHEN $5 THEN NULL
                    ELSE date_trunc($4, bucket AT TIME ZONE $6) END AS local_start,
               CASE WHEN $5 THEN campaign_id END AS campaign_id,
               kind, sum(n)::int8 AS n
        FROM c GROUP BY 1, 2, 3
    ), page AS (
        SELECT DISTINCT campaign_id FROM grouped
        WHERE $5 AND ($7::text IS NULL OR campaign_id > $7::text)
        ORDER BY campaign_id LIMIT $8
    )
    SELECT false AS total, local_start, campaign_id, kind, n FROM grouped
    WHERE NOT $5 OR campaign_id IN (SELECT campaign_id FROM page)
    UNION ALL
    SELECT true, NULL, NULL, kind, sum(n)::int8 FROM grouped GROUP BY kind
    ORDER BY 1, 2, 3";
