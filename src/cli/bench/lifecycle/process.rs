//! What the lifecycle benchmark reads from the assetflow process it started: a free port, its
//! readiness and `/metrics` over HTTP, its CPU time and peak memory from /proc.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

pub(super) async fn wait_ready(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((200, _)) = http_get(port, "/readyz").await {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "assetflow did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// scrape reads /metrics into series → value (histogram buckets included).
pub(super) async fn scrape(port: u16) -> anyhow::Result<HashMap<String, f64>> {
    let (_, body) = http_get(port, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect())
}

/// cpu_seconds is a process's user and system time, from /proc (read as the busy figures read it,
/// in clock ticks of 1/100 s, USER_HZ).
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let stat = crate::cli::bench::machine::parse_process_stat(&stat)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat is not as expected"))?;
    Ok(stat.ticks as f64 / 100.0)
}

/// peak_rss_kb is a process's peak resident set (VmHWM), from /proc.
pub(super) fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}
