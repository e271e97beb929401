//! The `sendgate` command: parses the command line, answers the commands
//! that need no settings, loads the settings and hands over to [`cli`].

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command, exit};
use sendgate::config::{LogFormat, Settings};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; anything else is a usage error.
        Err(err) => {
            let _ = err.print();
            return match err.use_stderr() {
                false => ExitCode::SUCCESS,
                true => ExitCode::from(exit::USAGE),
            };
        }
    };
    // These need no settings: they work before any is written.
    let printed = match cli.command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "sendgate", &mut out);
            Some(Ok(()))
        }
        Command::Openapi => Some(
            std::io::stdout()
                .write_all(sendgate::http::openapi::yaml().as_bytes())
                .map_err(|err| format!("cannot write the OpenAPI document: {err}")),
        ),
        Command::Man => Some(
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|err| format!("cannot write the manual page: {err}")),
        ),
        _ => None,
    };
    if let Some(printed) = printed {
        return printed.map_or_else(
            |err| {
                eprintln!("sendgate: {err}");
                ExitCode::FAILURE
            },
            |()| ExitCode::SUCCESS,
        );
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("sendgate: {err}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let traces = match logging(&cli.command, &settings) {
        Ok(traces) => traces,
        Err(err) => {
            eprintln!("sendgate: configuration: {err}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let json_logs = settings.log.format == LogFormat::Json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sendgate: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let done = runtime.block_on(cli::execute(cli.command, settings));
    drop(traces);
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line either way; JSON when log pipelines read stderr.
            if json_logs {
                tracing::error!(error = %format!("{err:#}"), "sendgate failed");
            } else {
                eprintln!("sendgate: {err:#}");
            }
            ExitCode::from(exit::code(&err))
        }
    }
}

/// Installs logging; `run` also exports its spans when `[telemetry]
/// otlp_endpoint` is set (what is left is sent when the [`Traces`] is
/// dropped, at the end).
///
/// [`Traces`]: sendgate::telemetry::Traces
fn logging(
    command: &Command,
    settings: &Settings,
) -> Result<Option<sendgate::telemetry::Traces>, sendgate::telemetry::TracesError> {
    if matches!(command, Command::Run) {
        return sendgate::telemetry::init_with_traces(&settings.log, &settings.telemetry);
    }
    sendgate::telemetry::init(&settings.log);
    Ok(None)
}
