//! Prints the input pipeline's throughput at 224 px (`cargo run --release -p simtrans-data --example bench_data`).
fn main() -> anyhow::Result<()> {
    let cfg = simtrans_core::Config::preset(simtrans_core::Preset::Paper).data;
    let r = simtrans_data::bench(&cfg, 128, 64, 2, None)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
