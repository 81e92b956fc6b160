//! Signed checkpoints: the writer's anchor of the chain under an Ed25519 key, so that a
//! log cut after its last checkpoint, or rewritten from its first line by someone without
//! the key, no longer verifies (`breakwater audit verify --public-key`).
//!
//! Key files (written by `breakwater audit keygen DIR`), each one line of hex:
//! - `signing.key`: the 32-byte Ed25519 seed (mode 0600);
//! - `signing.pub`: the 32-byte Ed25519 public key.
//!
//! The key id is the first 8 bytes of SHA-256(public key), as 16 hex digits.
//!
//! A checkpoint is an event record in the chain (`event: "checkpoint"`) whose `detail` is
//! `{"head", "count", "key_id", "alg": "ed25519", "signature"}`: `head` is the hash of the
//! record before it (the checkpoint's own `prev_hash`), `count` that record's `seq`, and
//! `signature` the hex Ed25519 signature over [`message`]:
//! `breakwater-checkpoint-v1\n{instance}\n{count}\n{head}\n{ts}\n{key_id}` (`ts` being the
//! checkpoint record's own `ts`). The head commits to every record before it through the
//! hash chain, so one valid signature vouches for the whole chain up to it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use super::record::{ChainHash, EventRecord, SCHEMA_V};

/// The event name of a checkpoint.
pub const CHECKPOINT: &str = "checkpoint";
/// File names `audit keygen` writes.
pub const KEY_FILE: &str = "signing.key";
pub const PUB_FILE: &str = "signing.pub";

/// The signing key of a writer: its key id is in every checkpoint.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}, ***)", self.key_id)
    }
}

/// The first 8 bytes of SHA-256(public key), hex.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

fn hex32(text: &[u8], what: &str) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(text).map_err(|_| format!("{what} must be text (hex)"))?;
    let bytes = hex::decode(text.trim()).map_err(|_| format!("{what} must be hex encoded"))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "{what} is {} bytes; an Ed25519 key is 32 (64 hex digits)",
            b.len()
        )
    })
}

impl Signer {
    /// From the contents of a `signing.key` file.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Signer, String> {
        let key = SigningKey::from_bytes(&hex32(bytes, "the signing key")?);
        let key_id = key_id(&key.verifying_key());
        Ok(Signer { key, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The checkpoint that anchors the chain up to `count` / `head`, ready to be chained
    /// right after that record.
    pub fn checkpoint(&self, instance: &str, count: u64, head: &ChainHash) -> EventRecord {
        let ts = super::rfc3339(SystemTime::now());
        let sig = self
            .key
            .sign(&message(instance, count, head.as_str(), &ts, &self.key_id));
        EventRecord {
            schema_v: SCHEMA_V,
            event_id: uuid::Uuid::now_v7().to_string(),
            ts,
            instance: instance.to_string(),
            event: CHECKPOINT.into(),
            detail: serde_json::json!({
                "head": head.as_str(),
                "count": count,
                "key_id": self.key_id,
                "alg": "ed25519",
                "signature": hex::encode(sig.to_bytes()),
            }),
            ..Default::default()
        }
    }
}

/// The bytes a checkpoint signs.
pub fn message(instance: &str, count: u64, head: &str, ts: &str, key_id: &str) -> Vec<u8> {
    format!("breakwater-checkpoint-v1\n{instance}\n{count}\n{head}\n{ts}\n{key_id}").into_bytes()
}

/// A public key read from a `signing.pub` file, with its id.
#[derive(Debug, Clone)]
pub struct PublicKey {
    key: VerifyingKey,
    pub key_id: String,
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<PublicKey, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let key = VerifyingKey::from_bytes(&hex32(&bytes, "the public key")?)
            .map_err(|e| format!("{}: not an Ed25519 public key: {e}", path.display()))?;
        Ok(PublicKey {
            key_id: key_id(&key),
            key,
        })
    }

    /// Whether `signature` (hex) is this key's signature over `msg`.
    pub fn verifies(&self, msg: &[u8], signature: &str) -> bool {
        let Ok(bytes) = hex::decode(signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&bytes) else {
            return false;
        };
        self.key.verify(msg, &sig).is_ok()
    }
}

/// What `audit keygen` wrote.
#[derive(Debug)]
pub struct KeyPair {
    pub key_file: PathBuf,
    pub pub_file: PathBuf,
    pub key_id: String,
}

/// Writes a new key pair into `dir` (created 0700 if missing): `signing.key` (0600) and
/// `signing.pub`. Refuses to replace an existing `signing.key`: the checkpoints it signed
/// would no longer verify against the new public key.
pub fn keygen(dir: &Path) -> std::io::Result<KeyPair> {
    use rand::TryRngCore;
    crate::private_fs::create_dir_all(dir)?;
    let key_file = dir.join(KEY_FILE);
    let pub_file = dir.join(PUB_FILE);
    if key_file.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists: remove it first if you mean to replace the key",
                key_file.display()
            ),
        ));
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(std::io::Error::other)?;
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();
    crate::private_fs::write(&key_file, format!("{}\n", hex::encode(seed)))?;
    std::fs::write(&pub_file, format!("{}\n", hex::encode(public.as_bytes())))?;
    Ok(KeyPair {
        key_file,
        pub_file,
        key_id: key_id(&public),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_under_its_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let pair = keygen(dir.path()).unwrap();
        let signer = Signer::from_file_bytes(&std::fs::read(&pair.key_file).unwrap()).unwrap();
        let public = PublicKey::load(&pair.pub_file).unwrap();
        assert_eq!(signer.key_id(), public.key_id);
        assert_eq!(public.key_id, pair.key_id);
        let head = ChainHash::parse(&"ab".repeat(32)).unwrap();
        let cp = signer.checkpoint("host-1", 41, &head);
        let d = &cp.detail;
        let msg = message("host-1", 41, head.as_str(), &cp.ts, signer.key_id());
        assert!(public.verifies(&msg, d["signature"].as_str().unwrap()));
        let other = message("host-1", 40, head.as_str(), &cp.ts, signer.key_id());
        assert!(!public.verifies(&other, d["signature"].as_str().unwrap()));
        assert!(!public.verifies(&msg, "00"));
        // A second keygen into the same directory would orphan the old checkpoints.
        assert!(keygen(dir.path()).is_err());
    }
}
