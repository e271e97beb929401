//! `sendgate ctl`: a client of a running sendgate's admin API
//! (`/v1/admin`), for pausing and resuming taking jobs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

/// What to ask of the running process (`sendgate ctl ACTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Action {
    /// Stop taking jobs: the batches in hand finish, prefetched jobs go back
    /// to the send queue; delivery reports are still applied. This process
    /// only, until resumed or restarted.
    Pause,
    /// Take jobs again.
    Resume,
    /// Whether it takes jobs: consuming, pausing or paused.
    Status,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach sendgate at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("sendgate at {url} refused the token ({status}): {message}")]
    Unauthorized {
        url: String,
        status: u16,
        message: String,
    },
    #[error("sendgate at {url} answered {status}: {message}")]
    Failed {
        url: String,
        status: u16,
        message: String,
    },
}

/// The URL a local process serves on, from its `[http] listen`: a wildcard
/// address is reached on loopback.
pub fn local_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Calls `action` on the sendgate at `base` (`http://host:port`) with
/// `token`; its JSON answer.
///
/// # Errors
/// [`CtlError`]: unreachable, a refused token, or another error answer.
pub async fn call(base: &str, token: &str, action: Action) -> Result<Value, CtlError> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::new();
    let request = match action {
        Action::Status => client.get(format!("{base}/v1/admin/consuming")),
        Action::Pause => client.post(format!("{base}/v1/admin/pause")),
        Action::Resume => client.post(format!("{base}/v1/admin/resume")),
    };
    let url = base.to_owned();
    let response = request
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|source| CtlError::Unreachable {
            url: url.clone(),
            source,
        })?;
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .map_err(|source| CtlError::Unreachable {
            url: url.clone(),
            source,
        })?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = body["error"]
        .as_str()
        .unwrap_or("no error message")
        .to_owned();
    Err(match status {
        401 | 403 => CtlError::Unauthorized {
            url,
            status,
            message,
        },
        // Without tokens the API (and so /v1/admin) is off.
        404 => CtlError::Failed {
            url,
            status,
            message: format!("{message} (is the API on? it needs [api] token)"),
        },
        _ => CtlError::Failed {
            url,
            status,
            message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        let url = |s: &str| local_url(s.parse().expect("an address"));
        assert_eq!(url("0.0.0.0:9400"), "http://127.0.0.1:9400");
        assert_eq!(url("[::]:9400"), "http://[::1]:9400");
        assert_eq!(url("10.0.0.5:9401"), "http://10.0.0.5:9401");
    }
}
