//! `cargo run -p loadtests --release -- bench ...`: the SRE's load-test entry point.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "breakwater load tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// breakwater vs nginx vs HAProxy on the same mock and load (installs nothing: see
    /// loadtests/peer-bench.sh).
    Peer {
        #[arg(long, default_value = "target/release/breakwater")]
        proxy_bin: PathBuf,
        #[arg(long, default_value = "target/release/mock-ai")]
        mock_bin: PathBuf,
        /// Fixed rates for the latency runs.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long)]
        pin: bool,
        #[arg(long, default_value = "loadtests/reports")]
        report_dir: PathBuf,
    },
    /// Run scenarios (files in loadtests/scenarios/), check their invariants, write reports.
    Run {
        scenarios: Vec<PathBuf>,
        #[arg(long, default_value = "target/release/breakwater")]
        proxy_bin: PathBuf,
        #[arg(long, default_value = "loadtests/reports")]
        report_dir: PathBuf,
        /// Scale every duration and timeline time (CI smoke runs use 0.25).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Scale the offered rate.
        #[arg(long, default_value_t = 1.0)]
        rate_scale: f64,
    },
    /// Open-loop load against a running target (breakwater or anything HTTP on loopback):
    /// prints its latency row; with --pid, the CPU that process spent per request.
    Load {
        /// host:port, loopback only.
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value = "/v1/recommendations")]
        path: String,
        /// Requests per second; 0 = closed loop, as fast as the connections go.
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Process whose CPU time per request to report (for example breakwater's).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Chaos runs with checked invariants: kill9, broker, soak (exit 1 if one fails).
    Chaos {
        #[command(subcommand)]
        run: ChaosCmd,
        #[arg(long, global = true, default_value = "target/release/breakwater")]
        proxy_bin: PathBuf,
        /// Work files (spool, config, logs) and the JSON report go here.
        #[arg(long, global = true, default_value = "loadtests/reports/chaos")]
        out: PathBuf,
    },
    /// User-space instructions per request under callgrind (deterministic): breakwater with
    /// the decision log off and on, the access log, unsampled tracing, the fallback path,
    /// and nginx / HAProxy when installed; the costliest functions of each.
    Instructions {
        #[arg(long, default_value = "target/release/breakwater")]
        proxy_bin: PathBuf,
        #[arg(long, default_value = "target/release/mock-ai")]
        mock_bin: PathBuf,
        /// Requests counted per target (after the warm-up).
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        #[arg(long, default_value_t = 500)]
        warmup: u64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Functions listed per target.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Only this target (repeatable): a whole name (`--only breakwater` is the first row
        /// alone), else every target whose name contains it (`--only nginx`).
        #[arg(long)]
        only: Vec<String>,
        #[arg(long, default_value = "loadtests/reports")]
        report_dir: PathBuf,
    },
    /// RabbitMQ's own ceiling for breakwater's dead letters here: a minimal lapin publisher
    /// (persistent, mandatory, confirms, a fresh quorum queue with the DLQ arguments, deleted
    /// afterwards), one run per confirm window; the best is the drainer's yardstick.
    RabbitCeiling {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        /// Messages per window.
        #[arg(long, default_value_t = 50_000)]
        messages: u64,
        #[arg(long, value_delimiter = ',', default_value = "1,64,256,1024")]
        windows: Vec<usize>,
        #[arg(long, default_value = "breakwater.dlq")]
        exchange: String,
        /// Request body size the dead letter carries (base64-encoded in it).
        #[arg(long, default_value_t = 93)]
        body_bytes: usize,
        #[arg(long, default_value = "loadtests/reports")]
        report_dir: PathBuf,
    },
    /// Mock AI directly vs through breakwater, side by side in one run.
    Bench {
        #[arg(long, default_value = "target/release/breakwater")]
        proxy_bin: PathBuf,
        #[arg(long, default_value = "target/release/mock-ai")]
        mock_bin: PathBuf,
        /// Fixed offered rate for the latency runs (req/s).
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Pin breakwater to core 0 and the mock + driver to core 1 (taskset).
        #[arg(long)]
        pin: bool,
        /// Also run breakwater with the decision log on.
        #[arg(long)]
        audit: bool,
        /// With --audit: alternating log off/on max-throughput runs per side, compared by
        /// median (one pair moves by several percent on a shared machine).
        #[arg(long, default_value_t = 5)]
        ab_rounds: usize,
        /// Write the Markdown report here too.
        #[arg(long, default_value = "loadtests/reports")]
        report_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ChaosCmd {
    /// SIGKILL breakwater in a loop during a DLQ burst; every acknowledged message must
    /// reach RabbitMQ (the shared broker is fine: nothing is stopped there).
    Kill9 {
        #[arg(long, default_value_t = 100)]
        loops: u32,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 150)]
        kill_min_ms: u64,
        #[arg(long, default_value_t = 700)]
        kill_max_ms: u64,
        #[arg(long, default_value = loadtests::chaos::SHARED_AMQP)]
        amqp_url: String,
    },
    /// An own RabbitMQ node (never the shared one) restarted under DLQ load.
    Broker {
        #[arg(long, default_value_t = 10)]
        restarts: u32,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds of load between restarts.
        #[arg(long, default_value_t = 5.0)]
        up_s: f64,
        /// Seconds the node stays down.
        #[arg(long, default_value_t = 2.0)]
        down_s: f64,
        #[arg(long, default_value_t = 5690)]
        amqp_port: u16,
    },
    /// Steady load with the decision log and the DLQ on; RSS and open fds start vs end.
    Soak {
        #[arg(long, default_value_t = 600)]
        duration: u64,
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        sample_every_s: u64,
        #[arg(long, default_value_t = 30)]
        warmup_s: u64,
        #[arg(long, default_value = loadtests::chaos::SHARED_AMQP)]
        amqp_url: String,
    },
}

fn chaos(run: ChaosCmd, proxy_bin: PathBuf, out: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (name, ok, json) = match run {
        ChaosCmd::Kill9 {
            loops,
            clients,
            kill_min_ms,
            kill_max_ms,
            amqp_url,
        } => {
            let r = rt.block_on(loadtests::chaos::kill9(&loadtests::chaos::Kill9Args {
                proxy_bin,
                loops,
                clients,
                kill_after_ms: (kill_min_ms, kill_max_ms),
                amqp_url,
                work_dir: out.join(format!("{stamp}-kill9")),
                drain_within: Duration::from_secs(300),
            }))?;
            ("kill9", r.ok, serde_json::to_string_pretty(&r)?)
        }
        ChaosCmd::Broker {
            restarts,
            rate,
            clients,
            up_s,
            down_s,
            amqp_port,
        } => {
            let r = rt.block_on(loadtests::chaos::broker(&loadtests::chaos::BrokerArgs {
                proxy_bin,
                restarts,
                rate,
                clients,
                up: Duration::from_secs_f64(up_s),
                down: Duration::from_secs_f64(down_s),
                amqp_port,
                work_dir: out.join(format!("{stamp}-broker")),
                drain_within: Duration::from_secs(300),
            }))?;
            ("broker", r.ok, serde_json::to_string_pretty(&r)?)
        }
        ChaosCmd::Soak {
            duration,
            rate,
            sample_every_s,
            warmup_s,
            amqp_url,
        } => {
            let r = rt.block_on(loadtests::chaos::soak(&loadtests::chaos::SoakArgs {
                proxy_bin,
                duration: Duration::from_secs(duration),
                rate,
                amqp_url,
                work_dir: out.join(format!("{stamp}-soak")),
                sample_every: Duration::from_secs(sample_every_s),
                warmup: Duration::from_secs(warmup_s),
            }))?;
            ("soak", r.ok, serde_json::to_string_pretty(&r)?)
        }
    };
    std::fs::create_dir_all(&out)?;
    let path = out.join(format!("{stamp}-{name}.json"));
    std::fs::write(&path, &json)?;
    #[allow(clippy::print_stdout)]
    {
        println!("{json}");
    }
    eprintln!(
        "chaos {name}: {} (report {})",
        if ok { "PASS" } else { "FAIL" },
        path.display()
    );
    anyhow::ensure!(ok, "chaos {name}: an invariant failed");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Chaos {
            run,
            proxy_bin,
            out,
        } => chaos(run, proxy_bin, out)?,
        Cmd::Run {
            scenarios,
            proxy_bin,
            report_dir,
            time_scale,
            rate_scale,
        } => {
            // The mock and the driver share this runtime; breakwater is a child process.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let args = loadtests::scenario::RunArgs {
                proxy_bin,
                report_dir,
                time_scale,
                rate_scale,
            };
            let mut failed = Vec::new();
            for path in &scenarios {
                let (ok, md) = rt.block_on(loadtests::scenario::run(path, &args))?;
                let head: Vec<&str> = md
                    .lines()
                    .take_while(|l| !l.starts_with("## Per second"))
                    .collect();
                eprintln!("{}", head.join("\n"));
                eprintln!("{}: {}", path.display(), if ok { "PASS" } else { "FAIL" });
                if !ok {
                    failed.push(path.display().to_string());
                }
            }
            if !failed.is_empty() {
                anyhow::bail!("scenario invariants failed: {}", failed.join(", "));
            }
        }
        Cmd::Load {
            target,
            path,
            rate,
            duration,
            connections,
            pid,
        } => {
            anyhow::ensure!(
                target.ip().is_loopback(),
                "load tests send traffic to loopback only, not {target}"
            );
            let mut spec = loadtests::driver::LoadSpec::get(target, &path);
            spec.rate = (rate > 0.0).then_some(rate);
            spec.duration = Duration::from_secs(duration);
            spec.connections = connections;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let name = format!(
                "{target}{path} @ {}",
                if rate > 0.0 {
                    format!("{rate} req/s")
                } else {
                    "max".into()
                }
            );
            let row = rt.block_on(loadtests::bench::measure(&name, spec, pid))?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", loadtests::bench::table(&[row]));
            }
        }
        Cmd::Peer {
            proxy_bin,
            mock_bin,
            rates,
            duration,
            connections,
            pin,
            report_dir,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(loadtests::bench::peer(
                loadtests::bench::BenchArgs {
                    proxy_bin,
                    mock_bin,
                    rate: rates.first().copied().unwrap_or(1000.0),
                    duration: Duration::from_secs(duration),
                    connections,
                    pin,
                    audit: true,
                    ab_rounds: 0,
                },
                &rates,
            ))?;
            std::fs::create_dir_all(&report_dir)?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            std::fs::write(report_dir.join(format!("{stamp}-peer.md")), &report)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{report}");
            }
        }
        Cmd::Instructions {
            proxy_bin,
            mock_bin,
            requests,
            warmup,
            connections,
            top,
            only,
            report_dir,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(loadtests::instructions::instructions(
                loadtests::instructions::InstrArgs {
                    proxy_bin,
                    mock_bin,
                    requests,
                    warmup,
                    connections,
                    top,
                    only,
                },
            ))?;
            save_report(&report_dir, "instructions", &report)?;
        }
        Cmd::RabbitCeiling {
            amqp_url,
            messages,
            windows,
            exchange,
            body_bytes,
            report_dir,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let args = loadtests::ceiling::CeilingArgs {
                amqp_url,
                messages,
                windows,
                exchange,
                body_bytes,
            };
            let size =
                loadtests::ceiling::representative_envelope("grading-0", body_bytes, 0).len();
            let rows = rt.block_on(loadtests::ceiling::ceiling(&args))?;
            save_report(
                &report_dir,
                "rabbit-ceiling",
                &loadtests::ceiling::table(&rows, size),
            )?;
        }
        Cmd::Bench {
            proxy_bin,
            mock_bin,
            rate,
            duration,
            connections,
            pin,
            audit,
            ab_rounds,
            report_dir,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(loadtests::bench::bench(loadtests::bench::BenchArgs {
                proxy_bin,
                mock_bin,
                rate,
                duration: Duration::from_secs(duration),
                connections,
                pin,
                audit,
                ab_rounds,
            }))?;
            save_report(&report_dir, "bench", &report)?;
        }
    }
    Ok(())
}

/// Writes a Markdown report to `<dir>/<unix time>-<kind>.md` and prints it.
fn save_report(dir: &std::path::Path, kind: &str, report: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("{stamp}-{kind}.md"));
    std::fs::write(&path, report)?;
    eprintln!("report written to {}", path.display());
    #[allow(clippy::print_stdout)]
    {
        println!("{report}");
    }
    Ok(())
}
