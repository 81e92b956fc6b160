//! Instruction counts per request (`loadtests instructions`): each proxy runs under
//! `valgrind --tool=callgrind`, takes a warm-up, has its counters zeroed
//! (`callgrind_control --zero`), serves a fixed number of requests and is dumped
//! (`callgrind_control --dump`). User-space instructions (Ir) divided by the requests
//! served is deterministic to a fraction of a percent, unlike CPU time on a shared VM.
//! Under valgrind SHA-256 runs its portable code (no SHA-NI): the decision log's figure
//! overstates what it costs natively; `cargo bench` counts that part natively.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::Command;

use crate::bench::{breakwater_config, free_port, wait_http_ok, Proc};

pub struct InstrArgs {
    pub proxy_bin: PathBuf,
    pub mock_bin: PathBuf,
    pub requests: u64,
    pub warmup: u64,
    /// Concurrent keep-alive connections of the fixed-count client.
    pub connections: usize,
    /// Functions listed per target.
    pub top: usize,
    /// Only these targets: a whole name, or a part of names (all when empty).
    pub only: Vec<String>,
}

/// One measured target.
pub struct InstrRow {
    pub name: String,
    pub per_request: f64,
    pub requests: u64,
    pub top: Vec<(u64, String)>,
}

/// What runs under callgrind: a program, its arguments, where to send requests and how
/// to tell it is ready.
struct Target {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    addr: SocketAddr,
    path: String,
    ready: (SocketAddr, String),
}

/// Sends exactly `n` GETs over `connections` keep-alive connections; all must be 2xx.
async fn fixed_requests(
    addr: SocketAddr,
    path: &str,
    n: u64,
    connections: usize,
) -> anyhow::Result<u64> {
    let connections = connections.max(1) as u64;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let share = n / connections + u64::from(c < n % connections);
        let url = format!("http://{addr}{path}");
        tasks.push(tokio::spawn(async move {
            // One client per task: its pool keeps one connection alive.
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http();
            let mut ok = 0u64;
            for _ in 0..share {
                let req = http::Request::get(&url).body(Full::new(Bytes::new()))?;
                let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
                    .await
                    .context("a request took over 30 s under valgrind")??;
                let status = resp.status();
                resp.into_body().collect().await?;
                if !status.is_success() {
                    bail!("{url} answered {status}");
                }
                ok += 1;
            }
            Ok::<u64, anyhow::Error>(ok)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

async fn callgrind_control(flag: &str, pid: u32) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .output()
        .await
        .context("callgrind_control (Debian package valgrind)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {flag} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `summary:` (or `totals:`) of a callgrind dump: instructions executed.
fn dump_total(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no summary line in {}", path.display()))
}

/// The costliest functions by exclusive instructions, read from the dump itself: the
/// cost lines under each `fn=`, except the line after `calls=` (a callee's inclusive cost).
fn top_functions(path: &Path, n: usize) -> Vec<(u64, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut costs: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut current = String::new();
    let mut callee_cost_next = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("fn=") {
            current = name.to_string();
            callee_cost_next = false;
        } else if line.starts_with("calls=") {
            callee_cost_next = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            if std::mem::take(&mut callee_cost_next) {
                continue;
            }
            if let Some(ir) = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
            {
                *costs.entry(current.clone()).or_default() += ir;
            }
        }
    }
    let mut top: Vec<(u64, String)> = costs.into_iter().map(|(f, c)| (c, f)).collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.0));
    top.truncate(n);
    top
}

async fn measure(t: &Target, args: &InstrArgs, dir: &Path) -> anyhow::Result<InstrRow> {
    let out_base = dir.join(format!(
        "callgrind.{}",
        t.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    let mut vg_args = vec![
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}", out_base.display()),
        "--dump-instr=no".into(),
        // Each dump names its functions itself: a dump after `--zero` is read on its own.
        "--compress-strings=no".into(),
        "--trace-children=no".into(),
        t.program.display().to_string(),
    ];
    vg_args.extend(t.args.iter().cloned());
    let proc = Proc::spawn(
        &t.name,
        Path::new("valgrind"),
        &vg_args,
        None,
        &[("RUST_LOG", "warn")],
    )?;
    let pid = proc.pid().context("valgrind exited at once")?;
    wait_http_ok(t.ready.0, &t.ready.1, Duration::from_secs(120))
        .await
        .with_context(|| format!("{} did not start under valgrind", t.name))?;
    fixed_requests(t.addr, &t.path, args.warmup, args.connections).await?;
    callgrind_control("--zero", pid).await?;
    let served = fixed_requests(t.addr, &t.path, args.requests, args.connections).await?;
    callgrind_control("--dump", pid).await?;
    drop(proc);
    // The dump after a zero is the numbered file callgrind writes beside the base name.
    let base = out_base
        .file_name()
        .and_then(|b| b.to_str())
        .unwrap_or_default()
        .to_string();
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&base) && n.ends_with(".1"))
        })
        .collect();
    dumps.sort();
    let dump = dumps
        .pop()
        .with_context(|| format!("no callgrind dump for {} in {}", t.name, dir.display()))?;
    let total = dump_total(&dump)?;
    Ok(InstrRow {
        name: t.name.clone(),
        per_request: total as f64 / served.max(1) as f64,
        requests: served,
        top: top_functions(&dump, args.top),
    })
}

fn write_key(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("audit.key"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )?;
    Ok(())
}

fn breakwater_target(
    name: &str,
    args: &InstrArgs,
    dir: &Path,
    mock: SocketAddr,
    extra: &str,
    audit: bool,
    path: &str,
) -> anyhow::Result<Target> {
    let (listen, admin, dead) = (free_port()?, free_port()?, free_port()?);
    let sub = dir.join(format!("bw-{listen}"));
    std::fs::create_dir_all(&sub)?;
    write_key(&sub)?;
    let cfg = sub.join("breakwater.toml");
    let text = breakwater_config(listen, admin, mock, dead, audit.then_some(sub.as_path()));
    std::fs::write(
        &cfg,
        format!(
            "{text}\n{}",
            extra.replace("{dir}", &sub.display().to_string())
        ),
    )?;
    Ok(Target {
        name: name.into(),
        program: args.proxy_bin.clone(),
        args: vec!["--config".into(), cfg.display().to_string()],
        addr: ([127, 0, 0, 1], listen).into(),
        path: path.into(),
        ready: (([127, 0, 0, 1], admin).into(), "/readyz".into()),
    })
}

/// The table: instructions per request, each row against the first, and the top functions.
pub fn report(rows: &[InstrRow], args: &InstrArgs) -> String {
    let mut out = format!(
        "## Instructions per request (callgrind, {} requests after {} warm-up, {} connections)\n\n\
         | target | instructions / request | vs breakwater |\n|---|---:|---:|\n",
        args.requests, args.warmup, args.connections
    );
    let base = rows.first().map(|r| r.per_request).unwrap_or(1.0);
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2}x |\n",
            r.name,
            r.per_request,
            r.per_request / base
        ));
    }
    for r in rows {
        out.push_str(&format!("\n### {}: costliest functions (exclusive)\n\n| Ir / request | function |\n|---:|---|\n", r.name));
        for (count, f) in &r.top {
            out.push_str(&format!(
                "| {:.0} | `{}` |\n",
                *count as f64 / r.requests.max(1) as f64,
                f.replace('|', "\\|")
            ));
        }
    }
    out
}

pub async fn instructions(args: InstrArgs) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("breakwater-instr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The mock runs natively: only the proxy is counted.
    let mock_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let _mock = Proc::spawn(
        "mock-ai",
        &args.mock_bin,
        &[
            "--listen".into(),
            mock_addr.to_string(),
            "--threads".into(),
            "1".into(),
        ],
        None,
        &[],
    )?;
    wait_http_ok(mock_addr, "/__mock/stats", Duration::from_secs(10)).await?;
    let path = "/v1/recommendations";
    let mut targets =
        vec![
        breakwater_target("breakwater", &args, &dir, mock_addr, "", false, path)?,
        breakwater_target("breakwater + decision log", &args, &dir, mock_addr, "", true, path)?,
        breakwater_target(
            "breakwater + access log (file)",
            &args,
            &dir,
            mock_addr,
            "[access_log]\npath = \"{dir}/access.jsonl\"\n",
            false,
            path,
        )?,
        breakwater_target(
            "breakwater + [tracing], request not sampled",
            &args,
            &dir,
            mock_addr,
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:9/v1/traces\"\nsampling_ratio = 0.0\n",
            false,
            path,
        )?,
        breakwater_target(
            "breakwater, breaker open: static fallback",
            &args,
            &dir,
            mock_addr,
            "",
            false,
            "/down/score",
        )?,
    ];
    // Issue 15's cost: a 2 KiB answer validated against the example schema, and 10% of
    // the requests mirrored to a shadow (the same mock), against the same answer unchecked.
    let schema = std::env::current_dir()?.join("config/schemas/recommendations.json");
    if schema.is_file() {
        let checked = |shadow: bool| {
            format!(
                "[[routes]]\nname = \"checked\"\npath_prefix = \"/checked/\"\nupstream = \"ai\"\n\
                 timeout_ms = 2000\nmodel_version_header = \"x-model-version\"\nresponse_schema = \"{}\"\n{}",
                schema.display(),
                if shadow {
                    "shadow = { upstream = \"ai\", percent = 10, compare_pointer = \"/items\" }\n"
                } else {
                    ""
                }
            )
        };
        targets.push(breakwater_target(
            "breakwater, 2 KiB answer",
            &args,
            &dir,
            mock_addr,
            "",
            false,
            "/recommend/2048",
        )?);
        targets.push(breakwater_target(
            "breakwater + response_schema, 2 KiB answer",
            &args,
            &dir,
            mock_addr,
            &checked(false),
            false,
            "/checked/recommend/2048",
        )?);
        targets.push(breakwater_target(
            "breakwater + response_schema + 10% shadow (same mock: equal answers), 2 KiB answer",
            &args,
            &dir,
            mock_addr,
            &checked(true),
            false,
            "/checked/recommend/2048",
        )?);
    } else {
        eprintln!(
            "{} not found (run from the repository root): the response_schema rows are left out",
            schema.display()
        );
    }
    for (name, bin) in [("nginx 1 worker", "nginx"), ("HAProxy 1 thread", "haproxy")] {
        if let Some(t) = peer_target(name, bin, &dir, mock_addr)? {
            targets.push(t);
        } else {
            eprintln!(
                "{bin} is not installed: its row is left out (loadtests/peer-bench.sh installs it)"
            );
        }
    }
    if !args.only.is_empty() {
        // A name matches itself exactly when one target has it ("breakwater" is only the
        // first row), else every target whose name contains it ("nginx").
        let exact: Vec<bool> = args
            .only
            .iter()
            .map(|o| targets.iter().any(|t| t.name == *o))
            .collect();
        targets.retain(|t| {
            args.only.iter().zip(&exact).any(|(o, &exact)| {
                if exact {
                    t.name == *o
                } else {
                    t.name.contains(o.as_str())
                }
            })
        });
    }
    let mut rows = Vec::new();
    // The /down/ route's breaker trips during its warm-up (5 connect errors, each answered
    // by the fallback); the measured requests all find it open.
    for t in &targets {
        eprintln!("measuring {} ...", t.name);
        rows.push(measure(t, &args, &dir).await?);
    }
    // The dumps stay for `callgrind_annotate --inclusive=yes DUMP`.
    eprintln!("callgrind dumps kept in {}", dir.display());
    Ok(report(&rows, &args))
}

fn peer_target(
    name: &str,
    bin: &str,
    dir: &Path,
    mock: SocketAddr,
) -> anyhow::Result<Option<Target>> {
    let Ok(found) = which(bin) else {
        return Ok(None);
    };
    let listen = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], listen).into();
    let sub = dir.join(format!("{bin}-{listen}"));
    std::fs::create_dir_all(&sub)?;
    let (args, ready_path) = match bin {
        "nginx" => {
            // One process (no master): callgrind counts the process that serves.
            let conf = sub.join("nginx.conf");
            let text = crate::bench::nginx_config(&sub, listen, mock)
                .replace("master_process on;", "master_process off;");
            std::fs::write(&conf, text)?;
            (
                vec![
                    "-c".into(),
                    conf.display().to_string(),
                    "-p".into(),
                    sub.display().to_string(),
                ],
                "/v1/recommendations",
            )
        }
        _ => {
            let conf = sub.join("haproxy.cfg");
            std::fs::write(&conf, crate::bench::haproxy_config(listen, mock))?;
            (
                vec!["-db".into(), "-f".into(), conf.display().to_string()],
                "/v1/recommendations",
            )
        }
    };
    Ok(Some(Target {
        name: name.into(),
        program: found,
        args,
        addr,
        path: "/v1/recommendations".into(),
        ready: (addr, ready_path.into()),
    }))
}

fn which(bin: &str) -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{bin} not found")
}
