//! Writes the choreography's Mermaid diagram into a Markdown file between its
//! markers (the README by default): `cargo run -p contracts --bin saga-diagram`.
use choreo::choreography::{DIAGRAM_BEGIN, DIAGRAM_END, with_diagram};

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md").to_owned());
    let doc = std::fs::read_to_string(&path)?;
    let Some(updated) = with_diagram(&doc, &contracts::CHOREOGRAPHY.mermaid()) else {
        eprintln!(
            "{path} has no {DIAGRAM_BEGIN} ... {DIAGRAM_END} markers; add them where the diagram goes"
        );
        std::process::exit(1);
    };
    std::fs::write(&path, updated)?;
    println!("wrote the choreography diagram into {path}");
    Ok(())
}
