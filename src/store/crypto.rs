//! Tokens at rest: XChaCha20-Poly1305 with associated data binding every ciphertext to its
//! (user, server, field, key version), so a ciphertext copied to another row or column fails.
//!
//! Keys come from `MCP_POOL_ENCRYPTION_KEYS` or a key file created 0600 on first run, as
//! `VERSION:BASE64KEY` entries. The newest version encrypts; every listed version decrypts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use super::files::{create_private_dir, write_atomic};
use super::secret::Secret;
use crate::ids::{ServerName, UserId};

const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
const AAD_DOMAIN: &[u8] = b"mcp-pool/mcp_connections/v1\0";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {path}: {cause}")]
    KeyFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("{origin}: entry {entry} is not VERSION:BASE64KEY with a 32-byte key")]
    MalformedKey { origin: String, entry: usize },
    #[error("{origin}: key version {version} is listed twice")]
    DuplicateVersion { origin: String, version: u32 },
    #[error("{origin}: no encryption key is configured")]
    NoKeys { origin: String },
    #[error("ciphertext uses key version {0}, which is not configured")]
    UnknownKeyVersion(u32),
    #[error("ciphertext does not decrypt: tampered, moved to another row, or wrong key")]
    Decrypt,
    #[error("cannot gather randomness: {0}")]
    Random(String),
    #[error("rotation needs a key file; with {0} set, add the new version there instead")]
    RotationNeedsKeyFile(&'static str),
}

/// Which column a ciphertext belongs to; part of the associated data.
#[derive(Debug, Clone, Copy)]
pub enum TokenField {
    Access,
    Refresh,
    /// The PKCE verifier of a pending OAuth connect flow (`oauth_states`).
    PkceVerifier,
    /// A client registered by mcp-pool for a remote server (`oauth_clients`).
    ClientId,
    ClientSecret,
}

impl TokenField {
    fn label(self) -> &'static [u8] {
        match self {
            TokenField::Access => b"access_token",
            TokenField::Refresh => b"refresh_token",
            TokenField::PkceVerifier => b"pkce_verifier",
            TokenField::ClientId => b"client_id",
            TokenField::ClientSecret => b"client_secret",
        }
    }
}

/// Where the keys came from; decides whether rotation may write a new key.
#[derive(Debug, Clone)]
enum KeySource {
    File(PathBuf),
    Env,
}

/// The configured key versions.
pub struct Keyring {
    keys: BTreeMap<u32, XChaCha20Poly1305>,
    source: KeySource,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("source", &self.source)
            .finish()
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|err| CryptoError::Random(err.to_string()))?;
    Ok(bytes)
}

fn parse_entries(
    text: &str,
    origin: &str,
) -> Result<BTreeMap<u32, XChaCha20Poly1305>, CryptoError> {
    let mut keys = BTreeMap::new();
    let entries = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty() && !entry.starts_with('#'));
    for (index, entry) in entries.enumerate() {
        let malformed = || CryptoError::MalformedKey {
            origin: origin.to_owned(),
            entry: index + 1,
        };
        let (version, encoded) = entry.split_once(':').ok_or_else(malformed)?;
        let version: u32 = version.trim().parse().map_err(|_| malformed())?;
        let bytes: [u8; KEY_LEN] = B64
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(malformed)?;
        let cipher = XChaCha20Poly1305::new(&Key::from(bytes));
        if keys.insert(version, cipher).is_some() {
            return Err(CryptoError::DuplicateVersion {
                origin: origin.to_owned(),
                version,
            });
        }
    }
    if keys.is_empty() {
        return Err(CryptoError::NoKeys {
            origin: origin.to_owned(),
        });
    }
    Ok(keys)
}

impl Keyring {
    /// Keys from the environment value if given, else from `key_file` (created on first use).
    pub fn load(key_file: &Path, env_value: Option<&str>) -> Result<Keyring, CryptoError> {
        if let Some(text) = env_value {
            return Ok(Keyring {
                keys: parse_entries(text, crate::config::ENCRYPTION_KEYS_ENV)?,
                source: KeySource::Env,
            });
        }
        let io_err = |cause| CryptoError::KeyFile {
            path: key_file.to_owned(),
            cause,
        };
        match std::fs::symlink_metadata(key_file) {
            Ok(meta) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(CryptoError::KeyFileMode {
                        path: key_file.to_owned(),
                        mode,
                    });
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = key_file.parent().filter(|p| !p.as_os_str().is_empty()) {
                    create_private_dir(parent).map_err(io_err)?;
                }
                let entry = format!("1:{}\n", B64.encode(random_bytes::<KEY_LEN>()?));
                // create_new: two processes starting at once must not overwrite each other's key.
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode_0600()
                    .open(key_file)
                {
                    Ok(mut file) => {
                        file.write_all(entry.as_bytes()).map_err(io_err)?;
                        file.sync_all().map_err(io_err)?;
                        tracing::info!(path = %key_file.display(), "Created encryption key file");
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(io_err(err)),
                }
            }
            Err(err) => return Err(io_err(err)),
        }
        let text = std::fs::read_to_string(key_file).map_err(io_err)?;
        Ok(Keyring {
            keys: parse_entries(&text, &key_file.display().to_string())?,
            source: KeySource::File(key_file.to_owned()),
        })
    }

    /// The version new ciphertexts use.
    pub fn current_version(&self) -> u32 {
        // parse_entries guarantees at least one key.
        self.keys.keys().next_back().copied().unwrap_or_default()
    }

    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    fn aad(user: &UserId, server: &ServerName, field: TokenField, version: u32) -> Vec<u8> {
        let mut aad = AAD_DOMAIN.to_vec();
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        for part in [
            user.as_str().as_bytes(),
            server.as_str().as_bytes(),
            field.label(),
        ] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }

    /// Encrypts with the current version; returns base64(nonce || ciphertext).
    pub fn encrypt(
        &self,
        user: &UserId,
        server: &ServerName,
        field: TokenField,
        plaintext: &Secret,
    ) -> Result<String, CryptoError> {
        let version = self.current_version();
        let cipher = self
            .keys
            .get(&version)
            .ok_or(CryptoError::UnknownKeyVersion(version))?;
        let nonce = random_bytes::<NONCE_LEN>()?;
        let aad = Self::aad(user, server, field, version);
        let sealed = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(B64.encode(out))
    }

    pub fn decrypt(
        &self,
        user: &UserId,
        server: &ServerName,
        field: TokenField,
        version: u32,
        encoded: &str,
    ) -> Result<Secret, CryptoError> {
        let cipher = self
            .keys
            .get(&version)
            .ok_or(CryptoError::UnknownKeyVersion(version))?;
        let bytes = B64.decode(encoded).map_err(|_| CryptoError::Decrypt)?;
        if bytes.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        let aad = Self::aad(user, server, field, version);
        let plain = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| CryptoError::Decrypt)
    }

    /// Adds a new newest key version to the key file and to this keyring.
    pub fn add_version(&mut self) -> Result<u32, CryptoError> {
        let KeySource::File(path) = &self.source else {
            return Err(CryptoError::RotationNeedsKeyFile(
                crate::config::ENCRYPTION_KEYS_ENV,
            ));
        };
        let io_err = |cause| CryptoError::KeyFile {
            path: path.clone(),
            cause,
        };
        let mut text = std::fs::read_to_string(path).map_err(io_err)?;
        let version = self.current_version() + 1;
        let key = random_bytes::<KEY_LEN>()?;
        if !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!("{version}:{}\n", B64.encode(key)));
        write_atomic(path, text.as_bytes()).map_err(io_err)?;
        self.keys
            .insert(version, XChaCha20Poly1305::new(&Key::from(key)));
        Ok(version)
    }
}

trait OpenOptionsPrivate {
    fn mode_0600(&mut self) -> &mut Self;
}

impl OpenOptionsPrivate for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (UserId, ServerName) {
        (
            UserId::parse("alice").unwrap(),
            ServerName::parse("demo").unwrap(),
        )
    }

    #[test]
    fn round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::load(&dir.path().join("k/key"), None).unwrap();
        let (user, server) = ids();
        let secret = Secret::new("tok");
        let ct = ring
            .encrypt(&user, &server, TokenField::Access, &secret)
            .unwrap();
        let v = ring.current_version();
        assert_eq!(
            ring.decrypt(&user, &server, TokenField::Access, v, &ct)
                .unwrap(),
            secret
        );
        let other = UserId::parse("bob").unwrap();
        assert!(
            ring.decrypt(&other, &server, TokenField::Access, v, &ct)
                .is_err()
        );
        assert!(
            ring.decrypt(&user, &server, TokenField::Refresh, v, &ct)
                .is_err()
        );
        // Length-prefixing: ("alic", "edemo") is not ("alice", "demo").
        let shifted_user = UserId::parse("alic").unwrap();
        let shifted_server = ServerName::parse("edemo").unwrap();
        assert!(
            ring.decrypt(&shifted_user, &shifted_server, TokenField::Access, v, &ct)
                .is_err()
        );
        let mut bytes = B64.decode(&ct).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = B64.encode(bytes);
        assert!(matches!(
            ring.decrypt(&user, &server, TokenField::Access, v, &tampered),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/encryption.key");
        let first = Keyring::load(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (user, server) = ids();
        let ct = first
            .encrypt(&user, &server, TokenField::Access, &Secret::new("x"))
            .unwrap();
        let again = Keyring::load(&path, None).unwrap();
        assert_eq!(
            again
                .decrypt(&user, &server, TokenField::Access, 1, &ct)
                .unwrap()
                .expose(),
            "x"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keyring::load(&path, None),
            Err(CryptoError::KeyFileMode { .. })
        ));
    }

    #[test]
    fn env_keys_and_rotation() {
        let k1 = B64.encode([1u8; 32]);
        let k2 = B64.encode([2u8; 32]);
        let ring =
            Keyring::load(Path::new("/nonexistent"), Some(&format!("1:{k1},2:{k2}"))).unwrap();
        assert_eq!(ring.current_version(), 2);
        assert!(Keyring::load(Path::new("/x"), Some("1:short")).is_err());
        assert!(Keyring::load(Path::new("/x"), Some(&format!("1:{k1},1:{k2}"))).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let mut ring = Keyring::load(&path, None).unwrap();
        assert_eq!(ring.add_version().unwrap(), 2);
        let reloaded = Keyring::load(&path, None).unwrap();
        assert_eq!(reloaded.versions(), vec![1, 2]);
    }
}
