//! The command line: the clap types of every command, and the dispatch of a
//! parsed command to its group (`accounts`, `dead_letters`, `ctl`,
//! `service`). Each group's file holds one function per subcommand.

mod accounts;
mod audit;
mod ctl;
mod dead_letters;
pub mod exit;
mod service;

use std::path::PathBuf;
use std::str::FromStr;

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};
use sendgate::config::Settings;
use sendgate::domain::ids::AccountId;
use sendgate::domain::plan::{Plan, parse_timezone};
use sendgate::store::Granularity;

#[derive(Parser)]
#[command(version, about = "Credit gate for voice-note send jobs")]
pub struct Cli {
    /// A TOML file layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE", env = "SENDGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply migrations, declare the queues, serve HTTP and gate jobs until
    /// SIGTERM or SIGINT.
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Create, change and inspect accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Check the money's invariants against the database (balances and
    /// ledger, credits spent, Pro days, usage counts, held charges); exit 1
    /// when any is broken, naming the account and the check.
    Audit {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration as JSON (passwords redacted).
    Config,
    /// Control a running sendgate over its admin API: pause or resume
    /// taking jobs, or show whether it does.
    Ctl(CtlCommand),
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

#[derive(clap::Args)]
pub struct CtlCommand {
    #[command(subcommand)]
    action: sendgate::ctl::Action,
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
}

#[derive(Subcommand)]
pub enum DeadLettersCommand {
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
pub struct DeadLetterFilter {
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
pub enum AccountsCommand {
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
    Usage(UsageArgs),
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

/// `accounts usage`'s arguments.
#[derive(clap::Args)]
pub struct UsageArgs {
    #[arg(value_parser = parse_account_id)]
    pub id: AccountId,
    /// Start (RFC 3339); default: a week before --to (a day by hour).
    #[arg(long, value_parser = parse_instant)]
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// End, exclusive (RFC 3339); default: now.
    #[arg(long, value_parser = parse_instant)]
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Buckets of a day or an hour, or totals per campaign.
    #[arg(long, value_enum, default_value_t = Granularity::Day)]
    pub by: Granularity,
    /// By campaign: the page after this campaign (the previous page's
    /// `next after`).
    #[arg(long)]
    pub after: Option<String>,
    /// By campaign: campaigns per page (1 to 1000).
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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

fn parse_account_id(value: &str) -> Result<AccountId, String> {
    AccountId::parse(value).map_err(|err| err.to_string())
}

fn check_timezone(value: &str) -> Result<String, String> {
    parse_timezone(value).map(|_| value.to_owned())
}

/// Runs a command that needs settings (all but `completions`, `man` and
/// `openapi`, which `main` answers before loading any).
pub async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run => service::run(settings).await,
        Command::Migrate => service::migrate(&settings).await,
        Command::Config => service::print_config(&settings),
        Command::Audit { json } => audit::execute(&settings, json).await,
        Command::Accounts(command) => accounts::execute(command, &settings).await,
        Command::Ctl(command) => ctl::execute(command, &settings).await,
        Command::DeadLetters(command) => dead_letters::execute(command, &settings).await,
        Command::Completions { .. } | Command::Man | Command::Openapi => {
            unreachable!("answered in main before the settings are loaded")
        }
    }
}
