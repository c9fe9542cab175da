//! Runs one chaos profile and prints its report; exits 1 if an invariant broke.
//! `CHAOS_PROFILE=long CHAOS_SEED=42 cargo run -p e2e --bin chaos`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let report = e2e::until_signal(e2e::chaos::run(e2e::chaos::Profile::from_env())).await?;
    println!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
