//! `sendgate audit`: the self-audit on demand, its report as a table or
//! JSON; exit code 1 when an invariant is broken.

use std::io::Write;

use sendgate::config::Settings;
use sendgate::store::{AuditReport, MAX_LISTED};

use super::service::open_store;

/// The audit found violations (exit code 1, after the report).
#[derive(Debug, thiserror::Error)]
#[error("the audit found {0} violation(s)")]
pub struct Violations(pub u64);

pub async fn execute(settings: &Settings, json: bool) -> anyhow::Result<()> {
    // Read only: never migrates, whatever `migrate_on_start` says.
    let store = open_store(settings, false).await?;
    let report = store.audit(&sendgate::worker::audit::rules(settings)).await;
    store.close().await;
    let report = report?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &report)?;
    }
    match report.total() {
        0 => Ok(()),
        n => Err(Violations(n).into()),
    }
}

fn print_table(out: &mut impl Write, report: &AuditReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{} accounts audited in {} ms",
        report.accounts,
        report.took.as_millis()
    )?;
    if let Some(since) = report.charges_complete_since {
        writeln!(
            out,
            "charges counted from {} (retention)",
            since.to_rfc3339()
        )?;
    }
    writeln!(out, "{:<16}  violations", "check")?;
    for (check, n) in &report.counts {
        writeln!(out, "{:<16}  {n}", check.as_str())?;
    }
    if report.violations.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "{:<16}  {:<30}  detail", "check", "account")?;
    for v in &report.violations {
        writeln!(
            out,
            "{:<16}  {:<30}  {}",
            v.check.as_str(),
            v.account_id,
            v.detail
        )?;
    }
    if report.total() > report.violations.len() as u64 {
        writeln!(out, "(the first {MAX_LISTED} listed)")?;
    }
    Ok(())
}
