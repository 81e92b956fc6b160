//! Hot reload triggers: a change to the config file (including replacement by rename, as
//! Kubernetes ConfigMaps do through a `..data` symlink swap), SIGHUP and `POST /admin/reload`.
//!
//! All triggers funnel into one `Reloader::reload`, serialized by a lock, which reads and
//! validates the file off the request path and hands the result to the installer. A bad
//! file keeps the old config serving; the errors are logged, counted and returned.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AuditConfig, Config, ConfigErrors};
use crate::telemetry;

/// What a successful reload produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    pub generation: u64,
    pub hash: String,
    /// False when the file's bytes were identical to the config in force.
    pub changed: bool,
}

/// Installs a validated config and returns its generation.
pub type Installer = Arc<
    dyn Fn(Config, &str) -> Pin<Box<dyn Future<Output = Result<u64, ConfigErrors>> + Send>>
        + Send
        + Sync,
>;

pub struct Reloader {
    path: PathBuf,
    install: Installer,
    current_hash: std::sync::Mutex<String>,
    current_generation: std::sync::atomic::AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(path: PathBuf, hash: String, generation: u64, install: Installer) -> Arc<Self> {
        Arc::new(Reloader {
            path,
            install,
            current_hash: std::sync::Mutex::new(hash),
            current_generation: std::sync::atomic::AtomicU64::new(generation),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reloads from disk. `force` reinstalls even when the bytes are unchanged (an admin
    /// asking for a reload expects certificates and body files to be re-read).
    pub async fn reload(&self, trigger: &str, force: bool) -> Result<ReloadOutcome, ConfigErrors> {
        let _serial = self.lock.lock().await;
        let path = self.path.clone();
        // Validation reads TLS material and body files: keep it off the async workers.
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ConfigErrors {
                errors: vec![super::ConfigError {
                    path: "reload".into(),
                    message: format!("validation task failed: {e}"),
                }],
            })
            .and_then(|r| r);
        let config = match loaded {
            Ok(c) => c,
            Err(errors) => {
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "error").increment(1);
                tracing::error!(trigger, path = %self.path.display(), %errors, "config reload rejected; the previous config keeps serving");
                return Err(errors);
            }
        };
        let same = self
            .current_hash
            .lock()
            .map(|h| *h == config.hash)
            .unwrap_or(false);
        if same && !force {
            return Ok(ReloadOutcome {
                generation: self
                    .current_generation
                    .load(std::sync::atomic::Ordering::Relaxed),
                hash: config.hash,
                changed: false,
            });
        }
        let hash = config.hash.clone();
        match (self.install)(config, trigger).await {
            Ok(generation) => {
                if let Ok(mut h) = self.current_hash.lock() {
                    *h = hash.clone();
                }
                self.current_generation
                    .store(generation, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "ok").increment(1);
                metrics::gauge!(telemetry::CONFIG_GENERATION).set(generation as f64);
                tracing::info!(trigger, generation, %hash, "config reloaded");
                Ok(ReloadOutcome {
                    generation,
                    hash,
                    changed: !same,
                })
            }
            Err(errors) => {
                metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "error").increment(1);
                tracing::error!(trigger, %errors, "config reload rejected; the previous config keeps serving");
                Err(errors)
            }
        }
    }
}

/// Watches the config file's directory (not the file: a rename replaces the inode the
/// watch would be on) and reloads, debounced, when anything there changes. Unchanged
/// bytes are ignored by `reload`, so noise in the directory costs one read.
pub fn watch_file(
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    let dir = reloader
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(tokio::spawn(async move {
        // Keep the watcher alive for as long as the task runs.
        let _watcher = watcher;
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            // Editors and `kubectl` write in several steps: let them settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let _ = reloader.reload("file_change", false).await;
        }
    }))
}

/// Reloads on SIGHUP.
pub fn on_sighup(
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            let _ = reloader.reload("sighup", true).await;
        }
    }))
}

/// Keys read once at start: a reload that changes any of them is refused, each named by
/// its key path, rather than accepted and ignored.
pub fn refuse_restart_only(old: &Config, new: &Config) -> Result<(), ConfigErrors> {
    let mut keys: Vec<String> = Vec::new();
    dlq_keys(old, new, &mut keys);
    audit_keys(old, new, &mut keys);
    replayable_keys(old, new, &mut keys);
    // The writer thread and its file are opened once.
    if old.access_log != new.access_log {
        keys.push("access_log".into());
    }
    // The exporter and its batch thread are built once.
    if old.tracing != new.tracing {
        keys.push("tracing".into());
    }
    // The connection caps size the listeners' semaphores, built once at start.
    if old.server.max_connections != new.server.max_connections {
        keys.push("server.max_connections".into());
    }
    if old.server.admin_max_connections != new.server.admin_max_connections {
        keys.push("server.admin_max_connections".into());
    }
    if keys.is_empty() {
        return Ok(());
    }
    Err(ConfigErrors {
        errors: keys
            .into_iter()
            .map(|path| super::ConfigError {
                path,
                message: "read once at start: a restart is needed to change it; reload refused"
                    .into(),
            })
            .collect(),
    })
}

/// Pushes `prefix.field` for every listed field that differs between `a` and `b`.
macro_rules! changed {
    ($keys:expr, $prefix:literal, $a:expr, $b:expr, [$($field:ident),+ $(,)?]) => {
        {
            $(if $a.$field != $b.$field {
                $keys.push(format!("{}.{}", $prefix, stringify!($field)));
            })+
        }
    };
}

fn dlq_keys(old: &Config, new: &Config, keys: &mut Vec<String>) {
    match (&old.dlq, &new.dlq) {
        (Some(a), Some(b)) => changed!(
            keys,
            "dlq",
            a,
            b,
            [
                amqp_url,
                exchange,
                spool_dir,
                spool_max_bytes,
                segment_bytes,
                fsync_interval,
                replay_rate_per_s,
                max_replay_attempts,
                delivery_limit,
                prefetch,
                confirm_timeout,
                queued_wait,
                results_exchange,
            ]
        ),
        (None, None) => {}
        // Adding or removing the DLQ (a [dlq] section, or the default one replayable
        // routes bring) starts or stops the spool and the replay workers.
        _ => keys.push("dlq".into()),
    }
}

fn audit_keys(old: &Config, new: &Config, keys: &mut Vec<String>) {
    match (&old.audit, &new.audit) {
        (Some(a), Some(b)) => changed!(
            keys,
            "audit",
            a,
            b,
            [
                path,
                hmac_key,
                key_id,
                redact_headers,
                rotate_bytes,
                retention_days,
                on_full_drop,
                block_timeout,
                channel_capacity,
                fsync_interval,
                fsync_max_records,
                publish,
            ]
        ),
        (None, None) => {}
        _ => keys.push("audit".into()),
    }
    // The checkpoint key and interval are the writer's, set at start.
    if let (Some(a), Some(b)) = (&old.audit, &new.audit) {
        let key = |c: &AuditConfig| c.checkpoint.as_ref().map(|c| c.signer.key_id().to_string());
        if key(a) != key(b) {
            keys.push("audit.signing_key_file".into());
        }
        let interval = |c: &AuditConfig| c.checkpoint.as_ref().map(|c| c.interval);
        if interval(a) != interval(b) {
            keys.push("audit.checkpoint_interval_ms".into());
        }
    }
}

/// The replay workers and the DLQ layer are built per replayable route at start.
fn replayable_keys(old: &Config, new: &Config, keys: &mut Vec<String>) {
    let replayable =
        |c: &Config, name: &str| c.routes.iter().any(|r| r.replayable && &*r.name == name);
    let mut names: Vec<&str> = old
        .routes
        .iter()
        .chain(new.routes.iter())
        .map(|r| &*r.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        if replayable(old, name) != replayable(new, name) {
            keys.push(format!("routes.{name}.replayable"));
        }
    }
}

#[cfg(test)]
mod restart_only_tests {
    use super::*;

    fn config(spool: &str, replayable: bool) -> Config {
        Config::from_toml(&format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
             [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\nreplayable={replayable}\n[dlq]\nspool_dir=\"{spool}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_changed_spool_dir_or_replayable_set_is_refused_by_name() {
        assert!(refuse_restart_only(&config("a", true), &config("a", true)).is_ok());
        let e = refuse_restart_only(&config("a", true), &config("b", true)).unwrap_err();
        assert_eq!(e.errors[0].path, "dlq.spool_dir");
        let e = refuse_restart_only(&config("a", true), &config("a", false)).unwrap_err();
        assert_eq!(e.errors[0].path, "routes.r.replayable");
    }

    /// `[audit]` with a signing key (from `audit keygen`) and `extra` keys.
    fn signed(dir: &std::path::Path, extra: &str) -> Result<Config, ConfigErrors> {
        let hmac = dir.join("hmac.key");
        std::fs::write(&hmac, "ab".repeat(32)).unwrap();
        let keys = dir.join("keys");
        if !keys.join("signing.key").exists() {
            crate::audit::checkpoint::keygen(&keys).unwrap();
        }
        Config::from_toml(&format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n\
             [upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
             [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\n\
             [audit]\npath=\"{}\"\nhmac_key_file=\"{}\"\n{extra}\n",
            dir.join("d.jsonl").display(),
            hmac.display()
        ))
    }

    #[test]
    fn checkpoint_keys_are_validated_and_read_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("keys/signing.key");
        let e = signed(dir.path(), "checkpoint_interval_ms = 1000").unwrap_err();
        assert_eq!(e.errors[0].path, "audit.checkpoint_interval_ms");
        let with_key = format!("signing_key_file = \"{}\"", key.display());
        let a = signed(dir.path(), &with_key).unwrap();
        let cp = a.audit.as_ref().unwrap().checkpoint.as_ref().unwrap();
        assert_eq!(cp.interval, std::time::Duration::from_secs(60));
        let b = signed(
            dir.path(),
            &format!("{with_key}\ncheckpoint_interval_ms = 1000"),
        )
        .unwrap();
        let e = refuse_restart_only(&a, &b).unwrap_err();
        assert_eq!(e.errors[0].path, "audit.checkpoint_interval_ms");
        let plain = signed(dir.path(), "").unwrap();
        let e = refuse_restart_only(&plain, &a).unwrap_err();
        assert_eq!(e.errors[0].path, "audit.signing_key_file");
        std::fs::write(&key, "not hex").unwrap();
        let e = signed(dir.path(), &with_key).unwrap_err();
        assert_eq!(e.errors[0].path, "audit.signing_key_file");
    }

    #[test]
    fn a_changed_connection_cap_is_refused_by_name() {
        let old = config("a", true);
        let mut new = config("a", true);
        new.server.max_connections += 1;
        new.server.admin_max_connections += 1;
        let e = refuse_restart_only(&old, &new).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["server.max_connections", "server.admin_max_connections"]
        );
    }
}
