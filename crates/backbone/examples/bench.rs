//! Prints the backbone's training throughput: `cargo run --release -p simtrans-backbone --example bench [cpu|cuda] [steps]`
//! (the same figures as `cargo xtask bench backbone`).

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let device = simtrans_core::device::parse(args.get(1).map(String::as_str).unwrap_or("cpu"))?;
    let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    for r in simtrans_backbone::bench_default(&device, steps)? {
        println!(
            "{:>9} {:>3} px batch {:>3}: {:8.1} training images/s ({} steps in {:.1} s, {})",
            r.arch, r.image_size, r.batch_size, r.images_per_second, r.steps, r.seconds, r.device
        );
    }
    Ok(())
}
