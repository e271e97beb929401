//! `sendgate ctl`: one call to the running process's admin API.

use std::io::Write;

use sendgate::config::Settings;

use super::CtlCommand;
use super::exit::BadCommandLine;

pub async fn execute(command: CtlCommand, settings: &Settings) -> anyhow::Result<()> {
    let url = command
        .url
        .unwrap_or_else(|| sendgate::ctl::local_url(settings.http.listen));
    let token = match command.token {
        Some(token) => token,
        None if !settings.api.token.is_empty() => settings.api.token.expose().to_owned(),
        None => {
            return Err(BadCommandLine(
                "no API token: pass --token or set SENDGATE_TOKEN (or [api] token / SENDGATE__API__TOKEN)"
                    .to_owned(),
            )
            .into());
        }
    };
    let answer = sendgate::ctl::call(&url, &token, command.action).await?;
    let mut out = std::io::stdout().lock();
    if command.json {
        serde_json::to_writer_pretty(&mut out, &answer)?;
        writeln!(out)?;
        return Ok(());
    }
    let state = answer["state"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{url} answered without a state: {answer}"))?;
    write!(out, "{url}: {state}")?;
    if let (Some(by), Some(at)) = (answer["changed_by"].as_str(), answer["changed_at"].as_str()) {
        let verb = if answer["paused"] == true {
            "paused"
        } else {
            "resumed"
        };
        write!(out, " ({verb} by {by} at {at})")?;
    }
    writeln!(out)?;
    Ok(())
}
