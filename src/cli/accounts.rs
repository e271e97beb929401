//! `sendgate accounts …`: one function per subcommand, each printing a
//! table or, with `--json`, the same thing as JSON.

use std::io::Write;

use sendgate::clock::{Clock, SystemClock};
use sendgate::config::Settings;
use sendgate::domain::ids::AccountId;
use sendgate::domain::plan::Plan;
use sendgate::store::{
    AccountSummary, Adjustment, Created, Granularity, Store, UsageReport, UsageRow,
};
use serde::Serialize;

use super::exit::BadCommandLine;
use super::service::open_store;
use super::{AccountsCommand, UsageArgs};

/// Ledger rows `show` (and the JSON of a changed account) lists.
const RECENT_LEDGER_ROWS: i64 = 20;

type Out<'a> = std::io::StdoutLock<'a>;

pub async fn execute(command: AccountsCommand, settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings, settings.database.migrate_on_start).await?;
    let out = &mut std::io::stdout().lock();
    let done = match command {
        AccountsCommand::Create {
            id,
            plan,
            timezone,
            json,
        } => create(&store, out, &id, plan, &timezone, json).await,
        AccountsCommand::SetPlan { id, plan, json } => set_plan(&store, out, &id, plan, json).await,
        AccountsCommand::SetTimezone { id, timezone, json } => {
            set_timezone(&store, out, &id, &timezone, json).await
        }
        AccountsCommand::Adjust {
            id,
            credits,
            reason,
            key,
            json,
        } => adjust(&store, out, &id, credits, &reason, key, json).await,
        AccountsCommand::Capacity { id, json } => capacity(&store, out, &id, json).await,
        AccountsCommand::Usage(args) => usage(&store, out, args).await,
        AccountsCommand::Holds { id, limit, json } => holds(&store, out, &id, limit, json).await,
        AccountsCommand::Job { id, key, json } => job(&store, out, &id, &key, json).await,
        AccountsCommand::Show { id, json } => show(&store, out, &id, json).await,
    };
    store.close().await;
    done
}

fn print_json(out: &mut Out, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

async fn summary(store: &Store, id: &AccountId) -> anyhow::Result<AccountSummary> {
    Ok(store
        .account_summary(id, SystemClock.now(), RECENT_LEDGER_ROWS)
        .await?)
}

async fn create(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    plan: Plan,
    timezone: &str,
    json: bool,
) -> anyhow::Result<()> {
    let created = store.create_account(id, plan, timezone).await?;
    if json {
        let account = summary(store, id).await?;
        let created = matches!(created, Created::New { .. });
        return print_json(
            out,
            &serde_json::json!({ "created": created, "account": account }),
        );
    }
    match created {
        Created::New { granted } if plan == Plan::Free => writeln!(
            out,
            "created account {id} on the free plan with {granted} signup credits"
        )?,
        Created::New { .. } => writeln!(out, "created account {id} on the {plan} plan")?,
        Created::Existing => writeln!(
            out,
            "account {id} already exists on the {plan} plan; nothing changed"
        )?,
    }
    Ok(())
}

async fn set_plan(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    plan: Plan,
    json: bool,
) -> anyhow::Result<()> {
    store.set_plan(id, plan).await?;
    if json {
        return print_json(out, &summary(store, id).await?);
    }
    writeln!(out, "account {id} is now on the {plan} plan")?;
    Ok(())
}

async fn set_timezone(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    timezone: &str,
    json: bool,
) -> anyhow::Result<()> {
    store.set_timezone(id, timezone, SystemClock.now()).await?;
    if json {
        return print_json(out, &summary(store, id).await?);
    }
    writeln!(out, "account {id} now counts its days in {timezone}")?;
    Ok(())
}

async fn adjust(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    credits: i64,
    reason: &str,
    key: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let key = key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
    let actor = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".to_owned())
    );
    let adjustment = Adjustment::new(credits, reason, &key, &actor).map_err(BadCommandLine)?;
    let adjusted = store.adjust_credits(id, &adjustment).await?;
    if json {
        return print_json(
            out,
            &serde_json::json!({
                "entry": adjusted.entry,
                "credit_balance": adjusted.balance,
                "replayed": adjusted.replayed,
            }),
        );
    }
    if adjusted.replayed {
        writeln!(
            out,
            "{id}: adjustment `{key}` was applied before; nothing changed (balance {})",
            adjusted.balance
        )?;
    } else {
        writeln!(
            out,
            "{id}: {:+} credits ({reason}), balance {}",
            adjusted.entry.delta, adjusted.balance
        )?;
    }
    Ok(())
}

async fn capacity(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    json: bool,
) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let capacity = store.account_summary(id, now, 0).await?.capacity(now);
    if json {
        return print_json(out, &capacity);
    }
    match capacity.sends_available {
        None => writeln!(out, "{id}: unlimited")?,
        Some(n) => writeln!(out, "{id}: {n} send(s) would pass now")?,
    }
    if let Some(at) = capacity.next_available_at {
        writeln!(out, "  more from {}", at.to_rfc3339())?;
    }
    Ok(())
}

async fn usage(store: &Store, out: &mut Out<'_>, args: UsageArgs) -> anyhow::Result<()> {
    if args.after.is_some() && args.by != Granularity::Campaign {
        return Err(BadCommandLine(
            "--after pages campaigns: use it with --by campaign".to_owned(),
        )
        .into());
    }
    let grouping = args.by.grouping(args.after, usize::from(args.limit));
    let (from, to) = grouping.range(args.from, args.to, SystemClock.now());
    let report = store.usage(&args.id, from, to, grouping).await?;
    if args.json {
        return print_json(out, &report);
    }
    print_usage(out, &args.id, &report)
}

fn print_usage(out: &mut Out, id: &AccountId, report: &UsageReport) -> anyhow::Result<()> {
    writeln!(
        out,
        "{id} ({}), {} to {}",
        report.timezone,
        report.from.to_rfc3339(),
        report.to.to_rfc3339()
    )?;
    writeln!(
        out,
        "{:<26}  {:>8}  {:>8}  refused",
        "bucket", "charged", "released"
    )?;
    let refused = |r: &UsageRow| {
        r.refused
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for row in &report.rows {
        let label = match (&row.start, &row.campaign_id) {
            (Some(start), _) => start.clone(),
            (None, Some(c)) if c.is_empty() => "(no campaign)".to_owned(),
            (None, Some(c)) => c.clone(),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{label:<26}  {:>8}  {:>8}  {}",
            row.charged,
            row.released,
            refused(row)
        )?;
    }
    let t = &report.totals;
    writeln!(
        out,
        "{:<26}  {:>8}  {:>8}  {}",
        "total",
        t.charged,
        t.released,
        refused(t)
    )?;
    if let Some(after) = &report.next_after {
        writeln!(out, "more campaigns: --after {after:?}")?;
    }
    Ok(())
}

async fn holds(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let holds = store.holds(id, limit.max(1)).await?;
    if json {
        return print_json(out, &serde_json::json!({ "holds": holds }));
    }
    writeln!(
        out,
        "{:<32}  {:<36}  {:<5}  {:<10}  charged at",
        "idempotency key", "reservation", "plan", "charge"
    )?;
    for hold in &holds {
        writeln!(
            out,
            "{:<32}  {:<36}  {:<5}  {:<10}  {}",
            hold.idempotency_key,
            hold.reservation_id,
            hold.plan.as_str(),
            hold.charge.as_str(),
            hold.charged_at
        )?;
    }
    writeln!(out, "{} held charge(s) of {id}", holds.len())?;
    Ok(())
}

async fn job(
    store: &Store,
    out: &mut Out<'_>,
    id: &AccountId,
    key: &str,
    json: bool,
) -> anyhow::Result<()> {
    let status = store.job_status(id, key).await?;
    if json {
        return print_json(out, &status);
    }
    writeln!(out, "{id} {key}: {}", status.status.as_str())?;
    if let Some(charge) = &status.charge {
        write!(
            out,
            "  charge      {} ({} {}, reservation {}) at {}",
            charge.state.as_str(),
            charge.plan.as_str(),
            charge.charge.as_str(),
            charge.reservation_id,
            charge.charged_at
        )?;
        if let (Some(at), Some(detail)) = (charge.settled_at, &charge.settle_detail) {
            write!(out, ", settled {at}: {detail}")?;
        }
        writeln!(out)?;
    }
    if let Some(refusal) = &status.last_refusal {
        writeln!(
            out,
            "  refused     {} at {}: {}",
            refusal.reason, refusal.refused_at, refusal.detail
        )?;
    }
    Ok(())
}

async fn show(store: &Store, out: &mut Out<'_>, id: &AccountId, json: bool) -> anyhow::Result<()> {
    let s = summary(store, id).await?;
    if json {
        return print_json(out, &s);
    }
    writeln!(out, "account      {}", s.id)?;
    writeln!(out, "plan         {}", s.plan)?;
    writeln!(out, "time zone    {}", s.timezone)?;
    writeln!(out, "credits      {}", s.credit_balance)?;
    match (s.plan, s.limit_today) {
        (Plan::Pro, Some(limit)) => writeln!(
            out,
            "today        {} of {} daily sends used ({})",
            s.sends_today, limit, s.today
        )?,
        _ => writeln!(out, "today        {} sends ({})", s.sends_today, s.today)?,
    }
    writeln!(out)?;
    writeln!(out, "recent credit ledger (newest first)")?;
    writeln!(
        out,
        "{:<25}  {:<12}  {:>6}  {:>8}  idempotency key",
        "at", "kind", "delta", "balance"
    )?;
    for entry in &s.recent_ledger {
        writeln!(
            out,
            "{:<25}  {:<12}  {:>+6}  {:>8}  {}",
            entry.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            entry.kind,
            entry.delta,
            entry.balance_after,
            entry.idempotency_key.as_deref().unwrap_or("-")
        )?;
    }
    if s.recent_ledger.is_empty() {
        writeln!(out, "(no ledger rows)")?;
    }
    Ok(())
}
