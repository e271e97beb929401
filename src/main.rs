//! The `sendgate` command: parses arguments and hands over to the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};
use sendgate::clock::{Clock, SystemClock};
use sendgate::config::Settings;
use sendgate::ctl::CtlError;
use sendgate::domain::ids::AccountId;
use sendgate::domain::plan::{Plan, parse_timezone};
use sendgate::store::{AccountSummary, Created, Store, StoreError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Credit gate for voice-note send jobs")]
struct Cli {
    /// A TOML file layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE", env = "SENDGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, declare the queues, serve HTTP and gate jobs until
    /// SIGTERM or SIGINT.
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Create, change and inspect accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Print the effective configuration as JSON (passwords redacted).
    Config,
    /// Control a running sendgate over its admin API: pause or resume
    /// taking jobs, or show whether it does.
    Ctl {
        #[command(subcommand)]
        action: CtlAction,
        /// The running sendgate's HTTP address; default: `[http] listen`
        /// of this configuration, on loopback.
        #[arg(long, global = true, env = "SENDGATE_URL", value_name = "URL")]
        url: Option<String>,
        /// An API token (admin scope to pause or resume); default: `[api]
        /// token` of this configuration.
        #[arg(
            long,
            global = true,
            env = "SENDGATE_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Print the answer as JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Look at the dead-letter queue, or move jobs from it back to the send
    /// queue.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Print a shell completion script (for example
    /// `sendgate completions bash > /etc/bash_completion.d/sendgate`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, roff (`sendgate man > sendgate.1`).
    Man,
    /// Print the HTTP API's OpenAPI document, YAML (the one in
    /// `docs/openapi.yaml`).
    Openapi,
}

#[derive(Subcommand, Clone, Copy)]
enum CtlAction {
    /// Stop taking jobs: the batches in hand finish, prefetched jobs go back
    /// to the send queue; delivery reports are still applied. This process
    /// only, until resumed or restarted.
    Pause,
    /// Take jobs again.
    Resume,
    /// Whether it takes jobs: consuming, pausing or paused.
    Status,
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List dead letters without moving them.
    List {
        #[command(flatten)]
        filter: DeadLetterFilter,
    },
    /// Move matching dead letters back to the send queue, where they are
    /// judged afresh; the others stay in place, in order.
    Redrive {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Only show what would be moved.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
struct DeadLetterFilter {
    /// Only this reason (for example out_of_credits).
    #[arg(long)]
    reason: Option<String>,
    /// Only this account.
    #[arg(long)]
    account: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Create an account; a free one gets its signup credits exactly once.
    Create {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        #[arg(long, value_parser = plan_parser())]
        plan: Plan,
        /// IANA time zone of the account's calendar day (Pro daily limit).
        #[arg(long, default_value = "UTC", value_parser = check_timezone)]
        timezone: String,
        /// Print the account as JSON, with whether it was created.
        #[arg(long)]
        json: bool,
    },
    /// Change an account's plan; it applies from the next job on.
    SetPlan {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        #[arg(value_parser = plan_parser())]
        plan: Plan,
        /// Print the account as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move an account's calendar day (the Pro daily limit's) to another
    /// time zone, from now on. The day in progress keeps its count of
    /// sends; the new zone's next midnight starts a fresh day.
    SetTimezone {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// IANA time zone, such as Europe/Berlin.
        #[arg(value_parser = check_timezone)]
        timezone: String,
        /// Print the account as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add (or take, with a negative number) credits by hand: a support
    /// correction, written to the ledger with the reason and who made it.
    /// Not a way to sell credits.
    Adjust {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// Credits to add, or to take when negative (the balance never goes
        /// below 0).
        #[arg(long, allow_negative_numbers = true)]
        credits: i64,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: String,
        /// A key for this correction, so running the command again applies
        /// it once; default: a new one each run.
        #[arg(long)]
        key: Option<String>,
        /// Print the ledger row and balance as JSON.
        #[arg(long)]
        json: bool,
    },
    /// How many sends would pass right now, and when more become available
    /// (what the scheduler asks before it enqueues).
    Capacity {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Usage on any plan: sends charged, released and refused by reason,
    /// per day or hour in the account's time zone, or per campaign.
    Usage {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// Start (RFC 3339); default: a week before --to (a day by hour).
        #[arg(long, value_parser = parse_instant)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// End, exclusive (RFC 3339); default: now.
        #[arg(long, value_parser = parse_instant)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Buckets of a day or an hour, or totals per campaign.
        #[arg(long, value_enum, default_value_t = By::Day)]
        by: By,
        /// By campaign: the page after this campaign (the previous page's
        /// `next after`).
        #[arg(long)]
        after: Option<String>,
        /// By campaign: campaigns per page (1 to 1000).
        #[arg(long, default_value_t = 100,
              value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the account's held charges: forwarded, awaiting a delivery
    /// report (or the hold time), oldest first.
    Holds {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What happened to a job: its charge (held, committed, released) and
    /// its latest refusal.
    Job {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// The job's idempotency key.
        key: String,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Show plan, credit balance, today's usage and the recent ledger.
    Show {
        #[arg(value_parser = parse_account_id)]
        id: AccountId,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How `accounts usage` groups.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum By {
    Hour,
    Day,
    Campaign,
}

fn parse_instant(value: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|err| format!("not an RFC 3339 date-time ({err}), e.g. 2026-11-30T00:00:00Z"))
}

/// One of the plans, listed in `--help` and in the error for any other.
fn plan_parser() -> impl clap::builder::TypedValueParser<Value = Plan> {
    clap::builder::PossibleValuesParser::new(Plan::ALL.map(Plan::as_str))
        .map(|name| Plan::from_str(&name).expect("one of the possible values"))
}

/// Exit codes, as sysexits(3) names them.
mod exit {
    /// The command line is wrong.
    pub const USAGE: u8 = 64;
    /// The account (or other thing named) does not exist.
    pub const NOT_FOUND: u8 = 67;
    /// The database or the broker cannot be reached or refuses the work.
    pub const UNAVAILABLE: u8 = 69;
    /// The API refused the token (missing, wrong, or too narrow a scope).
    pub const NO_PERMISSION: u8 = 77;
    /// A setting is unknown or invalid.
    pub const CONFIG: u8 = 78;
}

/// The exit code for a command that failed with `err`.
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(store) = cause.downcast_ref::<StoreError>() {
            return match store {
                StoreError::UnknownAccount(_) => exit::NOT_FOUND,
                StoreError::NotMigrated { .. } => exit::CONFIG,
                e if e.is_transient() => exit::UNAVAILABLE,
                _ => 1,
            };
        }
        if cause.downcast_ref::<lapin::Error>().is_some() {
            return exit::UNAVAILABLE;
        }
        if cause.downcast_ref::<Usage>().is_some() {
            return exit::USAGE;
        }
        if let Some(ctl) = cause.downcast_ref::<CtlError>() {
            return match ctl {
                CtlError::Unreachable { .. } => exit::UNAVAILABLE,
                CtlError::Unauthorized { .. } => exit::NO_PERMISSION,
                CtlError::Failed { .. } => 1,
            };
        }
    }
    1
}

fn parse_account_id(value: &str) -> Result<AccountId, String> {
    AccountId::parse(value).map_err(|err| err.to_string())
}

fn check_timezone(value: &str) -> Result<String, String> {
    parse_timezone(value).map(|_| value.to_owned())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; anything else is a usage error.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    // Neither needs settings: they work before any is written.
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "sendgate", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Openapi => {
            let document = sendgate::http::openapi::yaml();
            return match std::io::stdout().write_all(document.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("sendgate: cannot write the OpenAPI document: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("sendgate: cannot write the manual page: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("sendgate: {err}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    sendgate::telemetry::init(&settings.log);
    let json_logs = settings.log.format == sendgate::config::LogFormat::Json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sendgate: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line either way; JSON when log pipelines read stderr.
            if json_logs {
                tracing::error!(error = %format!("{err:#}"), "sendgate failed");
            } else {
                eprintln!("sendgate: {err:#}");
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            let stop = CancellationToken::new();
            sendgate::shutdown::on_signal(stop.clone());
            let app = match sendgate::app::App::build(settings, Arc::new(SystemClock), &stop).await
            {
                Ok(app) => app,
                // Asked to stop before it could start: a normal stop.
                Err(_) if stop.is_cancelled() => {
                    tracing::info!("stopped before start-up finished");
                    return Ok(());
                }
                Err(err) => return Err(err),
            };
            tracing::info!(http = %app.http_addr()?, "sendgate started");
            app.run(stop).await
        }
        Command::Migrate => {
            open_store(&settings, true).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Accounts(command) => accounts(command, &settings).await,
        Command::Ctl {
            action,
            url,
            token,
            json,
        } => ctl(action, url, token, json, &settings).await,
        Command::DeadLetters(command) => dead_letters(command, &settings).await,
        Command::Config => {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &settings)?;
            writeln!(out)?;
            Ok(())
        }
        // Handled in `main`, before the settings are loaded.
        Command::Completions { .. } | Command::Man | Command::Openapi => Ok(()),
    }
}

/// A command line that cannot work as given.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(std::borrow::Cow<'static, str>);

impl Usage {
    fn owned(message: String) -> Self {
        Usage(message.into())
    }
}

/// `sendgate ctl`: one call to the running process's admin API.
async fn ctl(
    action: CtlAction,
    url: Option<String>,
    token: Option<String>,
    json: bool,
    settings: &Settings,
) -> anyhow::Result<()> {
    let url = url.unwrap_or_else(|| sendgate::ctl::local_url(settings.http.listen));
    let token = match token {
        Some(token) => token,
        None if !settings.api.token.is_empty() => settings.api.token.expose().to_owned(),
        None => {
            return Err(Usage(
                "no API token: pass --token or set SENDGATE_TOKEN (or [api] token / SENDGATE__API__TOKEN)"
                    .into(),
            )
            .into());
        }
    };
    let action = match action {
        CtlAction::Pause => sendgate::ctl::Action::Pause,
        CtlAction::Resume => sendgate::ctl::Action::Resume,
        CtlAction::Status => sendgate::ctl::Action::Status,
    };
    let answer = sendgate::ctl::call(&url, &token, action).await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &answer)?;
        writeln!(out)?;
    } else {
        write!(
            out,
            "{url}: {}",
            answer["state"].as_str().unwrap_or("unknown")
        )?;
        if let (Some(by), Some(at)) = (answer["changed_by"].as_str(), answer["changed_at"].as_str())
        {
            let verb = if answer["paused"] == true {
                "paused"
            } else {
                "resumed"
            };
            write!(out, " ({verb} by {by} at {at})")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// The store for a one-shot command: created and migrated when `migrate`
/// (always migrates) or `[database] migrate_on_start` says so, else only
/// checked to be migrated (the runtime role may not migrate).
async fn open_store(settings: &Settings, migrate: bool) -> anyhow::Result<Store> {
    let url = settings.database.url.redacted();
    let store = Store::for_settings(settings)?;
    store.locate_primary().await;
    if !migrate {
        store.check_migrated().await.with_context(|| {
            format!("cannot use the database at {url} (database.url / DATABASE_URL)")
        })?;
        return Ok(store);
    }
    Store::create_database_if_missing(settings.database.url.expose())
        .await
        .with_context(|| {
            format!("cannot reach the database at {url} (database.url / DATABASE_URL)")
        })?;
    store.migrate().await.with_context(|| {
        format!("cannot migrate the database at {url} (database.url / DATABASE_URL)")
    })?;
    Ok(store)
}

async fn accounts(command: AccountsCommand, settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings, settings.database.migrate_on_start).await?;
    let mut out = std::io::stdout().lock();
    match command {
        AccountsCommand::Create {
            id,
            plan,
            timezone,
            json,
        } => {
            let created = store.create_account(&id, plan, &timezone).await?;
            if json {
                let account = store.account_summary(&id, SystemClock.now(), 20).await?;
                let created = matches!(created, Created::New { .. });
                let shown = serde_json::json!({ "created": created, "account": account });
                serde_json::to_writer_pretty(&mut out, &shown)?;
                writeln!(out)?;
                store.close().await;
                return Ok(());
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
        }
        AccountsCommand::SetPlan { id, plan, json } => {
            store.set_plan(&id, plan).await?;
            if json {
                let account = store.account_summary(&id, SystemClock.now(), 20).await?;
                serde_json::to_writer_pretty(&mut out, &account)?;
                writeln!(out)?;
            } else {
                writeln!(out, "account {id} is now on the {plan} plan")?;
            }
        }
        AccountsCommand::SetTimezone { id, timezone, json } => {
            store
                .set_timezone(&id, &timezone, SystemClock.now())
                .await?;
            if json {
                let account = store.account_summary(&id, SystemClock.now(), 20).await?;
                serde_json::to_writer_pretty(&mut out, &account)?;
                writeln!(out)?;
            } else {
                writeln!(out, "account {id} now counts its days in {timezone}")?;
            }
        }
        AccountsCommand::Adjust {
            id,
            credits,
            reason,
            key,
            json,
        } => {
            let key = key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
            let actor = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "operator".to_owned())
            );
            let adjustment = sendgate::store::Adjustment::new(credits, &reason, &key, &actor)
                .map_err(Usage::owned)?;
            let adjusted = store.adjust_credits(&id, &adjustment).await?;
            if json {
                serde_json::to_writer_pretty(
                    &mut out,
                    &serde_json::json!({
                        "entry": adjusted.entry,
                        "credit_balance": adjusted.balance,
                        "replayed": adjusted.replayed,
                    }),
                )?;
                writeln!(out)?;
            } else if adjusted.replayed {
                writeln!(
                    out,
                    "{id}: adjustment `{key}` was applied before; nothing changed (balance {})",
                    adjusted.balance
                )?;
            } else {
                writeln!(
                    out,
                    "{id}: {:+} credits ({}), balance {}",
                    adjusted.entry.delta, reason, adjusted.balance
                )?;
            }
        }
        AccountsCommand::Capacity { id, json } => {
            let now = SystemClock.now();
            let summary = store.account_summary(&id, now, 0).await?;
            let capacity = sendgate::http::api::capacity_of(&summary, now);
            if json {
                serde_json::to_writer_pretty(&mut out, &capacity)?;
                writeln!(out)?;
            } else {
                match capacity.sends_available {
                    None => writeln!(out, "{id}: unlimited")?,
                    Some(n) => writeln!(out, "{id}: {n} send(s) would pass now")?,
                }
                if let Some(at) = capacity.next_available_at {
                    writeln!(out, "  more from {}", at.to_rfc3339())?;
                }
            }
        }
        AccountsCommand::Usage {
            id,
            from,
            to,
            by,
            after,
            limit,
            json,
        } => {
            if after.is_some() && by != By::Campaign {
                return Err(
                    Usage("--after pages campaigns: use it with --by campaign".into()).into(),
                );
            }
            let grouping = match by {
                By::Hour => sendgate::store::Grouping::Hour,
                By::Day => sendgate::store::Grouping::Day,
                By::Campaign => sendgate::store::Grouping::Campaign {
                    after,
                    limit: usize::from(limit),
                },
            };
            let (from, to) =
                sendgate::http::api::usage_range(from, to, &grouping, SystemClock.now());
            let report = store.usage(&id, from, to, grouping).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
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
                let refused = |r: &sendgate::store::UsageRow| {
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
            }
        }
        AccountsCommand::Holds { id, limit, json } => {
            let holds = store.holds(&id, limit.max(1)).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "holds": holds }))?;
                writeln!(out)?;
            } else {
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
                        hold.plan,
                        hold.charge,
                        hold.charged_at
                    )?;
                }
                writeln!(out, "{} held charge(s) of {id}", holds.len())?;
            }
        }
        AccountsCommand::Job { id, key, json } => {
            let status = store.job_status(&id, &key).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &status)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{id} {key}: {}", status.status)?;
                if let Some(charge) = &status.charge {
                    write!(
                        out,
                        "  charge      {} ({} {}, reservation {}) at {}",
                        charge.state,
                        charge.plan,
                        charge.charge,
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
            }
        }
        AccountsCommand::Show { id, json } => {
            let summary = store.account_summary(&id, SystemClock.now(), 20).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &summary)?;
                writeln!(out)?;
            } else {
                print_summary(&mut out, &summary)?;
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn dead_letters(command: DeadLettersCommand, settings: &Settings) -> anyhow::Result<()> {
    let (filter, move_them, dry_run) = match command {
        DeadLettersCommand::List { filter } => (filter, false, false),
        DeadLettersCommand::Redrive { filter, dry_run } => (filter, !dry_run, dry_run),
    };
    let mut out = std::io::stdout().lock();
    let json = filter.json;
    // Each dead letter is printed as it is read (the JSON array too), so
    // listing a long queue takes no more memory than a short one.
    if json {
        write!(out, "{{\"dead_letters\": [")?;
    } else {
        writeln!(
            out,
            "{:<6}  {:<22}  {:<20}  {:<30}  {:<24}  detail",
            "source", "reason", "account", "idempotency key", "dead-lettered at"
        )?;
    }
    let mut first = true;
    let chosen = sendgate::amqp::redrive::run(
        &settings.amqp,
        &sendgate::amqp::redrive::Filter {
            reason: filter.reason,
            account: filter.account,
            jobs_only: move_them || dry_run,
        },
        filter.limit,
        move_them,
        |d| {
            if json {
                write!(out, "{}\n  ", if first { "\n  " } else { "," })?;
                serde_json::to_writer(&mut out, d)?;
                first = false;
            } else {
                writeln!(
                    out,
                    "{:<6}  {:<22}  {:<20}  {:<30}  {:<24}  {}",
                    d.source,
                    d.reason,
                    d.account_id.as_deref().unwrap_or("-"),
                    d.idempotency_key.as_deref().unwrap_or("-"),
                    d.dead_lettered_at.as_deref().unwrap_or("-"),
                    d.detail.as_deref().unwrap_or("")
                )?;
            }
            Ok(())
        },
    )
    .await
    .with_context(|| {
        let url = settings.amqp.url.redacted();
        format!("dead letters at {url} (amqp.url / AMQP_URL, amqp.ca_file)")
    })?;
    if json {
        let action = match (move_them, dry_run) {
            (true, _) => "moved",
            (false, true) => "would_move",
            (false, false) => "listed",
        };
        writeln!(out, "\n], \"{action}\": {chosen}}}")?;
        return Ok(());
    }
    let (send, dead) = (&settings.amqp.send_queue, &settings.amqp.dead_letter_queue);
    if move_them {
        writeln!(out, "moved {chosen} dead letter(s) from {dead} to {send}")?;
    } else if dry_run {
        writeln!(
            out,
            "{chosen} dead letter(s) would be moved from {dead} to {send}"
        )?;
    } else {
        writeln!(out, "{chosen} dead letter(s) in {dead} match")?;
    }
    Ok(())
}

fn print_summary(out: &mut impl Write, s: &AccountSummary) -> std::io::Result<()> {
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
