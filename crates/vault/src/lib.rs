//! The vault: secrets encrypted at rest with envelope encryption, for the gateway to inject into
//! upstream calls so agents never hold them.
//!
//! Each secret version gets its own random 256-bit data key. The value is sealed with
//! XChaCha20-Poly1305 under the data key (associated data: the secret's name and version, so a
//! ciphertext moved to another name or version fails to open); the data key is sealed under the
//! master key (associated data: the name). Only wrapped data keys and ciphertexts are stored.
//! Rotating the master key rewraps every data key in one transaction; values are not touched.
//!
//! INVARIANT (write-only): nothing here returns a value except [`Vault::reveal`], which only the
//! injection path calls; values are held in [`Zeroizing`] buffers and never formatted.

pub mod database;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use palisade_core::store::{SecretRecord, Store, StoreError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

/// Largest secret value.
pub const MAX_VALUE: usize = 64 * 1024;
const NONCE: usize = 24;

/// Why a vault operation failed. Messages never carry a value.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No such secret.
    #[error("no secret named `{0}`; `palisade secret list` shows them")]
    NotFound(String),
    /// A bad name or value.
    #[error("{0}")]
    Invalid(String),
    /// A stored secret does not open: tampered with, or wrapped by another master key.
    #[error(
        "secret `{name}` does not decrypt ({why}); its stored form was altered or another master key wrapped it"
    )]
    Integrity {
        /// The secret.
        name: String,
        /// Which layer failed.
        why: &'static str,
    },
    /// The master key is missing or unusable.
    #[error("vault master key: {0}")]
    MasterKey(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key that wraps every data key.
pub struct MasterKey {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(b"palisade-vault-master-key-id\n");
        h.update(bytes);
        let id = palisade_core::secret::hex(&h.finalize())
            .chars()
            .take(16)
            .collect();
        Self {
            key: Zeroizing::new(bytes),
            id,
        }
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, VaultError> {
        let bytes = palisade_core::secret::random_bytes::<32>()
            .map_err(|e| VaultError::MasterKey(e.to_string()))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A key written as 64 hex digits (a file's content or an environment variable's value).
    pub fn parse(text: &str, from: &str) -> Result<Self, VaultError> {
        let t = text.trim();
        let bad = || {
            VaultError::MasterKey(format!(
                "{from} does not hold a key: expected 64 hex digits (32 bytes)"
            ))
        };
        if t.len() != 64 {
            return Err(bad());
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(t.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self::from_bytes(*bytes))
    }

    /// The key's id (first 16 hex digits of a hash of it), stored with each wrapped data key.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn hex(&self) -> Zeroizing<String> {
        Zeroizing::new(palisade_core::secret::hex(self.key.as_ref()))
    }

    /// Reads the key file, creating it (`0600`, a fresh key) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, VaultError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&Zeroizing::new(text), &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                write_private(path, &key.hex())?;
                Ok(key)
            }
            Err(e) => Err(VaultError::MasterKey(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }
}

/// Writes `content` to a new `0600` file and syncs it.
fn write_private(path: &Path, content: &str) -> Result<(), VaultError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| VaultError::MasterKey(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| VaultError::MasterKey(format!("cannot write {}: {e}", path.display())))
}

/// What the API shows of a secret: never its value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretMeta {
    /// Name.
    pub name: String,
    /// Version, from 1; each `put` adds one.
    pub version: u64,
    /// What it is for.
    pub description: String,
    /// Id of the master key wrapping its data key.
    pub master_key_id: String,
    /// Created, nanoseconds since the epoch.
    pub created_ns: i64,
    /// Last written, nanoseconds since the epoch.
    pub updated_ns: i64,
}

impl From<&SecretRecord> for SecretMeta {
    fn from(r: &SecretRecord) -> Self {
        Self {
            name: r.name.clone(),
            version: r.version,
            description: r.description.clone(),
            master_key_id: r.master_key_id.clone(),
            created_ns: r.created_ns,
            updated_ns: r.updated_ns,
        }
    }
}

/// Where the master key comes from: a file or an environment variable; any other source (a
/// KMS, an HSM) implements [`KeyProvider`] and opens the vault with [`Vault::with_provider`].
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A file (created on first start; rotation writes the new key there).
    File(PathBuf),
    /// An environment variable's value (rotation is the operator's, outside Palisade).
    Env(String),
}

impl KeySource {
    /// The provider for this source.
    pub fn provider(&self) -> Box<dyn KeyProvider> {
        match self {
            Self::File(path) => Box::new(FileKeyProvider(path.clone())),
            Self::Env(name) => Box::new(EnvKeyProvider(name.clone())),
        }
    }
}

/// A source of the master key. Rotation is two-phase so a crash between the store's rewrap
/// and the provider's switch loses nothing: [`KeyProvider::stage`] keeps the new key beside
/// the current one, the store commits, then [`KeyProvider::commit`] makes it current. At load
/// the provider is told which key ids wrap the stored secrets, so it can finish or drop a
/// staged key.
pub trait KeyProvider: Send + Sync {
    /// The current key (created on first use where the provider can).
    fn load(&self, wrapping_ids: &[String]) -> Result<MasterKey, VaultError>;
    /// Keeps `new` beside the current key, before the store is rewrapped.
    fn stage(&self, new: &MasterKey) -> Result<(), VaultError>;
    /// Makes the staged key the current one, after the store committed.
    fn commit(&self) -> Result<(), VaultError>;
}

/// The master key in a `0600` file; a staged key waits in `<file>.next`.
pub struct FileKeyProvider(pub PathBuf);

impl KeyProvider for FileKeyProvider {
    fn load(&self, wrapping_ids: &[String]) -> Result<MasterKey, VaultError> {
        let path = &self.0;
        let next = next_path(path);
        let key = MasterKey::load_or_create(path)?;
        // A rotation stopped between the store's rewrap and the rename: the store says which
        // key wraps the secrets.
        if next.exists() {
            let pending = MasterKey::load_or_create(&next)?;
            if wrapping_ids.iter().any(|id| id == pending.id()) {
                std::fs::rename(&next, path).map_err(|e| {
                    VaultError::MasterKey(format!("cannot finish the rotation: {e}"))
                })?;
                return Ok(pending);
            }
            let _ = std::fs::remove_file(&next);
        }
        Ok(key)
    }

    fn stage(&self, new: &MasterKey) -> Result<(), VaultError> {
        let next = next_path(&self.0);
        let _ = std::fs::remove_file(&next);
        write_private(&next, &new.hex())
    }

    fn commit(&self) -> Result<(), VaultError> {
        std::fs::rename(next_path(&self.0), &self.0).map_err(|e| {
            VaultError::MasterKey(format!("cannot move the new key into place: {e}"))
        })?;
        if let Some(dir) = self.0.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The master key in an environment variable (64 hex digits); rotated outside Palisade.
pub struct EnvKeyProvider(pub String);

impl KeyProvider for EnvKeyProvider {
    fn load(&self, _: &[String]) -> Result<MasterKey, VaultError> {
        let name = &self.0;
        let text = Zeroizing::new(std::env::var(name).map_err(|_| {
            VaultError::MasterKey(format!(
                "environment variable `{name}` is not set; give it 64 hex digits"
            ))
        })?);
        MasterKey::parse(&text, &format!("environment variable `{name}`"))
    }

    fn stage(&self, _: &MasterKey) -> Result<(), VaultError> {
        Err(VaultError::MasterKey(format!(
            "the master key comes from environment variable `{}`, which Palisade cannot change; use a key file ([vault] master_key_file) to rotate from Palisade",
            self.0
        )))
    }

    fn commit(&self) -> Result<(), VaultError> {
        Ok(())
    }
}

/// The secret store.
pub struct Vault {
    store: Arc<dyn Store>,
    provider: Box<dyn KeyProvider>,
    master: RwLock<Arc<MasterKey>>,
    records: RwLock<HashMap<String, SecretRecord>>,
    /// Serialises writes and rotation.
    write: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault")
    }
}

fn dek_aad(name: &str) -> Vec<u8> {
    format!("palisade-vault-dek-v1\n{name}").into_bytes()
}

fn value_aad(name: &str, version: u64) -> Vec<u8> {
    format!("palisade-vault-value-v1\n{name}\n{version}").into_bytes()
}

fn seal(key: &[u8; 32], plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, VaultError> {
    let nonce = palisade_core::secret::random_bytes::<NONCE>()
        .map_err(|e| VaultError::MasterKey(e.to_string()))?;
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut out = nonce.to_vec();
    let sealed = cipher
        .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
        .map_err(|_| VaultError::Invalid("encryption failed".into()))?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (nonce, body) = (sealed.get(..NONCE)?, sealed.get(NONCE..)?);
    let nonce: [u8; NONCE] = nonce.try_into().ok()?;
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: body, aad })
        .ok()
        .map(Zeroizing::new)
}

/// Checks a secret name: letters, digits, `_`, `-`, `.` and `/`, 1 to 128 characters.
pub fn check_name(name: &str) -> Result<(), VaultError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::Invalid(format!(
            "`{name}` is not a secret name: use 1 to 128 letters, digits, `_`, `-`, `.` or `/`"
        )))
    }
}

impl Vault {
    /// Opens the vault: loads the master key (finishing a rotation a crash interrupted) and
    /// the stored secrets, which must all be wrapped by it.
    pub fn open(store: Arc<dyn Store>, source: KeySource) -> Result<Self, VaultError> {
        Self::with_provider(store, source.provider())
    }

    /// Opens the vault with any key provider.
    pub fn with_provider(
        store: Arc<dyn Store>,
        provider: Box<dyn KeyProvider>,
    ) -> Result<Self, VaultError> {
        let wrapping: Vec<String> = store
            .list_secrets()?
            .into_iter()
            .map(|r| r.master_key_id)
            .collect();
        let master = provider.load(&wrapping)?;
        let records: HashMap<String, SecretRecord> = store
            .list_secrets()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        if let Some(r) = records.values().find(|r| r.master_key_id != master.id()) {
            return Err(VaultError::MasterKey(format!(
                "secret `{}` is wrapped by master key {}, but the configured key is {}; configure the key the secrets were written with",
                r.name,
                r.master_key_id,
                master.id()
            )));
        }
        Ok(Self {
            store,
            provider,
            master: RwLock::new(Arc::new(master)),
            records: RwLock::new(records),
            write: std::sync::Mutex::new(()),
        })
    }

    fn master(&self) -> Arc<MasterKey> {
        self.master
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The id of the master key in use.
    pub fn master_key_id(&self) -> String {
        self.master().id().to_string()
    }

    /// Stores a new version of `name` (created if new).
    pub fn put(
        &self,
        name: &str,
        value: &[u8],
        description: Option<&str>,
        now_ns: i64,
    ) -> Result<SecretMeta, VaultError> {
        check_name(name)?;
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(VaultError::Invalid(format!(
                "a secret value is 1 to {MAX_VALUE} bytes; this one is {}",
                value.len()
            )));
        }
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let master = self.master();
        let previous = self.get_record(name);
        let version = previous.as_ref().map_or(1, |p| p.version + 1);
        let dek = Zeroizing::new(
            palisade_core::secret::random_bytes::<32>()
                .map_err(|e| VaultError::MasterKey(e.to_string()))?,
        );
        let record = SecretRecord {
            name: name.to_string(),
            version,
            description: description
                .map(str::to_string)
                .or_else(|| previous.as_ref().map(|p| p.description.clone()))
                .unwrap_or_default(),
            wrapped_key: seal(&master.key, dek.as_ref(), &dek_aad(name))?,
            ciphertext: seal(&dek, value, &value_aad(name, version))?,
            master_key_id: master.id().to_string(),
            created_ns: previous.as_ref().map_or(now_ns, |p| p.created_ns),
            updated_ns: now_ns,
        };
        self.store.put_secret(&record)?;
        let meta = SecretMeta::from(&record);
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), record);
        Ok(meta)
    }

    fn get_record(&self, name: &str) -> Option<SecretRecord> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// A secret's metadata.
    pub fn metadata(&self, name: &str) -> Result<SecretMeta, VaultError> {
        self.get_record(name)
            .map(|r| SecretMeta::from(&r))
            .ok_or_else(|| VaultError::NotFound(name.to_string()))
    }

    /// Every secret's metadata, by name.
    pub fn list(&self) -> Vec<SecretMeta> {
        let mut all: Vec<SecretMeta> = self
            .records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(SecretMeta::from)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Deletes a secret; returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool, VaultError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let existed = self.store.delete_secret(name)?;
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(existed)
    }

    /// The value, for the injection path only (see the module's invariant).
    pub fn reveal(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let record = self
            .get_record(name)
            .ok_or_else(|| VaultError::NotFound(name.to_string()))?;
        let master = self.master();
        let dek = open(&master.key, &record.wrapped_key, &dek_aad(name)).ok_or_else(|| {
            VaultError::Integrity {
                name: name.to_string(),
                why: "its data key",
            }
        })?;
        let dek: Zeroizing<[u8; 32]> =
            Zeroizing::new(
                dek.as_slice()
                    .try_into()
                    .map_err(|_| VaultError::Integrity {
                        name: name.to_string(),
                        why: "its data key's length",
                    })?,
            );
        open(&dek, &record.ciphertext, &value_aad(name, record.version)).ok_or_else(|| {
            VaultError::Integrity {
                name: name.to_string(),
                why: "its value",
            }
        })
    }

    /// Replaces the master key with a fresh one: every data key is rewrapped in one store
    /// transaction, while injections keep working. For a file key, the new key is written
    /// next to the old one first and renamed into place after the store commits (a crash in
    /// between is finished at the next start). Returns the number of secrets rewrapped.
    pub fn rotate_master(&self) -> Result<(usize, String), VaultError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.master();
        let new = MasterKey::generate()?;
        let records: Vec<SecretRecord> = self
            .records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut rewrapped = Vec::with_capacity(records.len());
        for r in &records {
            let dek = open(&old.key, &r.wrapped_key, &dek_aad(&r.name)).ok_or_else(|| {
                VaultError::Integrity {
                    name: r.name.clone(),
                    why: "its data key",
                }
            })?;
            let mut updated = r.clone();
            updated.wrapped_key = seal(&new.key, &dek, &dek_aad(&r.name))?;
            updated.master_key_id = new.id().to_string();
            rewrapped.push(updated);
        }
        self.provider.stage(&new)?;
        self.store.rewrap_secrets(&rewrapped)?;
        self.provider.commit()?;
        let id = new.id().to_string();
        *self.master.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        let mut map = self.records.write().unwrap_or_else(|p| p.into_inner());
        for r in rewrapped {
            map.insert(r.name.clone(), r);
        }
        Ok((records.len(), id))
    }
}

fn next_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vault(name: &str) -> (Vault, PathBuf, Arc<palisade_store::SqliteStore>) {
        let dir =
            std::env::temp_dir().join(format!("palisade-vault-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
        let key = dir.join("vault-master.key");
        let v = Vault::open(store.clone(), KeySource::File(key.clone())).unwrap();
        (v, key, store)
    }

    #[test]
    fn values_round_trip_and_are_never_stored_in_clear() {
        let (v, key, store) = vault("round");
        v.put("github/token", b"ghp_live_value_123", Some("CI"), 1)
            .unwrap();
        assert_eq!(
            v.reveal("github/token").unwrap().as_slice(),
            b"ghp_live_value_123"
        );
        let meta = v.put("github/token", b"second", None, 2).unwrap();
        assert_eq!((meta.version, meta.description.as_str()), (2, "CI"));
        let rec = store.get_secret("github/token").unwrap().unwrap();
        assert!(!rec.ciphertext.windows(6).any(|w| w == b"second"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(v.reveal("nope"), Err(VaultError::NotFound(_))));
        assert!(v.put("bad name", b"x", None, 3).is_err());
        assert!(v.put("empty", b"", None, 3).is_err());
    }

    #[test]
    fn tampering_and_swapping_are_detected() {
        let (v, key, store) = vault("tamper");
        v.put("a", b"alpha", None, 1).unwrap();
        v.put("b", b"bravo", None, 1).unwrap();
        let mut a = store.get_secret("a").unwrap().unwrap();
        let last = a.ciphertext.len() - 1;
        a.ciphertext[last] ^= 1;
        store.put_secret(&a).unwrap();
        // A ciphertext moved to another name does not open either.
        let mut b = store.get_secret("b").unwrap().unwrap();
        let a_orig = store.get_secret("a").unwrap().unwrap();
        b.ciphertext = a_orig.ciphertext.clone();
        store.put_secret(&b).unwrap();
        let reopened = Vault::open(store.clone(), KeySource::File(key)).unwrap();
        let e = reopened.reveal("a").unwrap_err().to_string();
        assert!(e.contains("does not decrypt (its value)"), "{e}");
        assert!(reopened.reveal("b").is_err());
    }

    /// A provider of our own (as a KMS would be): keys held in memory.
    /// The current and the staged key.
    type Keys = (Option<[u8; 32]>, Option<[u8; 32]>);
    struct MemoryProvider(std::sync::Mutex<Keys>);

    impl KeyProvider for MemoryProvider {
        fn load(&self, _: &[String]) -> Result<MasterKey, VaultError> {
            let mut keys = self.0.lock().unwrap();
            if keys.0.is_none() {
                keys.0 = Some([5; 32]);
            }
            Ok(MasterKey::from_bytes(keys.0.unwrap()))
        }
        fn stage(&self, new: &MasterKey) -> Result<(), VaultError> {
            self.0.lock().unwrap().1 = Some(*new.key);
            Ok(())
        }
        fn commit(&self) -> Result<(), VaultError> {
            let mut keys = self.0.lock().unwrap();
            keys.0 = keys.1.take();
            Ok(())
        }
    }

    #[test]
    fn other_key_providers_plug_in_and_an_environment_key_cannot_be_rotated_here() {
        let dir = std::env::temp_dir().join(format!("palisade-vault-kp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
        let v = Vault::with_provider(
            store.clone(),
            Box::new(MemoryProvider(std::sync::Mutex::default())),
        )
        .unwrap();
        v.put("k", b"value", None, 1).unwrap();
        let before = v.master_key_id();
        v.rotate_master().unwrap();
        assert_ne!(v.master_key_id(), before);
        assert_eq!(v.reveal("k").unwrap().as_slice(), b"value");

        let dir = std::env::temp_dir().join(format!("palisade-vault-env-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
        let missing = Vault::open(
            store.clone(),
            KeySource::Env("PALISADE_TEST_NO_SUCH_KEY".into()),
        );
        assert!(missing.unwrap_err().to_string().contains("is not set"));
        let provider = EnvKeyProvider("PALISADE_TEST_NO_SUCH_KEY".into());
        let e = provider.stage(&MasterKey::from_bytes([1; 32])).unwrap_err();
        assert!(e.to_string().contains("cannot change"), "{e}");
    }

    #[test]
    fn rotation_rewraps_and_a_wrong_key_is_refused() {
        let (v, key, store) = vault("rotate");
        v.put("db", b"postgres://u:p@h/db", None, 1).unwrap();
        let before = std::fs::read_to_string(&key).unwrap();
        let (n, id) = v.rotate_master().unwrap();
        assert_eq!(n, 1);
        assert_ne!(std::fs::read_to_string(&key).unwrap(), before);
        assert_eq!(v.reveal("db").unwrap().as_slice(), b"postgres://u:p@h/db");
        assert_eq!(store.get_secret("db").unwrap().unwrap().master_key_id, id);
        // After a restart with the rotated key, still readable.
        let again = Vault::open(store.clone(), KeySource::File(key.clone())).unwrap();
        assert_eq!(
            again.reveal("db").unwrap().as_slice(),
            b"postgres://u:p@h/db"
        );
        // The old key no longer opens the vault.
        let old = key.with_extension("old");
        std::fs::write(&old, before).unwrap();
        let e = Vault::open(store.clone(), KeySource::File(old))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is wrapped by master key"), "{e}");
    }
}
