//! `sendgate dead-letters list|redrive`: reads the dead-letter queue and
//! moves the chosen jobs back.

use std::io::Write;

use anyhow::Context;
use sendgate::amqp::redrive::{self, DeadLetterInfo, Filter};
use sendgate::config::Settings;

use super::DeadLettersCommand;

pub async fn execute(command: DeadLettersCommand, settings: &Settings) -> anyhow::Result<()> {
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
    let chosen = redrive::run(
        &settings.amqp,
        &Filter {
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
                Ok(())
            } else {
                print_row(&mut out, d)
            }
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
    let (send, dead) = (
        &settings.amqp.jobs_exchange,
        &settings.amqp.dead_letter_queue,
    );
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

fn print_row(out: &mut impl Write, d: &DeadLetterInfo) -> anyhow::Result<()> {
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
    Ok(())
}
