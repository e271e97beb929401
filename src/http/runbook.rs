//! `/runbook`: the runbook (`docs/runbook.md`) of this very build, as HTML
//! with an anchor on every heading, so an alert's `runbook_url` opens the
//! section for it with the procedures that match the running version.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use pulldown_cmark::{CowStr, Event, Parser, Tag, TagEnd};

const MARKDOWN: &str = include_str!("../../docs/runbook.md");

static PAGE: LazyLock<String> = LazyLock::new(|| render(MARKDOWN));

/// The anchor of a heading, as code hosts make them: lowercase letters,
/// digits, `-` and `_`, spaces as `-` (`SendgateDown` → `sendgatedown`).
fn anchor(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn render(markdown: &str) -> String {
    let mut events: Vec<Event> = Parser::new(markdown).collect();
    let mut i = 0;
    while i < events.len() {
        if let Event::Start(Tag::Heading { id: None, .. }) = &events[i] {
            let text: String = events[i + 1..]
                .iter()
                .take_while(|e| !matches!(e, Event::End(TagEnd::Heading(_))))
                .filter_map(|e| match e {
                    Event::Text(t) | Event::Code(t) => Some(t.as_ref()),
                    _ => None,
                })
                .collect();
            if let Event::Start(Tag::Heading { id, .. }) = &mut events[i] {
                *id = Some(CowStr::from(anchor(&text)));
            }
        }
        i += 1;
    }
    let mut body = String::new();
    pulldown_cmark::html::push_html(&mut body, events.into_iter());
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>sendgate runbook</title>\
         <style>body{{max-width:50rem;margin:2rem auto;padding:0 1rem;font-family:sans-serif;line-height:1.5}}\
         code,pre{{background:#f4f4f4}}pre{{padding:.5rem;overflow-x:auto}}</style>\
         </head><body>\n{body}</body></html>\n"
    )
}

/// The runbook of this build, one section per alert.
#[utoipa::path(get, path = "/runbook", operation_id = "getRunbook", tag = "operations", security(()),
    responses((status = 200, description = "The runbook, HTML; each alert's section is at `#<alert name in lowercase>`",
        content_type = "text/html; charset=utf-8", body = String)))]
pub(super) async fn runbook() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_links_to_a_section_of_the_runbook() {
        let alerts = include_str!("../../config/prometheus/alerts.yml");
        let page = render(MARKDOWN);
        let mut linked = 0;
        for line in alerts.lines() {
            let Some((_, fragment)) = line.split_once("runbook_url:") else {
                continue;
            };
            let anchor = fragment
                .rsplit_once('#')
                .map(|(_, a)| a.trim_end_matches(['"', '\'']))
                .expect("runbook_url ends with #section");
            assert!(
                page.contains(&format!("id=\"{anchor}\"")),
                "the runbook has no section #{anchor}"
            );
            linked += 1;
        }
        assert!(linked >= 10, "the alerts link to the runbook: {linked}");
    }

    #[test]
    fn headings_get_the_anchors_code_hosts_give_them() {
        let page = render("## SendgateDown\n\n## Drain a worker\n");
        assert!(
            page.contains("<h2 id=\"sendgatedown\">SendgateDown</h2>"),
            "{page}"
        );
        assert!(page.contains("<h2 id=\"drain-a-worker\">"), "{page}");
    }
}
