//! The `breakwater` binary: CLI -> config::load -> app::run. The only place that exits.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use breakwater::app::{self, Listeners};
use breakwater::config::Config;

/// mimalloc: per-thread free lists that take frees from other threads without a lock
/// (the decision log's writer frees what request tasks allocate), no heap trimming churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "Resilience sidecar between Magento and AI services"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(
        long,
        global = true,
        env = "BREAKWATER_CONFIG",
        default_value = "config/breakwater.toml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config; print every error with its key path; exit 1 if any.
    Check,
    /// Decision log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Local DLQ spool tools.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain across files (rotated files included). With --public-key,
    /// also every checkpoint's signature: exit 1 when the chain is broken, a checkpoint is
    /// forged or none is signed by the key; exit 2 when the chain holds but the log does
    /// not end at a checkpoint (records after it are unanchored: cut, crashed, or live).
    Verify {
        paths: Vec<PathBuf>,
        /// The writer's `signing.pub` (from `audit keygen`).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Print the change trail (config reloads with the routes changed, admin changes with
    /// the token's fingerprint, canary rollbacks) as a table, oldest first.
    Changes {
        paths: Vec<PathBuf>,
        /// Only changes at or after this time (RFC 3339, e.g. 2026-12-02T14:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
    /// Write the patch-window evidence report into --out: report.md, report.html
    /// (self-contained: inline CSS and SVG, no script, no URL) and report.json, from the
    /// chain alone: traffic per route and model version, canary rollbacks, unapproved
    /// versions, schema violations, degraded time against the RTO, DLQ, changes, verify.
    Report {
        paths: Vec<PathBuf>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only records at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// The writer's `signing.pub`: check the checkpoints' signatures too.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Directory of the three files (made if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a new checkpoint signing key pair into DIR: signing.key (0600, for
    /// `[audit] signing_key_file`) and signing.pub (for `audit verify --public-key`).
    Keygen { dir: PathBuf },
    /// Print the records of one request.
    Find {
        #[arg(long)]
        request_id: String,
        paths: Vec<PathBuf>,
    },
    /// Collect the decision log copies of a fleet from RabbitMQ into OUT/<instance>/,
    /// one verifiable chain per instance; gaps, conflicts and rejected messages are
    /// reported (exit status 2).
    Collect {
        /// RabbitMQ URL; the nodes of a cluster as a comma-separated list (or repeat it).
        #[arg(
            long,
            env = "BREAKWATER_AMQP_URL",
            value_delimiter = ',',
            required = true
        )]
        amqp: Vec<String>,
        /// Directory of the collected file sets.
        #[arg(long)]
        out: PathBuf,
        /// The sidecars' `[audit] publish_exchange`.
        #[arg(long, default_value = "breakwater.audit")]
        exchange: String,
        /// The collector's quorum queue (single active consumer: a second collector on
        /// the same queue is a standby).
        #[arg(long, default_value = "breakwater.audit.collect")]
        queue: String,
        /// Rotate an instance's decisions.jsonl past this size.
        #[arg(long, default_value_t = 256 * 1024 * 1024)]
        rotate_bytes: u64,
        /// Exit after this many seconds without a message.
        #[arg(long)]
        idle_exit_s: Option<u64>,
        /// Exit once this many messages were handled.
        #[arg(long)]
        max_messages: Option<u64>,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// List what a spool directory holds.
    Inspect { dir: PathBuf },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a container log gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Audit { command }) => report(audit(command)),
        Some(Command::Spool { command }) => report(spool(command)),
        None => report(run(cli.config)),
    }
}

/// One runtime thread per CPU this process may use (affinity and cgroup quota, as
/// `available_parallelism` reads them). On one CPU, the usual sidecar budget, the
/// single-threaded scheduler: no work-stealing, no cross-thread wake-ups, about a fifth
/// less CPU per proxied request than a one-worker multi-threaded runtime (loadtests README).
fn runtime() -> std::io::Result<(tokio::runtime::Runtime, &'static str, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok((rt, "current_thread", cpus))
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus)
            .enable_all()
            .build()?;
        Ok((rt, "multi_thread", cpus))
    }
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("breakwater: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set in the container image: the public example key is fatal there, while a local
/// `cargo run` on the example config only warns.
const REFUSE_EXAMPLE_KEY: &str = "BREAKWATER_REFUSE_EXAMPLE_KEY";

fn refuse_example_key() -> bool {
    std::env::var(REFUSE_EXAMPLE_KEY)
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// The refusal when the example key is in use and the environment forbids it.
fn example_key_refusal(cfg: &Config) -> Option<String> {
    (cfg.uses_example_key() && refuse_example_key()).then(|| {
        format!(
            "audit.hmac_key_file is the public example key and {REFUSE_EXAMPLE_KEY} is set: \
             mount a key of your own (see the README, \"Secrets in Kubernetes\"), or set \
             {REFUSE_EXAMPLE_KEY}=0 for a throwaway local run"
        )
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            for w in cfg.warnings() {
                eprintln!("{}: WARNING: {}", path.display(), w);
            }
            if let Some(refusal) = example_key_refusal(&cfg) {
                eprintln!("{}: {refusal}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!(
                "{}: ok ({} routes, {} upstreams, hash {})",
                path.display(),
                cfg.routes.len(),
                cfg.upstreams.len(),
                &cfg.hash[..12]
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("{}: {}", path.display(), e);
            }
            eprintln!("{} error(s)", errors.errors.len());
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = Config::load(&path).map_err(|errors| {
        for e in &errors.errors {
            tracing::error!(path = %e.path, "{}", e.message);
        }
        anyhow::anyhow!(
            "{} config error(s) in {}",
            errors.errors.len(),
            path.display()
        )
    })?;
    for w in config.warnings() {
        tracing::warn!(path = %w.path, "WARNING: {}", w.message);
    }
    if let Some(refusal) = example_key_refusal(&config) {
        anyhow::bail!(refusal);
    }
    let (rt, flavour, cpus) = runtime().context("cannot start the tokio runtime")?;
    tracing::info!(runtime = flavour, cpus, "tokio runtime");
    rt.block_on(async move {
        let listeners = Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        app::run(path, config, listeners, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match command {
        AuditCommand::Verify { paths, .. }
        | AuditCommand::Find { paths, .. }
        | AuditCommand::Changes { paths, .. }
        | AuditCommand::Report { paths, .. }
            if paths.is_empty() =>
        {
            anyhow::bail!("give at least one decision log file or directory")
        }
        AuditCommand::Changes { paths, since } => {
            let since = parse_time("--since", since)?;
            let changes = breakwater::cli::audit_changes(&paths, since)?;
            out.write_all(breakwater::cli::changes_table(&changes).as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Keygen { dir } => {
            let pair = breakwater::cli::keygen(&dir)
                .with_context(|| format!("cannot write a key pair into {}", dir.display()))?;
            writeln!(
                out,
                "key id {}: {} (secret, 0600: [audit] signing_key_file) and {} (public: audit verify --public-key)",
                pair.key_id,
                pair.key_file.display(),
                pair.pub_file.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { paths, public_key } => {
            let key = load_key(public_key.as_deref())?;
            verify(&mut out, &paths, key.as_ref())
        }
        AuditCommand::Report {
            paths,
            since,
            until,
            public_key,
            out: dir,
        } => {
            let window = breakwater::cli::ReportWindow {
                since: parse_time("--since", since)?,
                until: parse_time("--until", until)?,
            };
            if let (Some(since), Some(until)) = (window.since, window.until) {
                anyhow::ensure!(since <= until, "--since is after --until");
            }
            let key = load_key(public_key.as_deref())?;
            let report = breakwater::cli::audit_report(&paths, window, key.as_ref())
                .context("cannot read the decision log")?;
            let written = breakwater::cli::write_report(&report, &dir)
                .with_context(|| format!("cannot write the report into {}", dir.display()))?;
            for file in [&written.markdown, &written.html, &written.json] {
                writeln!(out, "{}", file.display())?;
            }
            if !report.verify.chain_ok {
                eprintln!("breakwater: WARNING: the chain is broken; the report says where");
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Collect {
            amqp,
            out: dir,
            exchange,
            queue,
            rotate_bytes,
            idle_exit_s,
            max_messages,
        } => {
            let urls: Vec<String> = amqp.iter().map(|u| u.trim().to_string()).collect();
            if let Some((i, bad)) = urls
                .iter()
                .enumerate()
                .find(|(_, u)| !(u.starts_with("amqp://") || u.starts_with("amqps://")))
            {
                anyhow::bail!("--amqp[{i}]: must start with amqp:// or amqps://: {bad:?}");
            }
            let endpoints =
                breakwater::cli::Endpoints::new(urls).context("--amqp: give at least one URL")?;
            let settings = breakwater::cli::CollectSettings {
                endpoints,
                exchange,
                queue,
                out: dir,
                rotate_bytes: rotate_bytes.max(4096),
                idle_exit: idle_exit_s.map(std::time::Duration::from_secs),
                max_messages,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let summary = rt.block_on(async move {
                let stop = CancellationToken::new();
                let signal = stop.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                breakwater::cli::audit_collect(settings, stop).await
            })?;
            for (name, i) in &summary.instances {
                writeln!(
                    out,
                    "{name}: {} written (seq {}..{}), {} duplicate(s) dropped, {} gap(s) ({} record(s) missing), {} conflict(s), {} late",
                    i.written,
                    i.first_seq.map_or("-".into(), |s| s.to_string()),
                    i.last_seq.map_or("-".into(), |s| s.to_string()),
                    i.duplicates,
                    i.gaps,
                    i.missing,
                    i.conflicts,
                    i.late,
                )?;
            }
            writeln!(
                out,
                "{}: {} message(s), {} instance(s), {} rejected",
                if summary.has_problems() {
                    "INCOMPLETE"
                } else {
                    "ok"
                },
                summary.messages,
                summary.instances.len(),
                summary.rejected
            )?;
            Ok(if summary.has_problems() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Find { request_id, paths } => {
            let records = breakwater::cli::find_request(&paths, &request_id)?;
            for r in &records {
                writeln!(out, "{r}")?;
            }
            Ok(if records.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// An optional RFC 3339 time given to `flag`.
fn parse_time(flag: &str, t: Option<String>) -> anyhow::Result<Option<std::time::SystemTime>> {
    t.map(|t| {
        humantime::parse_rfc3339_weak(&t)
            .with_context(|| format!("{flag}: not an RFC 3339 time: {t:?}"))
    })
    .transpose()
}

/// The checkpoint public key of `--public-key`, if given.
fn load_key(file: Option<&std::path::Path>) -> anyhow::Result<Option<breakwater::cli::PublicKey>> {
    file.map(|f| breakwater::cli::PublicKey::load(f).map_err(|e| anyhow::anyhow!(e)))
        .transpose()
}

fn spool(command: SpoolCommand) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match command {
        SpoolCommand::Inspect { dir } => {
            let report = breakwater::cli::spool_inspect(&dir)
                .with_context(|| format!("cannot read the spool in {}", dir.display()))?;
            std::io::stdout()
                .lock()
                .write_all(report.table().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `audit verify`: the chain, and with a key the checkpoints (exit codes on `Verify`).
fn verify(
    out: &mut impl std::io::Write,
    paths: &[PathBuf],
    key: Option<&breakwater::cli::PublicKey>,
) -> anyhow::Result<ExitCode> {
    let report = match breakwater::cli::verify_signed(paths, key) {
        Ok(report) => report,
        Err(e) => {
            writeln!(out, "BROKEN: {e}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let seq = |s: Option<u64>| s.map_or_else(|| "-".to_string(), |s| s.to_string());
    writeln!(
        out,
        "ok: {} records in {} file(s), seq {}..{}, last hash {}",
        report.records,
        report.files,
        seq(report.first_seq),
        seq(report.last_seq),
        report.last_hash.as_deref().unwrap_or("-")
    )?;
    if report.records_lost > 0 {
        // The chain is intact, but the log is not complete: say so loudly.
        writeln!(
            out,
            "WARNING: records_lost: {} decision record(s) were lost (records_lost events at seq {:?})",
            report.records_lost, report.loss_events
        )?;
    }
    let Some(key_id) = &report.signed_by else {
        if report.checkpoints > 0 {
            writeln!(
                out,
                "{} checkpoint(s), signatures not checked: give --public-key",
                report.checkpoints
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    writeln!(
        out,
        "signed: {} checkpoint(s) verified under key {key_id}; the log proves {} .. {} (seq {}..{})",
        report.checkpoints,
        report.first_ts.as_deref().unwrap_or("-"),
        report.last_checkpoint_ts.as_deref().unwrap_or("-"),
        seq(report.first_seq),
        seq(report.last_checkpoint_seq),
    )?;
    if report.ends_at_checkpoint() {
        writeln!(out, "ends at a checkpoint: every record is anchored")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "UNANCHORED: the log does not end at a checkpoint: {} record(s) after seq {} are vouched for by no signature (the log was cut, its writer crashed, or it is still being written)",
        report.unanchored,
        seq(report.last_checkpoint_seq),
    )?;
    Ok(ExitCode::from(2))
}
