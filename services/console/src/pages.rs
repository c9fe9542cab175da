//! Every page and fragment of the console, each built from the services'
//! answers at the moment it is asked for.
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use choreo::Decode as _;
use contracts::inventory::v1 as inventory;
use contracts::notification::v1 as notification;
use contracts::order::v1::{self as order, OrderStatus};
use contracts::shipping::v1 as shipping;
use serde::Deserialize;

use crate::App;
use crate::backend::explain;
use crate::health;
use crate::html::{
    banner, esc, is_terminal, page, short, status_badge, status_name, time, url_encode,
};

/// The statuses a person filters by, in saga order.
const STATUSES: [OrderStatus; 6] = [
    OrderStatus::Pending,
    OrderStatus::Reserved,
    OrderStatus::Scheduled,
    OrderStatus::Cancelling,
    OrderStatus::Completed,
    OrderStatus::Cancelled,
];

fn parse_status(text: &str) -> Option<OrderStatus> {
    OrderStatus::from_str_name(&format!("ORDER_STATUS_{}", text.to_ascii_uppercase()))
        .filter(|s| *s != OrderStatus::Unspecified)
}

/// A page that could not be built: its status code and what to tell the
/// person (plain text: the page escapes it).
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let title = if self.0 == StatusCode::NOT_FOUND {
            "Not found"
        } else {
            "Something failed"
        };
        (self.0, page(title, "", &banner("error", &self.1))).into_response()
    }
}

impl Failure {
    pub fn not_found(why: &str) -> Self {
        Failure(StatusCode::NOT_FOUND, why.to_owned())
    }
}

fn grpc_failure(what: &str, status: &tonic::Status) -> Failure {
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    Failure(code, explain(what, status))
}

// ---------------------------------------------------------------- orders

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub stuck: String,
    /// An order id (opens it) or a customer.
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub after: String,
}

impl ListQuery {
    fn stuck_only(&self) -> bool {
        matches!(self.stuck.as_str(), "1" | "on" | "true")
    }

    /// This query as a query string, with `status` replaced.
    fn with_status(&self, status: &str) -> String {
        let mut parts = Vec::new();
        if !status.is_empty() {
            parts.push(format!("status={}", url_encode(status)));
        }
        if self.stuck_only() {
            parts.push("stuck=1".into());
        }
        if !self.q.trim().is_empty() {
            parts.push(format!("q={}", url_encode(self.q.trim())));
        }
        parts.join("&")
    }
}

pub async fn root() -> Redirect {
    Redirect::to("/orders")
}

pub async fn orders(
    State(app): State<App>,
    Query(query): Query<ListQuery>,
) -> Result<Response, Failure> {
    let q = query.q.trim();
    if !q.is_empty() && uuid::Uuid::parse_str(q).is_ok() {
        return Ok(Redirect::to(&format!("/orders/{}", url_encode(q))).into_response());
    }
    let rows = order_rows(&app, &query).await;
    let mut body = String::new();
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/orders\" role=\"search\">\
         <label>Order id or customer <input type=\"search\" name=\"q\" value=\"{q}\" placeholder=\"01a2… or ada\"></label>\
         <label>Status <select name=\"status\"><option value=\"\">any</option>{options}</select></label>\
         <label class=\"check\"><input type=\"checkbox\" name=\"stuck\" value=\"1\"{stuck}> stuck only</label>\
         <button type=\"submit\">Show</button> <a href=\"/orders\">clear</a></form>",
        q = esc(q),
        options = STATUSES
            .iter()
            .map(|s| {
                let name = status_name(*s);
                let selected = if query.status.eq_ignore_ascii_case(name) {
                    " selected"
                } else {
                    ""
                };
                format!("<option value=\"{name}\"{selected}>{name}</option>")
            })
            .collect::<String>(),
        stuck = if query.stuck_only() { " checked" } else { "" },
    );
    let refresh = format!("/orders/rows?{}", fragment_query(&query));
    let _ = write!(
        body,
        "<div id=\"orders\" data-refresh=\"{}\" data-every=\"2000\">{rows}</div>",
        esc(&refresh)
    );
    Ok(page("Orders", "/orders", &body).into_response())
}

fn fragment_query(query: &ListQuery) -> String {
    let mut text = query.with_status(&query.status);
    if !query.after.is_empty() {
        if !text.is_empty() {
            text.push('&');
        }
        text.push_str(&format!("after={}", url_encode(&query.after)));
    }
    text
}

/// The counts and the table of the orders page, refreshed live.
pub async fn orders_fragment(
    State(app): State<App>,
    Query(query): Query<ListQuery>,
) -> Html<String> {
    Html(order_rows(&app, &query).await)
}

async fn order_rows(app: &App, query: &ListQuery) -> String {
    let mut out = String::new();
    match app
        .backend
        .order
        .clone()
        .count_orders(order::CountOrdersRequest {})
        .await
    {
        Ok(counts) => {
            let counts = counts.into_inner();
            let total: u64 = counts.counts.iter().map(|c| c.count).sum();
            out.push_str("<ul class=\"counts\">");
            let all_current = query.status.is_empty() && !query.stuck_only();
            let _ = write!(
                out,
                "<li><a href=\"/orders?{}\"{}>all <b data-count=\"ALL\">{total}</b></a></li>",
                esc(&query.with_status("")),
                if all_current {
                    " aria-current=\"true\""
                } else {
                    ""
                }
            );
            for status in STATUSES {
                let name = status_name(status);
                let n = counts
                    .counts
                    .iter()
                    .find(|c| c.status() == status)
                    .map_or(0, |c| c.count);
                let current = query.status.eq_ignore_ascii_case(name);
                let _ = write!(
                    out,
                    "<li class=\"status-{lower}\"><a href=\"/orders?{link}\"{cur}>{name} <b data-count=\"{name}\">{n}</b></a></li>",
                    lower = name.to_ascii_lowercase(),
                    link = esc(&query.with_status(name)),
                    cur = if current {
                        " aria-current=\"true\""
                    } else {
                        ""
                    },
                );
            }
            let _ = write!(
                out,
                "<li class=\"stuck\"><a href=\"/orders?stuck=1\">stuck <b data-count=\"STUCK\">{}</b></a></li></ul>",
                counts.stuck
            );
        }
        Err(status) => out.push_str(&banner("error", &explain("order counts", &status))),
    }
    let status = if query.status.is_empty() {
        OrderStatus::Unspecified
    } else {
        match parse_status(&query.status) {
            Some(s) => s,
            None => {
                out.push_str(&banner(
                    "error",
                    &format!("{:?} is not a status; pick one from the list", query.status),
                ));
                return out;
            }
        }
    };
    let listed = app
        .backend
        .order
        .clone()
        .list_orders(order::ListOrdersRequest {
            status: status as i32,
            page_size: 50,
            page_token: query.after.clone(),
            stuck_only: query.stuck_only(),
            customer: query.q.trim().to_owned(),
        })
        .await;
    let listed = match listed {
        Ok(listed) => listed.into_inner(),
        Err(status) => {
            out.push_str(&banner("error", &explain("listing orders", &status)));
            return out;
        }
    };
    if listed.orders.is_empty() {
        out.push_str("<p class=\"empty\">No orders match.</p>");
        return out;
    }
    out.push_str(
        "<table class=\"orders\"><thead><tr><th>order</th><th>status</th><th>customer</th><th>items</th>\
         <th>placed (UTC)</th><th>reason</th></tr></thead><tbody>",
    );
    for o in &listed.orders {
        let items = lines(o.items.iter().map(|i| (i.sku.as_str(), i.quantity)));
        let stuck = if o.stuck.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"badge stuck\" title=\"{}\">STUCK</span>",
                esc(&o.stuck)
            )
        };
        let _ = write!(
            out,
            "<tr data-order-id=\"{id}\" data-status=\"{status}\"><td><a class=\"mono\" href=\"/orders/{id}\">{id}</a></td>\
             <td>{badge}{stuck}</td><td>{customer}</td><td>{items}</td><td>{placed}</td><td class=\"reason\">{reason}</td></tr>",
            id = esc(&o.order_id),
            status = status_name(o.status()),
            badge = status_badge(o.status()),
            customer = esc(&o.customer),
            placed = time(o.created_at.as_ref()),
            reason = esc(&o.reason),
        );
    }
    out.push_str("</tbody></table>");
    if !listed.next_page_token.is_empty() {
        let mut next = query.with_status(&query.status);
        if !next.is_empty() {
            next.push('&');
        }
        next.push_str(&format!("after={}", url_encode(&listed.next_page_token)));
        let _ = write!(
            out,
            "<p class=\"pager\"><a href=\"/orders\">newest</a> <a rel=\"next\" href=\"/orders?{}\">older →</a></p>",
            esc(&next)
        );
    } else if !query.after.is_empty() {
        out.push_str("<p class=\"pager\"><a href=\"/orders\">newest</a></p>");
    }
    out
}

/// Order or reservation lines as a person reads them: `BOOK ×2, PEN ×1`.
fn lines<'a>(lines: impl Iterator<Item = (&'a str, u32)>) -> String {
    lines
        .map(|(sku, quantity)| format!("{} ×{quantity}", esc(sku)))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------- one order

fn order_id(text: &str) -> Result<String, Failure> {
    uuid::Uuid::parse_str(text)
        .map(|id| id.to_string())
        .map_err(|_| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("{text:?} is not an order id"),
            )
        })
}

pub async fn order_page(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Html<String>, Failure> {
    let found = fetch_order(&app, &id).await?;
    let id = found.order_id.clone();
    let live = order_live(&app, &found).await;
    let terminal = is_terminal(found.status());
    let watch = if terminal {
        String::new()
    } else {
        format!(" data-watch=\"/orders/{}/watch\"", esc(&id))
    };
    let cancel = if terminal {
        String::new()
    } else {
        format!(
            "<form class=\"action\" id=\"cancel\" data-action=\"/api/orders/{id}/cancel\">\
             <label>Reason <input name=\"reason\" maxlength=\"500\" placeholder=\"why this order is cancelled\"></label>\
             <button type=\"submit\" class=\"danger\">Cancel order</button><output data-result></output></form>",
            id = esc(&id)
        )
    };
    let body = format!(
        "<p class=\"crumbs\"><a href=\"/orders\">← orders</a> <span class=\"mono\">{id}</span> <span id=\"watch-state\">{state}</span></p>\
         <div id=\"live\" data-live=\"/orders/{id}/live\"{watch}>{live}</div>{cancel}",
        id = esc(&id),
        state = if terminal {
            "the saga has ended"
        } else {
            "connecting…"
        },
    );
    Ok(page(&format!("Order {}", short_id(&id)), "/orders", &body))
}

fn short_id(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

pub async fn order_fragment(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Html<String>, Failure> {
    let found = fetch_order(&app, &id).await?;
    Ok(Html(order_live(&app, &found).await))
}

/// The order `text` names, as the order service tells it.
async fn fetch_order(app: &App, text: &str) -> Result<order::Order, Failure> {
    let id = order_id(text)?;
    Ok(app
        .backend
        .order
        .clone()
        .get_order(order::GetOrderRequest {
            order_id: id.clone(),
        })
        .await
        .map_err(|s| grpc_failure(&format!("order {id}"), &s))?
        .into_inner())
}

/// Status, the diagram and each service's effects: what the live region shows.
async fn order_live(app: &App, o: &order::Order) -> String {
    let mut out = String::new();
    let stuck = if o.stuck.is_empty() {
        String::new()
    } else {
        format!(
            "<dt>stuck</dt><dd class=\"stuck\" data-field=\"stuck\">{}</dd>",
            esc(&o.stuck)
        )
    };
    let items = lines(o.items.iter().map(|i| (i.sku.as_str(), i.quantity)));
    let _ = write!(
        out,
        "<section class=\"summary\"><dl>\
         <dt>status</dt><dd data-field=\"status\" data-status=\"{status}\">{badge}</dd>\
         <dt>reason</dt><dd data-field=\"reason\">{reason}</dd>{stuck}\
         <dt>customer</dt><dd>{customer}</dd><dt>destination</dt><dd>{destination}</dd>\
         <dt>items</dt><dd>{items}</dd><dt>placed</dt><dd>{placed}</dd><dt>last change</dt><dd>{updated}</dd></dl></section>",
        status = status_name(o.status()),
        badge = status_badge(o.status()),
        reason = if o.reason.is_empty() {
            "—".to_owned()
        } else {
            esc(&o.reason)
        },
        customer = esc(&o.customer),
        destination = esc(&o.destination),
        placed = time(o.created_at.as_ref()),
        updated = time(o.updated_at.as_ref()),
    );
    let _ = write!(
        out,
        "<section class=\"saga\"><h2>Saga</h2><p class=\"legend\"><span class=\"key forward\">happy path</span>\
         <span class=\"key failure\">failure</span><span class=\"key compensation\">compensation</span>\
         <span class=\"key stuck\">stuck</span> arrows: what caused what</p><div class=\"scroll\">{}</div>",
        crate::swimlane::render(&contracts::CHOREOGRAPHY, o)
    );
    out.push_str("<table class=\"timeline\"><thead><tr><th>time (UTC)</th><th>event</th><th>by</th><th>what it says</th></tr></thead><tbody>");
    for e in &o.timeline {
        let kind = crate::swimlane::kind(&contracts::CHOREOGRAPHY, &e.event_type);
        let _ = write!(
            out,
            "<tr class=\"ev-{kind}\"><td>{at}</td><td class=\"mono\">{ty}</td><td>{by}</td><td>{detail}</td></tr>",
            at = time(e.occurred_at.as_ref()),
            ty = esc(&e.event_type),
            by = esc(&e.producer),
            detail = esc(&e.detail),
        );
    }
    out.push_str("</tbody></table></section>");
    out.push_str(&effects(app, &o.order_id).await);
    out
}

/// What each service did for the order, from its own API.
async fn effects(app: &App, id: &str) -> String {
    let b = &app.backend;
    let (mut inventory, mut shipping, mut notification) = (
        b.inventory.clone(),
        b.shipping.clone(),
        b.notification.clone(),
    );
    let (reservation, shipment, notes) = tokio::join!(
        inventory.get_reservation(inventory::GetReservationRequest {
            order_id: id.into()
        }),
        shipping.get_shipment(shipping::GetShipmentRequest {
            order_id: id.into()
        }),
        notification.list_notifications(notification::ListNotificationsRequest {
            order_id: id.into()
        }),
    );
    let mut out = String::from("<section class=\"effects\"><h2>Effects</h2><div class=\"cards\">");
    let missing = |what: &str, s: &tonic::Status| {
        if s.code() == tonic::Code::NotFound {
            "<p class=\"empty\">none</p>".to_owned()
        } else {
            banner("error", &explain(what, s))
        }
    };
    out.push_str("<article data-effect=\"inventory\"><h3>inventory · reservation</h3>");
    match reservation {
        Ok(r) => {
            let r = r.into_inner();
            let held = lines(r.lines.iter().map(|l| (l.sku.as_str(), l.quantity)));
            let _ = write!(
                out,
                "<p><span class=\"badge effect\" data-field=\"reservation\">{}</span></p><p>{}</p><p class=\"reason\">{}</p>",
                short(r.status().as_str_name(), "RESERVATION_STATUS_"),
                held,
                esc(&r.reason)
            );
        }
        Err(s) => out.push_str(&missing("reservation", &s)),
    }
    out.push_str("</article><article data-effect=\"shipping\"><h3>shipping · shipment</h3>");
    match shipment {
        Ok(s) => {
            let s = s.into_inner();
            let _ = write!(
                out,
                "<p><span class=\"badge effect\" data-field=\"shipment\">{}</span></p><p>{} {} {}</p><p class=\"reason\">{}</p>",
                short(s.status().as_str_name(), "SHIPMENT_STATUS_"),
                esc(&s.shipment_id),
                esc(&s.carrier),
                esc(&s.destination),
                esc(&s.reason)
            );
        }
        Err(s) => out.push_str(&missing("shipment", &s)),
    }
    out.push_str(
        "</article><article data-effect=\"notification\"><h3>notification · messages</h3>",
    );
    match notes {
        Ok(n) => {
            let n = n.into_inner();
            if n.notifications.is_empty() {
                out.push_str("<p class=\"empty\">none</p>");
            }
            for m in &n.notifications {
                let _ = write!(
                    out,
                    "<p><span class=\"badge effect\" data-field=\"notification\">{kind} {status}</span> to {to} by {channel}, {attempts} attempt(s){err}</p>",
                    kind = short(m.kind().as_str_name(), "NOTIFICATION_KIND_"),
                    status = short(m.status().as_str_name(), "NOTIFICATION_STATUS_"),
                    to = esc(&m.recipient),
                    channel = esc(&m.channel),
                    attempts = m.attempts,
                    err = if m.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", esc(&m.last_error))
                    },
                );
            }
            if !n.note.is_empty() {
                let _ = write!(out, "<p class=\"reason\">{}</p>", esc(&n.note));
            }
        }
        Err(s) => out.push_str(&missing("notifications", &s)),
    }
    out.push_str("</article></div></section>");
    out
}

#[derive(Deserialize)]
pub struct CancelRequest {
    #[serde(default)]
    reason: String,
}

/// What an action answers the page: whether it worked and what to say.
#[derive(serde::Serialize)]
pub struct Answer {
    ok: bool,
    message: String,
}

impl Answer {
    fn ok(message: String) -> axum::Json<Answer> {
        axum::Json(Answer { ok: true, message })
    }
    fn failed(message: String) -> axum::Json<Answer> {
        axum::Json(Answer { ok: false, message })
    }
}

pub async fn cancel(
    State(app): State<App>,
    Path(id): Path<String>,
    axum::Json(request): axum::Json<CancelRequest>,
) -> axum::Json<Answer> {
    let answer = app
        .backend
        .order
        .clone()
        .cancel_order(order::CancelOrderRequest {
            order_id: id.clone(),
            reason: request.reason,
        })
        .await;
    match answer {
        Ok(o) => {
            let o = o.into_inner();
            tracing::info!(order_id = %id, "cancelled from the console");
            Answer::ok(format!(
                "order is {}: {}",
                status_name(o.status()),
                o.reason
            ))
        }
        Err(s) => Answer::failed(explain("cancel", &s)),
    }
}

// ---------------------------------------------------------------- choreography

pub async fn choreography() -> Html<String> {
    let c = &contracts::CHOREOGRAPHY;
    let mut body = format!(
        "<p>Drawn from the saga's declaration (<code>contracts::CHOREOGRAPHY</code>): the happy path, then each step's \
         failure and the cancel walking back, right to left, through the compensation of every step that did work.</p>\
         <p class=\"legend\"><span class=\"key forward\">happy path</span><span class=\"key failure\">failure</span>\
         <span class=\"key compensation\">compensation</span></p><div class=\"scroll\">{}</div>",
        crate::diagram::render(c)
    );
    body.push_str("<h2>Events</h2><table><thead><tr><th>event</th><th>by</th><th>payload</th><th>versions</th><th>consumed by</th></tr></thead><tbody>");
    for e in c.events {
        let consumers: Vec<String> = e
            .consumers
            .iter()
            .map(|(s, role)| format!("{s} ({role:?})"))
            .collect();
        let _ = write!(
            body,
            "<tr class=\"ev-{kind}\"><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td><td>{:?}</td><td>{}</td></tr>",
            e.name,
            e.producer,
            e.payload,
            e.versions,
            esc(&consumers.join(", ")),
            kind = crate::swimlane::kind(c, e.name),
        );
    }
    body.push_str("</tbody></table><h2>Steps</h2><table><thead><tr><th>step</th><th>owner</th><th>trigger</th><th>success</th><th>failure</th><th>undone by</th><th>compensation</th></tr></thead><tbody>");
    for s in c.steps {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            s.name,
            s.owner,
            s.trigger,
            s.success,
            s.failure,
            s.compensated_by.join(", "),
            s.compensation
        );
    }
    body.push_str("</tbody></table>");
    page("Choreography", "/choreography", &body)
}

// ---------------------------------------------------------------- dead letters

fn tabs(app: &App, current: &str) -> String {
    let mut out = String::from("<nav class=\"tabs\">");
    for s in &app.backend.services {
        let cur = if s.name == current {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(out, "<a href=\"/dead-letters/{0}\"{cur}>{0}</a>", s.name);
    }
    out.push_str("</nav>");
    out
}

pub async fn dead_letters_overview(State(app): State<App>) -> Html<String> {
    let mut body = tabs(&app, "");
    if let Some(why) = app.backend.admin_missing {
        body.push_str(&banner("notice", why));
    }
    body.push_str("<table><thead><tr><th>service</th><th>dead letters</th></tr></thead><tbody>");
    let lists = futures::future::join_all(app.backend.services.iter().map(|s| async move {
        (
            s.name,
            s.dead_letters
                .clone()
                .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 1000 })
                .await,
        )
    }))
    .await;
    for (name, listed) in lists {
        let cell = match listed {
            Ok(l) => l.into_inner().dead_letters.len().to_string(),
            Err(s) => esc(&explain("dead letters", &s)),
        };
        let _ = write!(
            body,
            "<tr><td><a href=\"/dead-letters/{name}\">{name}</a></td><td data-dead-letters=\"{name}\">{cell}</td></tr>"
        );
    }
    body.push_str("</tbody></table>");
    page("Dead letters", "/dead-letters", &body)
}

pub async fn dead_letters(
    State(app): State<App>,
    Path(service): Path<String>,
) -> Result<Html<String>, Failure> {
    let s = app
        .backend
        .service(&service)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no service {service:?}")))?;
    let mut body = tabs(&app, s.name);
    let listed = s
        .dead_letters
        .clone()
        .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 1000 })
        .await;
    match listed {
        Err(status) => body.push_str(&banner("error", &explain("dead letters", &status))),
        Ok(l) => {
            let letters = l.into_inner().dead_letters;
            if letters.is_empty() {
                let _ = write!(
                    body,
                    "<p class=\"empty\">{} has parked nothing.</p>",
                    s.name
                );
            } else {
                body.push_str("<table class=\"dead-letters\"><thead><tr><th>id</th><th>parked (UTC)</th><th>subject</th><th>stream seq</th><th>size</th><th>replays</th><th>reason</th></tr></thead><tbody>");
                for d in letters {
                    let _ = write!(
                        body,
                        "<tr data-dead-letter=\"{id}\"><td><a href=\"/dead-letters/{svc}/{id}\">{id}</a></td><td>{at}</td><td class=\"mono\">{subject}</td><td>{seq}</td><td>{size} B</td><td>{replays}</td><td class=\"reason\">{reason}</td></tr>",
                        id = d.id,
                        svc = s.name,
                        at = time(d.parked_at.as_ref()),
                        subject = esc(&d.subject),
                        seq = d.stream_seq,
                        size = d.size,
                        replays = d.replays,
                        reason = esc(&d.reason),
                    );
                }
                body.push_str("</tbody></table>");
            }
        }
    }
    Ok(page(
        &format!("Dead letters · {}", s.name),
        "/dead-letters",
        &body,
    ))
}

pub async fn dead_letter(
    State(app): State<App>,
    Path((service, id)): Path<(String, i64)>,
) -> Result<Html<String>, Failure> {
    let s = app
        .backend
        .service(&service)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no service {service:?}")))?;
    let d = s
        .dead_letters
        .clone()
        .get_dead_letter(choreo::proto::GetDeadLetterRequest { id })
        .await
        .map_err(|st| grpc_failure(&format!("dead letter {id} of {}", s.name), &st))?
        .into_inner();
    let mut body = format!(
        "<p class=\"crumbs\"><a href=\"/dead-letters/{svc}\">← {svc}'s dead letters</a></p>\
         <dl class=\"summary\"><dt>reason</dt><dd data-field=\"reason\">{reason}</dd><dt>subject</dt><dd class=\"mono\">{subject}</dd>\
         <dt>parked</dt><dd>{at}</dd><dt>stream</dt><dd>{stream} #{seq}</dd><dt>size</dt><dd>{size} bytes</dd><dt>replays</dt><dd>{replays}</dd></dl>\
         <form class=\"action\" id=\"replay\" data-action=\"/api/dead-letters/{svc}/{id}/replay\"><button type=\"submit\">Replay</button>\
         <output data-result></output></form>",
        svc = s.name,
        reason = esc(&d.reason),
        subject = esc(&d.subject),
        at = time(d.parked_at.as_ref()),
        stream = esc(&d.stream),
        seq = d.stream_seq,
        size = d.size,
        replays = d.replays,
    );
    body.push_str("<h2>Decoded</h2>");
    body.push_str(&decoded(&d.raw));
    let _ = write!(
        body,
        "<h2>Raw bytes</h2><pre class=\"hex\" data-field=\"hex\">{}</pre>",
        esc(&hex_dump(&d.raw))
    );
    Ok(page(
        &format!("Dead letter {id} · {}", s.name),
        "/dead-letters",
        &body,
    ))
}

/// The message read as far as it can be: the envelope, then its payload.
fn decoded(raw: &[u8]) -> String {
    match choreo::Envelope::from_bytes(raw) {
        Err(reject) => {
            let mut out = banner("notice", &format!("not an envelope: {reject}"));
            if let Ok(text) = std::str::from_utf8(raw)
                && !text.chars().any(|c| c.is_control() && !c.is_whitespace())
            {
                let _ = write!(
                    out,
                    "<p>As text:</p><pre data-field=\"text\">{}</pre>",
                    esc(text)
                );
            }
            out
        }
        Ok(envelope) => {
            let mut out = format!(
                "<dl class=\"summary\" data-field=\"envelope\"><dt>event id</dt><dd class=\"mono\">{}</dd><dt>type</dt><dd class=\"mono\">{}</dd>\
                 <dt>version</dt><dd>{}</dd><dt>order</dt><dd class=\"mono\">{}</dd><dt>caused by</dt><dd class=\"mono\">{}</dd>\
                 <dt>producer</dt><dd>{}</dd><dt>occurred</dt><dd>{}</dd><dt>payload</dt><dd>{} bytes</dd></dl>",
                esc(&envelope.event_id),
                esc(&envelope.event_type),
                envelope.schema_version,
                esc(&envelope.saga_id),
                esc(&envelope.causation_id),
                esc(&envelope.producer),
                time(envelope.occurred_at.as_ref()),
                envelope.payload.len(),
            );
            match contracts::SagaEvent::decode(&envelope) {
                Ok(event) => {
                    let _ = write!(
                        out,
                        "<pre data-field=\"payload\">{}</pre>",
                        esc(&format!("{event:#?}"))
                    );
                }
                Err(reject) => {
                    out.push_str(&banner("notice", &format!("payload not read: {reject}")))
                }
            }
            out
        }
    }
}

/// 16 bytes a line: offset, hex, printable ASCII.
fn hex_dump(raw: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in raw.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, "{:08x}  {:<47}  {text}", i * 16, hex.join(" "));
    }
    if raw.is_empty() {
        out.push_str("(empty)");
    }
    out
}

pub async fn replay(
    State(app): State<App>,
    Path((service, id)): Path<(String, i64)>,
) -> axum::Json<Answer> {
    let Some(s) = app.backend.service(&service) else {
        return Answer::failed(format!("no service {service:?}"));
    };
    match s
        .dead_letters
        .clone()
        .replay_dead_letter(choreo::proto::ReplayDeadLetterRequest { id })
        .await
    {
        Ok(r) => {
            tracing::info!(
                service = s.name,
                dead_letter = id,
                "replayed from the console"
            );
            Answer::ok(format!(
                "{}: the message was handled and left the dead letters",
                r.into_inner().outcome
            ))
        }
        Err(status) => Answer::failed(explain("replay", &status)),
    }
}

// ---------------------------------------------------------------- stock

pub async fn stock(State(app): State<App>) -> Html<String> {
    let mut body = String::new();
    if let Some(why) = app.backend.admin_missing {
        body.push_str(&banner("notice", why));
    }
    body.push_str(
        "<form class=\"action\" id=\"set-stock\" data-action=\"/api/stock\"><label>SKU <input name=\"sku\" required maxlength=\"64\"></label>\
         <label>available <input name=\"available\" type=\"number\" min=\"0\" required></label><button type=\"submit\">Set stock</button>\
         <output data-result></output></form>",
    );
    let _ = write!(
        body,
        "<div data-refresh=\"/stock/rows\" data-every=\"3000\">{}</div>",
        stock_rows(&app).await
    );
    page("Stock", "/stock", &body)
}

pub async fn stock_fragment(State(app): State<App>) -> Html<String> {
    Html(stock_rows(&app).await)
}

async fn stock_rows(app: &App) -> String {
    match app
        .backend
        .inventory
        .clone()
        .list_stock(inventory::ListStockRequest {})
        .await
    {
        Err(s) => banner("error", &explain("stock", &s)),
        Ok(l) => {
            let mut out = String::from(
                "<table><thead><tr><th>SKU</th><th>available</th><th>reserved</th></tr></thead><tbody>",
            );
            for i in l.into_inner().items {
                let _ = write!(
                    out,
                    "<tr data-sku=\"{0}\"><td class=\"mono\">{0}</td><td>{1}</td><td>{2}</td></tr>",
                    esc(&i.sku),
                    i.available,
                    i.reserved
                );
            }
            out.push_str("</tbody></table>");
            out
        }
    }
}

#[derive(Deserialize)]
pub struct SetStock {
    sku: String,
    available: String,
}

pub async fn set_stock(
    State(app): State<App>,
    axum::Json(request): axum::Json<SetStock>,
) -> axum::Json<Answer> {
    let Ok(available) = request.available.trim().parse::<u64>() else {
        return Answer::failed(format!(
            "available {:?} is not a whole number of units",
            request.available
        ));
    };
    match app
        .backend
        .inventory_admin
        .clone()
        .set_stock(inventory::SetStockRequest {
            sku: request.sku.trim().to_owned(),
            available,
        })
        .await
    {
        Ok(s) => {
            let s = s.into_inner();
            Answer::ok(format!(
                "{}: {} available, {} reserved",
                s.sku, s.available, s.reserved
            ))
        }
        Err(status) => Answer::failed(explain("set stock", &status)),
    }
}

// ---------------------------------------------------------------- health

pub async fn health_page(State(app): State<App>) -> Html<String> {
    let body = format!(
        "<div id=\"health\" data-refresh=\"/health/live\" data-every=\"{}\">{}</div>",
        app.sample_every.as_millis(),
        health_live(&app)
    );
    page("Health", "/health", &body)
}

pub async fn health_fragment(State(app): State<App>) -> Html<String> {
    Html(health_live(&app))
}

fn figure(value: Option<f64>, digits: usize) -> String {
    value.map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn health_live(app: &App) -> String {
    let samples = app.history.samples();
    let Some(last) = samples.last() else {
        return "<p class=\"empty\">The first sample is being taken…</p>".into();
    };
    let mut out = String::new();
    // Rates over the last ~10 s, so one sample's jitter does not jump about.
    let back = samples.len().saturating_sub(6);
    let older = &samples[back];
    let per_second = |s| health::rate(older, last, s);
    let _ = write!(
        out,
        "<ul class=\"tiles\"><li><span>completed / s</span><b data-figure=\"completed-rate\">{}</b></li>\
         <li><span>cancelled / s</span><b data-figure=\"cancelled-rate\">{}</b></li><li><span>stuck</span><b>{}</b></li></ul>",
        figure(per_second(OrderStatus::Completed), 1),
        figure(per_second(OrderStatus::Cancelled), 1),
        last.stuck.map_or("—".into(), |n| n.to_string()),
    );
    if let Some(problem) = &last.counts_problem {
        out.push_str(&banner("error", problem));
    }
    out.push_str("<h2>Orders by status</h2><ul class=\"counts\">");
    for status in STATUSES {
        let name = status_name(status);
        let _ = write!(
            out,
            "<li class=\"status-{}\"><a href=\"/orders?status={name}\">{name} <b>{}</b></a></li>",
            name.to_ascii_lowercase(),
            last.count(status).map_or("—".into(), |n| n.to_string())
        );
    }
    out.push_str("</ul>");
    let span = app.sample_every.as_secs_f64() * 300.0;
    let rates = |status| {
        samples
            .windows(2)
            .filter_map(|w| {
                let ago = (last.at - w[1].at).num_milliseconds() as f64 / 1000.0;
                health::rate(&w[0], &w[1], status).map(|r| (ago, r))
            })
            .collect()
    };
    out.push_str(&crate::chart::render(
        "orders ended per second",
        "orders / s",
        span,
        &[
            crate::chart::Series {
                class: "completed",
                label: "completed / s".into(),
                points: rates(OrderStatus::Completed),
            },
            crate::chart::Series {
                class: "cancelled",
                label: "cancelled / s".into(),
                points: rates(OrderStatus::Cancelled),
            },
        ],
    ));
    out.push_str("<h2>Services</h2><table class=\"services\"><thead><tr><th>service</th><th>outbox backlog</th><th>oldest unsent</th>\
                  <th>redeliveries</th><th>parked since start</th><th>dead letters now</th><th>problems</th></tr></thead><tbody>");
    for s in &last.services {
        let _ = write!(
            out,
            "<tr data-service=\"{name}\"><td><a href=\"/dead-letters/{name}\">{name}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
            figure(s.outbox_backlog, 0),
            s.oldest_unsent_secs
                .map_or("—".into(), |v| format!("{v:.1} s")),
            figure(s.redeliveries, 0),
            figure(s.parked_total, 0),
            s.dead_letters.map_or("—".into(), |n| n.to_string()),
            esc(&s.problems.join("; ")),
            name = s.name,
        );
    }
    out.push_str("</tbody></table>");
    let backlog: Vec<crate::chart::Series> = ["order", "inventory", "shipping", "notification"]
        .iter()
        .zip(["lane-a", "lane-b", "lane-c", "lane-d"])
        .map(|(name, class)| crate::chart::Series {
            class,
            label: format!("{name} backlog"),
            points: samples
                .iter()
                .filter_map(|sample| {
                    let ago = (last.at - sample.at).num_milliseconds() as f64 / 1000.0;
                    sample
                        .services
                        .iter()
                        .find(|f| f.name == *name)?
                        .outbox_backlog
                        .map(|v| (ago, v))
                })
                .collect(),
        })
        .collect();
    out.push_str(&crate::chart::render(
        "outbox backlog",
        "unsent rows",
        span,
        &backlog,
    ));
    let _ = write!(
        out,
        "<p class=\"small\">Sampled every {} s, less often while counting the orders takes long (last {}); kept in the console's memory for the chart only.</p>",
        app.sample_every.as_secs(),
        last.at.format("%H:%M:%S UTC")
    );
    out
}
