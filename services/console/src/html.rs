//! Pages as text: escaping, the layout every page shares, and the small
//! pieces (status badges, times) the pages have in common.
use std::fmt::Write as _;

use axum::response::Html;
use contracts::order::v1::OrderStatus;

/// Text made safe for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string value.
pub fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The sections in the navigation bar: (path, label).
const SECTIONS: [(&str, &str); 5] = [
    ("/orders", "Orders"),
    ("/choreography", "Choreography"),
    ("/dead-letters", "Dead letters"),
    ("/stock", "Stock"),
    ("/health", "Health"),
];

/// A whole page: `section` is the path of the navigation entry it belongs to.
pub fn page(title: &str, section: &str, body: &str) -> Html<String> {
    let mut nav = String::new();
    for (path, label) in SECTIONS {
        let current = if path == section {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{path}\"{current}>{label}</a>");
    }
    Html(format!(
        "<!doctype html>
<html lang=\"en\">
<head>
<meta charset=\"utf-8\">
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>{title} · saga console</title>
<link rel=\"icon\" href=\"/assets/favicon.svg\" type=\"image/svg+xml\">
<link rel=\"stylesheet\" href=\"/assets/console.css\">
<script src=\"/assets/console.js\" defer></script>
</head>
<body>
<header><a class=\"brand\" href=\"/orders\">saga console</a><nav>{nav}</nav></header>
<main>
<h1>{title}</h1>
{body}
</main>
</body>
</html>
",
        title = esc(title),
    ))
}

/// A status's short name: `COMPLETED`.
pub fn status_name(status: OrderStatus) -> &'static str {
    status.as_str_name().trim_start_matches("ORDER_STATUS_")
}

/// Whether the saga of an order in `status` has ended.
pub fn is_terminal(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Completed | OrderStatus::Cancelled)
}

/// A status as a coloured badge.
pub fn status_badge(status: OrderStatus) -> String {
    let name = status_name(status);
    format!(
        "<span class=\"badge status-{}\">{name}</span>",
        name.to_ascii_lowercase()
    )
}

/// Any enum's short name from its proto name, e.g. `RESERVATION_STATUS_HELD` -> `HELD`.
pub fn short(proto_name: &str, prefix: &str) -> String {
    proto_name.trim_start_matches(prefix).to_owned()
}

pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    match at.and_then(to_utc) {
        Some(at) => format!(
            "<time datetime=\"{}\">{}</time>",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            at.format("%Y-%m-%d %H:%M:%S%.3f")
        ),
        None => "—".into(),
    }
}

pub fn to_utc(at: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(at.seconds, at.nanos.max(0) as u32)
}

/// A banner: `kind` is `error`, `notice` or `ok`.
pub fn banner(kind: &str, text: &str) -> String {
    format!(
        "<p class=\"banner {kind}\" role=\"status\">{}</p>",
        esc(text)
    )
}
