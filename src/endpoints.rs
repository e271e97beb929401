//! Connection strings that name several servers, split into one URL per
//! server: a broker cluster as a comma-separated list of node URLs, and a
//! Postgres primary with its standbys in libpq's multi-host form.
//!
//! ```text
//! amqp://u:p@h1:5672/%2f,amqp://u:p@h2:5672/%2f
//! postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write
//! ```
//!
//! A comma inside a password must be percent-encoded (`%2C`), as every
//! other reserved character already must.

/// The node URLs of a broker list, in the order given. Empty items (a
/// trailing comma) are skipped.
pub fn amqp_nodes(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .collect()
}

/// `host:port` of a node URL, for logs and metric labels (never its
/// credentials); the URL's own text when it does not parse.
pub fn node_label(node: &str) -> String {
    match url::Url::parse(node) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("localhost");
            match url.port_or_known_default().or(match url.scheme() {
                "amqps" => Some(5671),
                "amqp" => Some(5672),
                _ => None,
            }) {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            }
        }
        Err(_) => "<unparsable>".to_owned(),
    }
}

/// The query parameter libpq uses to pick a server from a host list.
const TARGET_SESSION_ATTRS: &str = "target_session_attrs";

/// One single-host URL per host of a Postgres URL, in the order given, with
/// `target_session_attrs` taken out (sendgate itself makes sure it uses
/// the writable server). A single-host URL comes back as it is.
///
/// # Errors
/// Not a `postgres://` or `postgresql://` URL, an empty host, or a
/// `target_session_attrs` other than `read-write`, `primary` or `any`:
/// sendgate writes, so it can only ever use the writable server.
pub fn postgres_hosts(url: &str) -> Result<Vec<String>, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "is not a URL (expected postgres://…)".to_owned())?;
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(format!(
            "has scheme `{scheme}`, expected one of postgres, postgresql"
        ));
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let tail = without_target_session_attrs(tail)?;
    if !hosts.contains(',') {
        return Ok(vec![format!("{scheme}://{userinfo}{hosts}{tail}")]);
    }
    hosts
        .split(',')
        .map(|host| {
            let host = host.trim();
            if host.is_empty() || host.starts_with(':') {
                return Err("names an empty host in its host list".to_owned());
            }
            Ok(format!("{scheme}://{userinfo}{host}{tail}"))
        })
        .collect()
}

/// `tail` (the path and query of a URL) without `target_session_attrs`,
/// checking its value.
fn without_target_session_attrs(tail: &str) -> Result<String, String> {
    let Some((path, query)) = tail.split_once('?') else {
        return Ok(tail.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != TARGET_SESSION_ATTRS {
            kept.push(pair);
            continue;
        }
        if !matches!(value, "read-write" | "primary" | "any") {
            return Err(format!(
                "has target_session_attrs={value}: sendgate writes, so it always uses the \
                 writable server (read-write, primary or any are accepted)"
            ));
        }
    }
    Ok(if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    })
}

/// The servers a connection string names, one URL each: Postgres hosts
/// for a `postgres` URL, else broker nodes.
pub fn servers(value: &str) -> Vec<String> {
    if value.starts_with("postgres") {
        postgres_hosts(value).unwrap_or_else(|_| vec![value.to_owned()])
    } else {
        amqp_nodes(value).into_iter().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_list_splits_on_commas_and_skips_empty_items() {
        assert_eq!(
            amqp_nodes("amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5673/%2f,"),
            ["amqp://u:p@h1:5672/%2f", "amqp://u:p@h2:5673/%2f"]
        );
        assert_eq!(amqp_nodes("amqp://h/%2f"), ["amqp://h/%2f"]);
    }

    #[test]
    fn node_labels_carry_host_and_port_but_never_credentials() {
        assert_eq!(node_label("amqp://u:secret@h1:5681/%2f"), "h1:5681");
        assert_eq!(node_label("amqp://h2/%2f"), "h2:5672");
        assert_eq!(node_label("amqps://u:secret@h3/v"), "h3:5671");
        assert_eq!(node_label("not a url"), "<unparsable>");
    }

    #[test]
    fn a_libpq_host_list_becomes_one_url_per_host() {
        assert_eq!(
            postgres_hosts(
                "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=require"
            )
            .expect("a valid host list"),
            [
                "postgres://u:p@h1:5432/db?sslmode=require",
                "postgres://u:p@h2:5433/db?sslmode=require"
            ]
        );
        assert_eq!(
            postgres_hosts("postgresql://h1,[::1]:5433?target_session_attrs=primary")
                .expect("a valid host list"),
            ["postgresql://h1", "postgresql://[::1]:5433"]
        );
    }

    #[test]
    fn a_single_host_url_comes_back_as_it_is() {
        let url = "postgres://u:p@db:5432/x?sslmode=disable";
        assert_eq!(postgres_hosts(url).expect("a valid URL"), [url]);
    }

    #[test]
    fn a_server_sendgate_cannot_write_to_is_refused() {
        let err = postgres_hosts("postgres://h1,h2/db?target_session_attrs=standby")
            .expect_err("a standby cannot take writes");
        assert!(err.contains("target_session_attrs=standby"), "{err}");
        assert!(postgres_hosts("postgres://h1,,h2/db").is_err());
        assert!(postgres_hosts("mysql://h1/db").is_err());
    }
}
