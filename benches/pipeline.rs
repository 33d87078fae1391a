//! `cargo bench --bench pipeline`: the same measurement as `hark bench pipeline`
//! (concurrent real-time 24 kHz streams through resample + VAD + chunking), on the
//! repo's config.yaml. Prints a table; asserts nothing.

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = hark::config::Config::load(&root.join("config.yaml"))?;
    let streams: Vec<usize> = std::env::var("HARK_BENCH_STREAMS")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    hark::bench::pipeline(&config, &streams, 10, true)
}
