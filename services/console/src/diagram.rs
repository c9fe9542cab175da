//! The choreography as a picture, drawn from the declaration itself: one
//! row per path through the saga (the happy path, each step's failure, the
//! cancel), each event in its step's column, so every compensation chain is
//! seen walking back, right to left, to the one end.
use std::fmt::Write as _;

use choreo::choreography::{Choreography, Entry};

use crate::html::esc;
use crate::swimlane::kind;

const LABEL_WIDTH: usize = 150;
const COLUMN: usize = 200;
const BOX_WIDTH: usize = 176;
const BOX_HEIGHT: usize = 46;
const ROW: usize = 74;
const HEADER: usize = 40;

fn column(choreography: &Choreography, event: &str) -> usize {
    if event == choreography.start {
        return 0;
    }
    if event == choreography.cancel {
        return choreography.steps.len() + 1;
    }
    choreography
        .steps
        .iter()
        .position(|s| [s.success, s.failure, s.compensation].contains(&event))
        .map_or(0, |i| i + 1)
}

fn centre_x(column: usize) -> usize {
    LABEL_WIDTH + column * COLUMN + COLUMN / 2
}

/// Every path of the saga as SVG.
pub fn render(choreography: &Choreography) -> String {
    let chains = choreography.chains();
    let columns = choreography.steps.len() + 2;
    let width = LABEL_WIDTH + columns * COLUMN + 10;
    let height = HEADER + chains.len() * ROW + 10;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"choreography\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"the saga's happy path and compensation chains\">\
         <defs><marker id=\"chain-arrow\" class=\"arrowhead other\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker></defs>"
    );
    let owner_of_start = choreography
        .event(choreography.start)
        .map_or("", |e| e.producer);
    let mut headers = vec![format!("start · {owner_of_start}")];
    headers.extend(
        choreography
            .steps
            .iter()
            .map(|s| format!("{} · {}", s.name, s.owner)),
    );
    headers.push("cancel".into());
    for (i, header) in headers.iter().enumerate() {
        let _ = write!(
            svg,
            "<text class=\"column-label\" x=\"{}\" y=\"24\">{}</text>",
            centre_x(i),
            esc(header)
        );
    }
    for (row, chain) in chains.iter().enumerate() {
        let y = HEADER + row * ROW;
        let label = match chain.entry {
            Entry::HappyPath => "happy path".to_owned(),
            Entry::Fails(step) => format!("{step} fails"),
            Entry::Cancelled => "cancel requested".to_owned(),
        };
        let entry = match chain.entry {
            Entry::HappyPath => "happy".to_owned(),
            Entry::Fails(step) => format!("fails-{step}"),
            Entry::Cancelled => "cancel".to_owned(),
        };
        let _ = write!(
            svg,
            "<g class=\"chain\" data-chain=\"{entry}\"><rect class=\"lane-band lane-{parity}\" x=\"0\" y=\"{y}\" width=\"{width}\" height=\"{ROW}\"/>\
             <text class=\"lane-label\" x=\"10\" y=\"{ty}\">{label}</text>",
            parity = row % 2,
            ty = y + ROW / 2 + 4,
            label = esc(&label),
        );
        let box_y = y + (ROW - BOX_HEIGHT) / 2;
        let mut previous: Option<usize> = None;
        let end_column = if chain.completes { columns - 1 } else { 0 };
        let stops: Vec<(usize, Option<&str>)> = chain
            .events
            .iter()
            .map(|e| (column(choreography, e), Some(*e)))
            .chain(std::iter::once((end_column, None)))
            .collect();
        for (position, (col, event)) in stops.iter().enumerate() {
            let cx = centre_x(*col);
            if let Some(prev) = previous {
                let (x1, x2) = if prev < *col {
                    (centre_x(prev) + BOX_WIDTH / 2, cx - BOX_WIDTH / 2)
                } else {
                    (centre_x(prev) - BOX_WIDTH / 2, cx + BOX_WIDTH / 2)
                };
                let x2 = if event.is_none() {
                    if prev < *col { cx - 34 } else { cx + 34 }
                } else {
                    x2
                };
                let _ = write!(
                    svg,
                    "<path class=\"cause {kind}\" d=\"M{x1},{cy} L{x2},{cy}\" marker-end=\"url(#chain-arrow)\"/>",
                    kind = event.map_or("end", |e| kind(choreography, e)),
                    cy = box_y + BOX_HEIGHT / 2,
                );
            }
            match event {
                Some(event) => {
                    let producer = choreography.event(event).map_or("?", |e| e.producer);
                    let _ = write!(
                        svg,
                        "<g class=\"event ev-{kind}\" data-event-type=\"{name}\" data-position=\"{position}\">\
                         <rect x=\"{x}\" y=\"{box_y}\" width=\"{BOX_WIDTH}\" height=\"{BOX_HEIGHT}\" rx=\"6\"/>\
                         <text class=\"event-type\" x=\"{cx}\" y=\"{t1}\">{name}</text>\
                         <text class=\"event-time\" x=\"{cx}\" y=\"{t2}\">by {producer}</text></g>",
                        kind = kind(choreography, event),
                        name = esc(event),
                        x = cx - BOX_WIDTH / 2,
                        t1 = box_y + 20,
                        t2 = box_y + 36,
                        producer = esc(producer),
                    );
                }
                None => {
                    let name = if chain.completes {
                        "COMPLETED"
                    } else {
                        "CANCELLED"
                    };
                    let _ = write!(
                        svg,
                        "<g class=\"outcome outcome-{lower}\" data-outcome=\"{name}\"><circle cx=\"{cx}\" cy=\"{cy}\" r=\"32\"/>\
                         <text x=\"{cx}\" y=\"{ty}\">{name}</text></g>",
                        lower = name.to_ascii_lowercase(),
                        cy = box_y + BOX_HEIGHT / 2,
                        ty = box_y + BOX_HEIGHT / 2 + 4,
                    );
                }
            }
            previous = Some(*col);
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}
