//! One order's saga as a swimlane diagram (server-rendered SVG): a lane per
//! service, each event a box in its producer's lane in the order they
//! happened, an arrow from each event to the ones it caused, compensations
//! in their own colour, and the order's end.
use std::collections::HashMap;
use std::fmt::Write as _;

use choreo::choreography::{Choreography, Meaning};
use contracts::order::v1::Order;

use crate::html::{esc, is_terminal, status_name, to_utc};

const LABEL_WIDTH: usize = 120;
const COLUMN: usize = 166;
const BOX_WIDTH: usize = 152;
const BOX_HEIGHT: usize = 44;
const LANE: usize = 66;
const TOP: usize = 8;

/// The lanes, in saga order: the saga's owner, then each step's owner.
pub fn lanes(choreography: &Choreography) -> Vec<&'static str> {
    let mut lanes = Vec::new();
    let starter = choreography
        .event(choreography.start)
        .map(|e| e.producer)
        .into_iter();
    for service in starter
        .chain(choreography.steps.iter().map(|s| s.owner))
        .chain(choreography.services())
    {
        if !lanes.contains(&service) {
            lanes.push(service);
        }
    }
    lanes
}

/// How an event is drawn: the happy path, a failure, a compensation (the
/// cancel included) or the platform's stuck report.
pub fn kind(choreography: &Choreography, event_type: &str) -> &'static str {
    match choreography.meaning(event_type) {
        Meaning::Started | Meaning::Succeeded { .. } => "forward",
        Meaning::Failed { .. } => "failure",
        Meaning::Compensated { .. } | Meaning::CancelRequested => "compensation",
        Meaning::Stuck => "stuck",
        Meaning::Unknown => "other",
    }
}

fn offset(ms: i64) -> String {
    if ms < 1000 {
        format!("+{ms} ms")
    } else {
        format!("+{:.1} s", ms as f64 / 1000.0)
    }
}

/// The diagram of `order`'s timeline.
pub fn render(choreography: &Choreography, order: &Order) -> String {
    let mut lanes: Vec<&str> = lanes(choreography);
    for entry in &order.timeline {
        if !lanes.contains(&entry.producer.as_str()) {
            // A producer the declaration does not know still gets a lane.
            lanes.push(&entry.producer);
        }
    }
    let lane_of = |producer: &str| lanes.iter().position(|l| *l == producer).unwrap_or(0);
    let status = order.status();
    let terminal = is_terminal(status);
    let columns = order.timeline.len() + usize::from(terminal);
    let width = LABEL_WIDTH + columns.max(1) * COLUMN + 16;
    let height = TOP + lanes.len() * LANE + 8;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"swimlane\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"saga of order {}\">",
        esc(&order.order_id)
    );
    svg.push_str(
        "<defs>\
         <marker id=\"arrow-forward\" class=\"arrowhead forward\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker>\
         <marker id=\"arrow-failure\" class=\"arrowhead failure\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker>\
         <marker id=\"arrow-compensation\" class=\"arrowhead compensation\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker>\
         <marker id=\"arrow-stuck\" class=\"arrowhead stuck\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker>\
         <marker id=\"arrow-other\" class=\"arrowhead other\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker>\
         </defs>",
    );
    for (i, lane) in lanes.iter().enumerate() {
        let y = TOP + i * LANE;
        let _ = write!(
            svg,
            "<g class=\"lane\" data-lane=\"{lane}\"><rect class=\"lane-band lane-{parity}\" x=\"0\" y=\"{y}\" width=\"{width}\" height=\"{LANE}\"/>\
             <text class=\"lane-label\" x=\"10\" y=\"{ty}\">{lane}</text></g>",
            lane = esc(lane),
            parity = i % 2,
            ty = y + LANE / 2 + 4,
        );
    }
    let first = order
        .timeline
        .first()
        .and_then(|e| e.occurred_at.as_ref())
        .and_then(to_utc);
    // Where each event's box is, for the arrows.
    let mut placed: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut boxes = String::new();
    for (column, entry) in order.timeline.iter().enumerate() {
        let x = LABEL_WIDTH + column * COLUMN + (COLUMN - BOX_WIDTH) / 2;
        let y = TOP + lane_of(&entry.producer) * LANE + (LANE - BOX_HEIGHT) / 2;
        placed.insert(entry.event_id.as_str(), (x, y));
        let kind = kind(choreography, &entry.event_type);
        let at = entry.occurred_at.as_ref().and_then(to_utc);
        let since = match (first, at) {
            (Some(first), Some(at)) => offset((at - first).num_milliseconds()),
            _ => String::new(),
        };
        let _ = write!(
            boxes,
            "<g class=\"event ev-{kind}\" data-event-type=\"{ty}\" data-producer=\"{producer}\" data-kind=\"{kind}\" data-position=\"{column}\">\
             <title>{ty} by {producer} at {at}: {detail}</title>\
             <rect x=\"{x}\" y=\"{y}\" width=\"{BOX_WIDTH}\" height=\"{BOX_HEIGHT}\" rx=\"6\"/>\
             <text class=\"event-type\" x=\"{tx}\" y=\"{ty1}\">{ty}</text>\
             <text class=\"event-time\" x=\"{tx}\" y=\"{ty2}\">{since}</text></g>",
            ty = esc(&entry.event_type),
            producer = esc(&entry.producer),
            at = at
                .map(|a| a.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default(),
            detail = esc(&entry.detail),
            tx = x + BOX_WIDTH / 2,
            ty1 = y + 19,
            ty2 = y + 35,
        );
    }
    let mut arrows = String::new();
    for entry in &order.timeline {
        let (Some(&(fx, fy)), Some(&(tx, ty))) = (
            placed.get(entry.causation_id.as_str()),
            placed.get(entry.event_id.as_str()),
        ) else {
            continue;
        };
        let kind = kind(choreography, &entry.event_type);
        let (x1, y1) = (fx + BOX_WIDTH, fy + BOX_HEIGHT / 2);
        let (x2, y2) = (tx, ty + BOX_HEIGHT / 2);
        let bend = (x2.saturating_sub(x1) / 2).max(12);
        let _ = write!(
            arrows,
            "<path class=\"cause {kind}\" data-from=\"{from}\" data-to=\"{to}\" d=\"M{x1},{y1} C{c1},{y1} {c2},{y2} {x2},{y2}\" marker-end=\"url(#arrow-{kind})\"/>",
            from = esc(&entry.causation_id),
            to = esc(&entry.event_id),
            c1 = x1 + bend,
            c2 = x2.saturating_sub(bend),
        );
    }
    svg.push_str(&arrows);
    svg.push_str(&boxes);
    if terminal {
        let name = status_name(status);
        let cx = LABEL_WIDTH + order.timeline.len() * COLUMN + COLUMN / 2;
        let cy = TOP + LANE / 2;
        let _ = write!(
            svg,
            "<g class=\"outcome outcome-{lower}\" data-outcome=\"{name}\"><circle cx=\"{cx}\" cy=\"{cy}\" r=\"32\"/>\
             <text x=\"{cx}\" y=\"{ty}\">{name}</text></g>",
            lower = name.to_ascii_lowercase(),
            ty = cy + 4,
        );
        if let Some(last) = order
            .timeline
            .last()
            .and_then(|e| placed.get(e.event_id.as_str()))
        {
            let (x1, y1) = (last.0 + BOX_WIDTH, last.1 + BOX_HEIGHT / 2);
            let _ = write!(
                svg,
                "<path class=\"cause end\" d=\"M{x1},{y1} L{x2},{cy}\" marker-end=\"url(#arrow-other)\"/>",
                x2 = cx - 33,
            );
        }
    }
    svg.push_str("</svg>");
    svg
}
