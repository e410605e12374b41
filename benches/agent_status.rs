//! Status round-trip latency over mutual TLS: N calls on one connection to a running keel-agent,
//! p50 and p99, with Version (no disk read) measured in the same run as the baseline.
//! Run by ci/bench-agent (it starts the agent); not a test.
//!
//! Env: KEEL_BENCH_CONFIG (osctl config file), KEEL_BENCH_CALLS (default 1000).

use keelos::agent::proto::{self, keel_client::KeelClient};
use keelos::agent::tls;
use keelos::pki::ClientConfig;
use std::time::{Duration, Instant};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(cfg_path) = std::env::var("KEEL_BENCH_CONFIG") else {
        eprintln!("agent_status bench: set KEEL_BENCH_CONFIG (ci/bench-agent does); skipping");
        return Ok(());
    };
    let n: usize = std::env::var("KEEL_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let cfg = ClientConfig::load(std::path::Path::new(&cfg_path))?;
    let host = cfg.server_name.clone().unwrap_or_else(|| {
        cfg.endpoint
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_default()
    });
    let tcfg = tls::client_config(&cfg.ca, &cfg.cert, &cfg.key)?;
    let mut c = KeelClient::new(tls::channel(&cfg.endpoint, &host, tcfg)?);
    // warm up: handshake and first disk read
    for _ in 0..20 {
        c.status(proto::StatusRequest {}).await?;
    }
    let mut st = Vec::with_capacity(n);
    let mut ve = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.status(proto::StatusRequest {}).await?;
        st.push(t.elapsed());
        let t = Instant::now();
        c.version(proto::VersionRequest {}).await?;
        ve.push(t.elapsed());
    }
    let (s50, s99) = (pct(&mut st, 0.50), pct(&mut st, 0.99));
    let (v50, v99) = (pct(&mut ve, 0.50), pct(&mut ve, 0.99));
    println!("Status  over mTLS, {n} calls: p50 {s50:?}  p99 {s99:?}");
    println!("Version over mTLS, {n} calls: p50 {v50:?}  p99 {v99:?} (baseline: no disk read)");
    println!(
        "ratio Status/Version: p50 {:.2}x  p99 {:.2}x",
        s50.as_secs_f64() / v50.as_secs_f64(),
        s99.as_secs_f64() / v99.as_secs_f64()
    );
    Ok(())
}
