//! Prints the backbone's training throughput (the same figures as `cargo xtask bench backbone`):
//! `cargo run --release -p simtrans-backbone --example bench [cpu|cuda] [steps] [small widths…]`.
//! With widths, only the small network is timed, once per width.

fn main() -> anyhow::Result<()> {
    simtrans_ops::process::prepare();
    let args: Vec<String> = std::env::args().collect();
    let device = simtrans_ops::gpu::open(args.get(1).map(String::as_str).unwrap_or("cpu"))?;
    let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let widths: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
    let reports = if widths.is_empty() {
        simtrans_backbone::bench_default(&device, steps)?
    } else {
        widths
            .iter()
            .map(|&w| {
                simtrans_backbone::bench(&device, simtrans_backbone::Arch::Small, w, 28, 64, steps)
            })
            .collect::<Result<_, _>>()?
    };
    for r in reports {
        println!(
            "{:>9} w{:<3} {:>3} px batch {:>3}: {:8.1} training images/s ({} steps in {:.1} s, {})",
            r.arch,
            r.small_width,
            r.image_size,
            r.batch_size,
            r.images_per_second,
            r.steps,
            r.seconds,
            r.device
        );
    }
    Ok(())
}
