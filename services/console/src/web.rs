//! The console's HTTP side: routes, the assets it carries, the live watch
//! (WatchOrder as server-sent events) and the access rules every request
//! passes: the right host name, the password when one is set, and actions
//! only from the console's own pages.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use contracts::order::v1 as order;
use tokio_stream::Stream;

use crate::App;
use crate::pages;

/// Who may use the console.
pub struct Access {
    /// On loopback the console answers only to loopback host names, so a web
    /// page elsewhere cannot reach it by pointing a name of its own at 127.0.0.1.
    loopback_only: bool,
    password: Option<String>,
}

impl Access {
    pub fn new(addr: SocketAddr, password: Option<String>) -> Self {
        Access {
            loopback_only: addr.ip().is_loopback(),
            password,
        }
    }

    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        if !self.loopback_only {
            return true;
        }
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        matches!(name, "localhost" | "127.0.0.1" | "::1")
    }

    fn password_given(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.password else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let Some((_, password)) = given.as_deref().and_then(|g| g.split_once(':')) else {
            return false;
        };
        same(password.as_bytes(), expected.as_bytes())
    }
}

/// Compares in time that does not depend on where the texts differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An action must come from the console's own page: a header a form on
/// another site cannot send without the browser asking first (and the
/// console never says yes), and an Origin, when sent, that is this host.
fn action_allowed(headers: &HeaderMap) -> bool {
    if headers
        .get("x-console-action")
        .and_then(|v| v.to_str().ok())
        != Some("1")
    {
        return false;
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            let origin = origin.to_str().unwrap_or("");
            let host = host.to_str().unwrap_or("");
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
        (Some(_), None) => false,
    }
}

async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !app.access.host_allowed(headers) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers to localhost, 127.0.0.1 and [::1] only\n",
        )
            .into_response();
    }
    // The liveness probe tells nothing and needs no password.
    let probe = request.uri().path() == "/healthz";
    if !probe && !app.access.password_given(headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"saga console\", charset=\"UTF-8\"",
            )],
            "the console's password is needed (CONSOLE_PASSWORD)\n",
        )
            .into_response();
    }
    if request.method() == Method::POST && !action_allowed(headers) {
        return (
            StatusCode::FORBIDDEN,
            "actions are taken from the console's own pages only\n",
        )
            .into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Every route of the console.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(pages::root))
        .route("/orders", get(pages::orders))
        .route("/orders/rows", get(pages::orders_fragment))
        .route("/orders/{id}", get(pages::order_page))
        .route("/orders/{id}/live", get(pages::order_fragment))
        .route("/orders/{id}/watch", get(watch))
        .route("/api/orders/{id}/cancel", post(pages::cancel))
        .route("/choreography", get(pages::choreography))
        .route("/dead-letters", get(pages::dead_letters_overview))
        .route("/dead-letters/{service}", get(pages::dead_letters))
        .route("/dead-letters/{service}/{id}", get(pages::dead_letter))
        .route(
            "/api/dead-letters/{service}/{id}/replay",
            post(pages::replay),
        )
        .route("/stock", get(pages::stock))
        .route("/stock/rows", get(pages::stock_fragment))
        .route("/api/stock", post(pages::set_stock))
        .route("/health", get(pages::health_page))
        .route("/health/live", get(pages::health_fragment))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/assets/{name}", get(asset))
        .route(
            "/favicon.ico",
            get(|| async { asset(Path("favicon.svg".into())).await }),
        )
        .fallback(|| async {
            pages::Failure::not_found("there is no such page in the console: start at /orders")
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// The console's assets, carried in the binary: it works with no internet.
async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind): (&'static str, &str) = match name.as_str() {
        "console.css" => (
            include_str!("../assets/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_str!("../assets/console.js"),
            "text/javascript; charset=utf-8",
        ),
        "favicon.svg" => (include_str!("../assets/favicon.svg"), "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The order's status changes as server-sent events (`change`, then `end`
/// at a terminal status, or `problem` when the watch fails), from WatchOrder.
async fn watch(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Event>(16);
    let mut client = app.backend.order.clone();
    tokio::spawn(async move {
        let stream = client
            .watch_order(order::WatchOrderRequest { order_id: id })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                let _ = sender.send(problem(&status)).await;
                return;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(change)) => {
                    let status = crate::html::status_name(change.status());
                    let terminal = crate::html::is_terminal(change.status());
                    let data = serde_json::json!({
                        "status": status,
                        "reason": change.reason,
                        "sequence": change.sequence,
                    });
                    if sender
                        .send(Event::default().event("change").data(data.to_string()))
                        .await
                        .is_err()
                    {
                        return; // the page went away
                    }
                    if terminal {
                        let _ = sender
                            .send(Event::default().event("end").data(status))
                            .await;
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = sender.send(problem(&status)).await;
                    return;
                }
            }
        }
    });
    let events = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
        Ok::<_, Infallible>,
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The watch failed: the page says why and its browser tries again.
fn problem(status: &tonic::Status) -> Event {
    Event::default()
        .event("problem")
        .data(crate::backend::explain("watching the order", status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn on_loopback_only_loopback_names_are_answered() {
        let access = Access::new("127.0.0.1:8080".parse().unwrap(), None);
        for host in [
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "localhost",
        ] {
            assert!(access.host_allowed(&headers(&[("host", host)])), "{host}");
        }
        for host in [
            "evil.example",
            "127.0.0.1.evil.example:8080",
            "localhost.evil:8080",
        ] {
            assert!(!access.host_allowed(&headers(&[("host", host)])), "{host}");
        }
        assert!(!access.host_allowed(&headers(&[])));
        let open = Access::new("0.0.0.0:8080".parse().unwrap(), Some("pw".into()));
        assert!(open.host_allowed(&headers(&[("host", "console.example")])));
    }

    #[test]
    fn an_action_needs_the_pages_header_and_a_matching_origin() {
        let own = [("host", "localhost:8080"), ("x-console-action", "1")];
        assert!(action_allowed(&headers(&own)));
        let mut same_origin = own.to_vec();
        same_origin.push(("origin", "http://localhost:8080"));
        assert!(action_allowed(&headers(&same_origin)));
        let mut cross = own.to_vec();
        cross.push(("origin", "http://evil.example"));
        assert!(!action_allowed(&headers(&cross)));
        assert!(!action_allowed(&headers(&[("host", "localhost:8080")])));
    }
}
