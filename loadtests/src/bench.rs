//! Side-by-side benchmark: the mock AI directly vs through a proxy (breakwater, or any
//! command with a URL), in one run, with the proxy's CPU time per request read from
//! `/proc/PID/stat`. Processes are pinned with `taskset` when asked: proxy on core 0,
//! mock and load driver on core 1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::driver::{self, LoadResult, LoadSpec};

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Spawns `program args`, pinned to `core` with taskset when given.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        core: Option<u32>,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let mut cmd = match core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `url` (plain http GET) until it answers 200.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut spec = LoadSpec::get(addr, path);
        spec.duration = Duration::from_millis(1);
        spec.connections = 1;
        spec.timeout = Duration::from_millis(500);
        if let Ok(r) = driver::run(spec).await {
            if r.counts.status.get(&200).copied().unwrap_or(0) > 0 {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{addr}{path} did not answer 200 within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One measured row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub result: LoadResult,
    /// Proxy CPU microseconds per served request, when a proxy process was measured.
    pub cpu_us_per_req: Option<f64>,
}

/// CPU seconds of a process and its direct children (nginx's workers under its master).
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut total = cpu_seconds(pid)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            total += cpu_seconds(child).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// Runs `spec`, measuring `pid`'s CPU time (with its children) over the run.
pub async fn measure(name: &str, spec: LoadSpec, pid: Option<u32>) -> anyhow::Result<Row> {
    let before = pid.and_then(tree_cpu_seconds);
    let result = driver::run(spec).await?;
    let after = pid.and_then(tree_cpu_seconds);
    let served = (result.counts.requests - result.counts.errors).max(1) as f64;
    let cpu_us_per_req = before.zip(after).map(|(b, a)| (a - b) * 1e6 / served);
    Ok(Row {
        name: name.to_string(),
        result,
        cpu_us_per_req,
    })
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | non-2xx | proxy CPU µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let non2xx: u64 = r
            .result
            .counts
            .status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        out.push_str(&format!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |\n",
            r.name,
            r.result.throughput(),
            r.result.ms(0.5),
            r.result.ms(0.9),
            r.result.ms(0.99),
            r.result.ms(0.999),
            r.result.counts.errors,
            non2xx,
            r.cpu_us_per_req
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    out
}

/// The breakwater config the benchmark runs: route `/` to the mock, and `/down/` to a
/// closed port behind a breaker and a static fallback (the "AI down" scenario).
pub fn breakwater_config(
    listen: u16,
    admin: u16,
    mock: SocketAddr,
    dead_port: u16,
    audit_dir: Option<&Path>,
) -> String {
    let audit = match audit_dir {
        Some(dir) => format!(
            "\n[audit]\npath = \"{}/decisions.jsonl\"\nhmac_key_file = \"{}/audit.key\"\nredact_headers = [\"authorization\", \"cookie\"]\n",
            dir.display(),
            dir.display()
        ),
        None => String::new(),
    };
    format!(
        r#"[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
watch_config = false

[upstreams.ai]
url = "http://{mock}"
pool_max_idle_per_host = 1024

[upstreams.dead]
url = "http://127.0.0.1:{dead_port}"
connect_timeout_ms = 50

[[routes]]
name = "bench"
path_prefix = "/"
upstream = "ai"
timeout_ms = 2000
model_version_header = "x-model-version"

[[routes]]
name = "down"
path_prefix = "/down/"
upstream = "dead"
timeout_ms = 500
[routes.breaker]
consecutive_failures = 5
open_ms = 600000
open_max_ms = 600000
[[routes.fallback]]
kind = "static"
status = 200
body = '{{"source":"static"}}'
{audit}"#
    )
}

pub struct BenchArgs {
    pub proxy_bin: PathBuf,
    pub mock_bin: PathBuf,
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    pub pin: bool,
    pub audit: bool,
    /// Alternating log off/on max-throughput runs per side (with `audit`).
    pub ab_rounds: usize,
}

/// Starts breakwater on a generated config and waits until it is ready.
pub async fn start_breakwater(
    args: &BenchArgs,
    mock: SocketAddr,
    dir: &Path,
    audit: bool,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let (listen, admin, dead) = (free_port()?, free_port()?, free_port()?);
    let audit_dir = if audit {
        let d = dir.join(format!("audit-{listen}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("audit.key"),
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )?;
        Some(d)
    } else {
        None
    };
    let cfg = dir.join(format!("breakwater-{listen}.toml"));
    std::fs::write(
        &cfg,
        breakwater_config(listen, admin, mock, dead, audit_dir.as_deref()),
    )?;
    let proc = Proc::spawn(
        "breakwater",
        &args.proxy_bin,
        &["--config".into(), cfg.display().to_string()],
        args.pin.then_some(0),
        &[("RUST_LOG", "warn")],
    )?;
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    wait_http_ok(admin_addr, "/readyz", Duration::from_secs(20)).await?;
    Ok((proc, ([127, 0, 0, 1], listen).into()))
}

/// Pins this process (the driver) to core 1 when asked, and starts the mock AI there.
async fn start_mock(args: &BenchArgs) -> anyhow::Result<(Proc, SocketAddr)> {
    if args.pin {
        // The driver shares core 1 with the mock; the proxy gets core 0 to itself.
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let mock_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mock = Proc::spawn(
        "mock-ai",
        &args.mock_bin,
        &[
            "--listen".into(),
            mock_addr.to_string(),
            "--threads".into(),
            "1".into(),
        ],
        args.pin.then_some(1),
        &[],
    )?;
    wait_http_ok(mock_addr, "/__mock/stats", Duration::from_secs(10)).await?;
    Ok((mock, mock_addr))
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let dir = std::env::temp_dir().join(format!("breakwater-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_mock, mock_addr) = start_mock(&args).await?;
    let (bw, bw_addr) = start_breakwater(&args, mock_addr, &dir, false).await?;

    let spec = |target: SocketAddr, path: &str, rate: Option<f64>| {
        let mut s = LoadSpec::get(target, path);
        s.rate = rate;
        s.duration = args.duration;
        s.connections = args.connections;
        s
    };
    // Warm both paths (pools, caches) before measuring.
    let mut warm = spec(bw_addr, "/v1/recommendations", Some(1000.0));
    warm.duration = Duration::from_secs(1);
    driver::run(warm).await?;
    // The breaker on /down/ trips after 5 connect errors; later requests get the fallback.
    let mut trip = spec(bw_addr, "/down/score", Some(200.0));
    trip.duration = Duration::from_millis(500);
    driver::run(trip).await?;

    let mut rows = Vec::new();
    rows.push(
        measure(
            "direct, max throughput",
            spec(mock_addr, "/v1/recommendations", None),
            None,
        )
        .await?,
    );
    rows.push(
        measure(
            "breakwater, max throughput",
            spec(bw_addr, "/v1/recommendations", None),
            bw.pid(),
        )
        .await?,
    );
    let rate = Some(args.rate);
    rows.push(
        measure(
            &format!("direct, {} req/s", args.rate),
            spec(mock_addr, "/v1/recommendations", rate),
            None,
        )
        .await?,
    );
    rows.push(
        measure(
            &format!("breakwater, {} req/s", args.rate),
            spec(bw_addr, "/v1/recommendations", rate),
            bw.pid(),
        )
        .await?,
    );
    rows.push(
        measure(
            &format!(
                "breakwater, AI down (breaker open, static fallback), {} req/s",
                args.rate
            ),
            spec(bw_addr, "/down/score", rate),
            bw.pid(),
        )
        .await?,
    );
    let mut alternating = String::new();
    if args.audit {
        let (bwa, bwa_addr) = start_breakwater(&args, mock_addr, &dir, true).await?;
        let mut warm = spec(bwa_addr, "/v1/recommendations", Some(1000.0));
        warm.duration = Duration::from_secs(1);
        driver::run(warm).await?;
        rows.push(
            measure(
                "breakwater + decision log, max throughput",
                spec(bwa_addr, "/v1/recommendations", None),
                bwa.pid(),
            )
            .await?,
        );
        rows.push(
            measure(
                &format!("breakwater + decision log, {} req/s", args.rate),
                spec(bwa_addr, "/v1/recommendations", rate),
                bwa.pid(),
            )
            .await?,
        );
        // One pair of runs moves by several percent on a shared machine: the log's cost
        // is also measured as alternating off/on max-throughput runs, compared by median.
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..args.ab_rounds.max(1) {
            let r = measure("off", spec(bw_addr, "/v1/recommendations", None), bw.pid()).await?;
            off.push((r.result.throughput(), r.cpu_us_per_req.unwrap_or(0.0)));
            let r = measure("on", spec(bwa_addr, "/v1/recommendations", None), bwa.pid()).await?;
            on.push((r.result.throughput(), r.cpu_us_per_req.unwrap_or(0.0)));
        }
        let list = |v: &[(f64, f64)]| {
            v.iter()
                .map(|(t, _)| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (off_t, off_c) = (
            median(off.iter().map(|x| x.0)),
            median(off.iter().map(|x| x.1)),
        );
        let (on_t, on_c) = (
            median(on.iter().map(|x| x.0)),
            median(on.iter().map(|x| x.1)),
        );
        alternating = format!(
            "- decision log, {} alternating max-throughput runs: off {} req/s (median {off_t:.0}, {off_c:.1} µs CPU/req), on {} req/s (median {on_t:.0}, {on_c:.1} µs CPU/req): on / off {:.1}%\n",
            args.ab_rounds.max(1),
            list(&off),
            list(&on),
            100.0 * on_t / off_t.max(1e-9),
        );
    }
    drop(bw);

    let direct_max = rows[0].result.throughput();
    let proxied_max = rows[1].result.throughput();
    let (d, p) = (&rows[2].result, &rows[3].result);
    let mut report =
        format!(
        "# breakwater benchmark\n\n{} on {} cores; duration {:?} per run, {} connections{}.\n\n",
        humantime_now(),
        cores,
        args.duration,
        args.connections,
        if args.pin { "; breakwater pinned to core 0, mock and driver to core 1" } else { "" }
    );
    report.push_str(&table(&rows));
    report.push_str(&format!(
        "\n- throughput through breakwater / direct: {:.1}%\n- added latency at {} req/s: p50 {:+.3} ms, p99 {:+.3} ms\n",
        100.0 * proxied_max / direct_max.max(1e-9),
        args.rate,
        p.ms(0.5) - d.ms(0.5),
        p.ms(0.99) - d.ms(0.99),
    ));
    if args.audit && rows.len() >= 7 {
        report.push_str(&format!(
            "- max throughput with the decision log on / off, the one pair of runs in the table: {:.1}%\n",
            100.0 * rows[5].result.throughput() / proxied_max.max(1e-9)
        ));
    }
    report.push_str(&alternating);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub(crate) fn nginx_config(dir: &Path, listen: u16, mock: SocketAddr) -> String {
    nginx_config_logged(dir, listen, mock, false)
}

/// nginx as the peer benchmark runs it; with `access_log`, a buffered access log in the
/// default `combined` format (64 KiB buffer, flushed every second), the fair peer of
/// breakwater with its decision log on.
pub(crate) fn nginx_config_logged(
    dir: &Path,
    listen: u16,
    mock: SocketAddr,
    access_log: bool,
) -> String {
    let log = if access_log {
        format!(
            "access_log {}/nginx-access.log combined buffer=64k flush=1s;",
            dir.display()
        )
    } else {
        "access_log off;".to_string()
    };
    format!(
        r#"worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    {log}
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    upstream ai {{ server {mock}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{listen} reuseport;
        location / {{
            proxy_pass http://ai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display()
    )
}

pub(crate) fn haproxy_config(listen: u16, mock: SocketAddr) -> String {
    format!(
        r#"global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{listen}
    default_backend be
backend be
    http-reuse always
    server ai {mock} maxconn 2000
"#
    )
}

/// The same mock and the same offered load through breakwater (decision log on), nginx
/// and HAProxy, each pinned to core 0 with the driver and mock on core 1, one at a time.
pub async fn peer(args: BenchArgs, rates: &[f64]) -> anyhow::Result<String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let dir = std::env::temp_dir().join(format!("breakwater-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_mock, mock_addr) = start_mock(&args).await?;
    let core = args.pin.then_some(0);
    let spec = |target: SocketAddr, rate: Option<f64>| {
        let mut s = LoadSpec::get(target, "/v1/recommendations");
        s.rate = rate;
        s.duration = args.duration;
        s.connections = args.connections;
        s
    };
    let mut rows = Vec::new();
    rows.push(measure("direct (no proxy)", spec(mock_addr, None), None).await?);
    for r in rates {
        rows.push(
            measure(
                &format!("direct @ {r} req/s"),
                spec(mock_addr, Some(*r)),
                None,
            )
            .await?,
        );
    }
    let run_proxy = |name: &'static str, proc: Proc, addr: SocketAddr| {
        let rates = rates.to_vec();
        let spec = &spec;
        async move {
            wait_http_ok(addr, "/v1/recommendations", Duration::from_secs(20)).await?;
            let mut warm = spec(addr, Some(1000.0));
            warm.duration = Duration::from_secs(1);
            driver::run(warm).await?;
            let mut out =
                vec![measure(&format!("{name}, max"), spec(addr, None), proc.pid()).await?];
            for r in rates {
                out.push(
                    measure(
                        &format!("{name} @ {r} req/s"),
                        spec(addr, Some(r)),
                        proc.pid(),
                    )
                    .await?,
                );
            }
            drop(proc);
            Ok::<_, anyhow::Error>(out)
        }
    };
    // breakwater, decision log on.
    let (bw, bw_addr) = start_breakwater(&args, mock_addr, &dir, true).await?;
    rows.extend(run_proxy("breakwater (decision log on)", bw, bw_addr).await?);
    // nginx, without and with its access log.
    for (name, logged) in [("nginx", false), ("nginx (access log, buffered)", true)] {
        let port = free_port()?;
        let conf = dir.join(format!("nginx-{logged}.conf"));
        std::fs::write(&conf, nginx_config_logged(&dir, port, mock_addr, logged))?;
        let nginx = Proc::spawn(
            "nginx",
            Path::new("nginx"),
            &[
                "-c".into(),
                conf.display().to_string(),
                "-e".into(),
                dir.join("nginx-error.log").display().to_string(),
            ],
            core,
            &[],
        )?;
        rows.extend(run_proxy(name, nginx, ([127, 0, 0, 1], port).into()).await?);
    }
    // HAProxy
    let port = free_port()?;
    let conf = dir.join("haproxy.cfg");
    std::fs::write(&conf, haproxy_config(port, mock_addr))?;
    let haproxy = Proc::spawn(
        "haproxy",
        Path::new("haproxy"),
        &["-db".into(), "-f".into(), conf.display().to_string()],
        core,
        &[],
    )?;
    rows.extend(run_proxy("haproxy", haproxy, ([127, 0, 0, 1], port).into()).await?);

    let direct_max = rows[0].result.throughput();
    let mut report = format!(
        "# peer benchmark: breakwater vs nginx (access log off and on) vs HAProxy\n\n{} on {cores} cores; {:?} per run, {} connections{}.\n\n",
        humantime_now(),
        args.duration,
        args.connections,
        if args.pin { "; each proxy pinned to core 0, mock and driver on core 1" } else { "" }
    );
    report.push_str(&table(&rows));
    report.push_str("\n| proxy | max req/s | % of direct | CPU µs/req at max |");
    for r in rates {
        report.push_str(&format!(" added p50 / p99 ms @ {r} |"));
    }
    report.push_str("\n|---|---:|---:|---:|");
    for _ in rates {
        report.push_str("---:|");
    }
    report.push('\n');
    let per = 1 + rates.len();
    for (i, name) in [
        "breakwater (decision log on)",
        "nginx",
        "nginx (access log, buffered)",
        "haproxy",
    ]
    .iter()
    .enumerate()
    {
        let base = per + i * per;
        let Some(max_row) = rows.get(base) else {
            continue;
        };
        report.push_str(&format!(
            "| {name} | {:.0} | {:.1}% | {} |",
            max_row.result.throughput(),
            100.0 * max_row.result.throughput() / direct_max.max(1e-9),
            max_row
                .cpu_us_per_req
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into())
        ));
        for (j, _) in rates.iter().enumerate() {
            let (p, d) = (&rows[base + 1 + j].result, &rows[1 + j].result);
            report.push_str(&format!(
                " {:+.3} / {:+.3} |",
                p.ms(0.5) - d.ms(0.5),
                p.ms(0.99) - d.ms(0.99)
            ));
        }
        report.push('\n');
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
