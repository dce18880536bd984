//! Private credential files: one per (user, server) at
//! `<root>/<user_id>/<server>/credentials.json`.
//!
//! The mapping is injective because neither identifier can contain `/` (see [`crate::ids`]), and
//! confined because neither can be `.`/`..` or start with a dot. Directories are 0700, files 0600,
//! and every write is atomic: a crash leaves the old file or the new one, never a torn one.
//!
//! Each file has a directory of its own because a confined server is granted its credentials
//! through that directory: Landlock rules attach to inodes, and an atomic rewrite replaces the
//! file's inode, so a rule on the file itself would lose it at the first token refresh.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::ids::{ServerName, UserId};

/// Creates `dir` (and parents) with mode 0700; refuses a symlink where a directory should be.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symlink; refusing to follow it",
            dir.display()
        ))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // DirBuilder's mode is filtered by the umask; set it exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(err) => Err(err),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600: a temp file in the same directory opened
/// with `O_EXCL|O_NOFOLLOW`, fsync, rename over the target, fsync the directory. A symlink
/// planted at `path` is replaced, never followed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("target has no file name"))?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|err| io::Error::other(err.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        name.to_string_lossy(),
        u64::from_ne_bytes(suffix)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The name of the file inside each (user, server) directory.
pub const CREDENTIALS_FILE_NAME: &str = "credentials.json";

/// The credentials directory.
#[derive(Debug, Clone)]
pub struct CredentialFiles {
    root: PathBuf,
}

impl CredentialFiles {
    /// Opens (creating with mode 0700 if needed) the credentials root.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<CredentialFiles> {
        let root = root.into();
        create_private_dir(&root)?;
        Ok(CredentialFiles { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory that holds only the credentials file of (user, server).
    pub fn dir_for(&self, user: &UserId, server: &ServerName) -> PathBuf {
        self.root.join(user.as_str()).join(server.as_str())
    }

    /// Where the credentials of (user, server) live. Pure: creates nothing.
    pub fn path_for(&self, user: &UserId, server: &ServerName) -> PathBuf {
        self.dir_for(user, server).join(CREDENTIALS_FILE_NAME)
    }

    /// Atomically writes the file for (user, server); returns its path.
    pub fn write(&self, user: &UserId, server: &ServerName, bytes: &[u8]) -> io::Result<PathBuf> {
        create_private_dir(&self.root.join(user.as_str()))?;
        create_private_dir(&self.dir_for(user, server))?;
        let path = self.path_for(user, server);
        write_atomic(&path, bytes)?;
        Ok(path)
    }

    /// Removes the file for (user, server) and its directory; a missing file is not an error.
    pub fn remove(&self, user: &UserId, server: &ServerName) -> io::Result<()> {
        let dir = self.dir_for(user, server);
        match std::fs::remove_file(dir.join(CREDENTIALS_FILE_NAME)) {
            Ok(()) => File::open(&dir)?.sync_all()?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        // Leave no empty directory behind; failure (not empty, or gone) is fine.
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(self.root.join(user.as_str()));
        Ok(())
    }

    /// Every (user, server) that has a credentials directory, as raw names; what is not a
    /// valid pair is skipped (nothing else is written here).
    pub fn list(&self) -> io::Result<Vec<(UserId, ServerName)>> {
        let mut pairs = Vec::new();
        for user_entry in std::fs::read_dir(&self.root)?.flatten() {
            let Ok(user) = UserId::parse(&user_entry.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(servers) = std::fs::read_dir(user_entry.path()) else {
                continue;
            };
            for server_entry in servers.flatten() {
                if let Ok(server) = ServerName::parse(&server_entry.file_name().to_string_lossy()) {
                    pairs.push((user.clone(), server));
                }
            }
        }
        Ok(pairs)
    }

    /// Removes `<root>/<user>/<server>.json` files of the layout before per-pair directories
    /// (their pairs get a file in the new place at the next session start); returns how many.
    pub fn remove_legacy_files(&self) -> io::Result<usize> {
        let mut removed = 0;
        for user_entry in std::fs::read_dir(&self.root)?.flatten() {
            let Ok(entries) = std::fs::read_dir(user_entry.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_file = entry
                    .file_type()
                    .is_ok_and(|t| t.is_file() || t.is_symlink());
                if is_file && entry.file_name().to_string_lossy().ends_with(".json") {
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Whether a regular file (not a symlink) exists for (user, server).
    pub fn exists(&self, user: &UserId, server: &ServerName) -> bool {
        std::fs::symlink_metadata(self.path_for(user, server))
            .map(|meta| meta.file_type().is_file())
            .unwrap_or(false)
    }
}

/// How a server's credentials file is rendered, resolved from config once at start-up.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    pub format: crate::config::CredentialsFormat,
    /// OAuth client the tokens were issued to (Google's file format needs it).
    pub client_id: Option<String>,
    pub client_secret: Option<super::Secret>,
    /// Whether the file is written at all: a remote server gets its credentials over HTTP, so
    /// its tokens are kept in the (encrypted) row only, never in a plaintext file.
    pub file: bool,
}

impl CredentialSpec {
    /// Resolves `server`'s spec, reading the client secret from the environment variable the
    /// config names.
    pub fn from_config(
        server: &crate::config::ServerConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> CredentialSpec {
        let oauth = server.oauth.as_ref();
        CredentialSpec {
            format: server.credentials_format,
            client_id: oauth.map(|o| o.client_id.clone()),
            client_secret: oauth
                .and_then(|o| o.client_secret_env.as_deref())
                .and_then(env)
                .map(super::Secret::new),
            file: !server.is_remote(),
        }
    }

    /// The file's bytes for `tokens`.
    pub fn render(&self, tokens: &super::Tokens) -> Vec<u8> {
        use crate::config::CredentialsFormat;
        let expose =
            |secret: &Option<super::Secret>| secret.as_ref().map(|s| s.expose().to_owned());
        let value = match self.format {
            CredentialsFormat::GoogleAuthorizedUser => serde_json::json!({
                "type": "authorized_user",
                "client_id": self.client_id.clone().unwrap_or_default(),
                "client_secret": expose(&self.client_secret).unwrap_or_default(),
                "refresh_token": expose(&tokens.refresh_token).unwrap_or_default(),
            }),
            CredentialsFormat::TokenJson => serde_json::json!({
                "access_token": expose(&tokens.access_token),
                "refresh_token": expose(&tokens.refresh_token),
                "token_expiry": tokens.token_expiry.map(|t| t.to_rfc3339()),
            }),
        };
        let mut bytes = serde_json::to_vec_pretty(&value).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}
