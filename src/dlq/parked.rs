//! The local parked area (spool-only mode): dead letters whose replay the AI refused for
//! good (a 4xx, or `max_replay_attempts` failures) leave the spool's queue so they hold
//! back nothing, and wait here, fsync'd, until an operator requeues them
//! (`POST /admin/dlq/parked/requeue?route=NAME`). `breakwater spool inspect` lists them.
//!
//! One file per route, `<spool_dir>/parked/<route>.park`, framed like spool records.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::spool::{self, encode_record};
use super::Envelope;

/// One parked message as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Parked {
    pub parked_at: String,
    pub reason: String,
    pub envelope: Envelope,
}

/// Serialises parking and requeueing of one spool's parked area.
#[derive(Debug)]
pub struct ParkedStore {
    dir: PathBuf,
    lock: Mutex<()>,
}

pub fn parked_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join("parked")
}

/// Route names become file names: keep them readable, never a path.
fn file_name(route: &str) -> String {
    let safe: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.park")
}

impl ParkedStore {
    pub fn new(spool_dir: &Path) -> Self {
        ParkedStore {
            dir: parked_dir(spool_dir),
            lock: Mutex::new(()),
        }
    }

    /// Appends and fsyncs: the caller moves past the message only once this returned Ok.
    pub fn park(&self, env: &Envelope, reason: &str) -> std::io::Result<()> {
        let entry = Parked {
            parked_at: crate::audit::rfc3339(std::time::SystemTime::now()),
            reason: reason.to_string(),
            envelope: env.clone(),
        };
        let payload = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        let msg_id = uuid::Uuid::parse_str(&env.msg_id)
            .map(|u| *u.as_bytes())
            .unwrap_or([0; 16]);
        let mut buf = Vec::with_capacity(payload.len() + 64);
        encode_record(&mut buf, &msg_id, &payload);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let new_dir = !self.dir.exists();
        crate::private_fs::create_dir_all(&self.dir)?;
        let mut f = crate::private_fs::open(
            OpenOptions::new().create(true).append(true),
            &self.dir.join(file_name(&env.route)),
        )?;
        f.write_all(&buf)?;
        f.sync_data()?;
        if new_dir {
            if let Some(parent) = self.dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Takes every parked message of `route` out of the parked area: the file is renamed
    /// aside (so new parkings start a fresh one) and read. Call `done` once the messages
    /// are back in the spool; until then a crash leaves them parked.
    pub fn take(&self, route: &str) -> std::io::Result<(Vec<Parked>, Option<PathBuf>)> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(file_name(route));
        let taken = path.with_extension("requeue");
        if !taken.exists() {
            match std::fs::rename(&path, &taken) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((Vec::new(), None))
                }
                Err(e) => return Err(e),
            }
        }
        let entries = read_file(&taken)?
            .into_iter()
            .filter(|p| p.envelope.route == route)
            .collect();
        Ok((entries, Some(taken)))
    }

    pub fn done(&self, taken: &Path) -> std::io::Result<()> {
        std::fs::remove_file(taken)
    }
}

fn read_file(path: &Path) -> std::io::Result<Vec<Parked>> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    Ok(spool::parse_plain(&data)
        .into_iter()
        .filter_map(|p| serde_json::from_slice(&p).ok())
        .collect())
}

/// Every parked message under `spool_dir` (for `spool inspect`), oldest file order.
pub fn list(spool_dir: &Path) -> std::io::Result<Vec<Parked>> {
    let dir = parked_dir(spool_dir);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "park" || e == "requeue"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        out.extend(read_file(&f)?);
    }
    Ok(out)
}
