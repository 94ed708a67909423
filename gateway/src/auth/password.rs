//! The password file: one `user:$argon2id$...` PHC string per line, `#` comments and blank
//! lines allowed. Read whole at startup (and on SIGHUP); `weir passwd add` edits it atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::check_identity;

/// A password file that cannot be used, with the line that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: String, line: usize, reason: String },
    #[error("{path}: cannot write: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("user {user:?}: {reason}")]
    User { user: String, reason: String },
}

/// The users of a password file and their argon2 hashes.
pub struct PasswordFile {
    users: HashMap<String, String>,
    /// Verified against when the user is unknown, so that an unknown user costs as much time
    /// as a wrong password (no user enumeration by timing).
    decoy: String,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile").field("users", &self.users.len()).finish()
    }
}

/// Why a password check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordMismatch {
    UnknownUser,
    WrongPassword,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| PasswordFileError::Read { path: shown.clone(), source })?;
        Self::parse(&text, &shown)
    }

    /// Parses the file's text; every hash is checked to be an argon2 PHC string.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PasswordFileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err =
                |reason: String| PasswordFileError::Line { path: origin.to_owned(), line: i + 1, reason };
            let Some((user, hash)) = parse_line(line).map_err(|r| err(r.to_owned()))? else { continue };
            check_identity(user).map_err(|reason| err(format!("user {user:?}: {reason}")))?;
            let parsed = PasswordHash::new(hash).map_err(|e| err(format!("not a PHC hash string: {e}")))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(err(format!("{} hashes are not supported; use argon2id", parsed.algorithm)));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(err(format!("user {user:?} appears twice")));
            }
        }
        let decoy = hash_password(b"weir decoy password, never a real one")
            .map_err(|reason| PasswordFileError::User { user: String::new(), reason })?;
        Ok(Self { users, decoy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks `password` for `user`. Slow by design (argon2): call it off the async runtime.
    pub fn verify(&self, user: &str, password: &[u8]) -> Result<(), PasswordMismatch> {
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let verified = PasswordHash::new(hash)
            .map(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
            .unwrap_or(false);
        match (known, verified) {
            (true, true) => Ok(()),
            (true, false) => Err(PasswordMismatch::WrongPassword),
            (false, _) => Err(PasswordMismatch::UnknownUser),
        }
    }
}

/// `Ok(None)` for a blank line or a comment, else the user and the hash. The hash (a PHC string)
/// has no `:`, so the user is everything before the last one.
fn parse_line(line: &str) -> Result<Option<(&str, &str)>, &'static str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    match line.rsplit_once(':') {
        Some((user, hash)) if !user.is_empty() && hash.starts_with('$') => Ok(Some((user, hash))),
        _ => Err("expected user:$argon2id$..."),
    }
}

/// An argon2id hash of `password` with a fresh random salt (the crate's default parameters:
/// 19 MiB, 2 passes, 1 lane, as OWASP recommends), as a PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password, &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Adds `user` to the password file at `path` (created if missing), or replaces its hash: the
/// other lines, comments included, are kept. The new file is written beside the old one,
/// synced, and renamed over it, so a reader sees the old file or the new one, never a part.
pub fn add_user(path: &Path, user: &str, password: &[u8]) -> Result<(), PasswordFileError> {
    let shown = path.display().to_string();
    check_identity(user)
        .map_err(|reason| PasswordFileError::User { user: user.to_owned(), reason: reason.to_owned() })?;
    if password.is_empty() {
        return Err(PasswordFileError::User {
            user: user.to_owned(),
            reason: "the password is empty".into(),
        });
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(PasswordFileError::Read { path: shown, source }),
    };
    // The rest of the file must be valid, or the result would not load either.
    PasswordFile::parse(&existing, &shown)?;
    let hash = hash_password(password)
        .map_err(|reason| PasswordFileError::User { user: user.to_owned(), reason })?;
    let mut text = String::with_capacity(existing.len() + hash.len() + user.len() + 2);
    let mut replaced = false;
    for line in existing.lines() {
        if matches!(parse_line(line), Ok(Some((u, _))) if u == user) {
            text.push_str(&format!("{user}:{hash}\n"));
            replaced = true;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !replaced {
        text.push_str(&format!("{user}:{hash}\n"));
    }
    write_atomically(path, text.as_bytes()).map_err(|source| PasswordFileError::Write { path: shown, source })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    // Hashes are not passwords, but nobody else needs to read them: owner-only, unless the
    // existing file was given other permissions on purpose.
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o600);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_verify_and_unknown_users_cost_a_verification_too() {
        let hash = hash_password(b"s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let file =
            PasswordFile::parse(&format!("# devices\n\ndev-1:{hash}\n  dev:2:{hash}  \n"), "u").unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(file.verify("dev-1", b"s3cret"), Ok(()));
        assert_eq!(file.verify("dev:2", b"s3cret"), Ok(()));
        assert_eq!(file.verify("dev-1", b"wrong"), Err(PasswordMismatch::WrongPassword));
        assert_eq!(file.verify("nobody", b"s3cret"), Err(PasswordMismatch::UnknownUser));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let hash = hash_password(b"x").unwrap();
        for (text, needle) in [
            (format!("ok:{hash}\nnocolon\n"), "u:2:"),
            (format!("a:{hash}\na:{hash}\n"), "twice"),
            ("a:$2b$12$abcdefghijklmnopqrstuu5Yc1vV0I5VZ2M7xIbq3jz5o1bS5k8m\n".to_owned(), "u:1:"),
            (format!("dev/+:{hash}\n"), "wildcard"),
            (format!("a/b:{hash}\n"), "'/'"),
        ] {
            let err = PasswordFile::parse(&text, "u").unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn add_user_creates_replaces_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.txt");
        add_user(&path, "dev-1", b"one").unwrap();
        std::fs::write(&path, format!("# keep me\n{}", std::fs::read_to_string(&path).unwrap())).unwrap();
        add_user(&path, "dev-2", b"two").unwrap();
        add_user(&path, "dev-1", b"uno").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# keep me\ndev-1:$argon2id$"), "{text}");
        let file = PasswordFile::load(&path).unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(file.verify("dev-1", b"uno"), Ok(()));
        assert_eq!(file.verify("dev-2", b"two"), Ok(()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        for bad in ["#", "+", "a/b", "", "tab\t"] {
            assert!(add_user(&path, bad, b"x").is_err(), "{bad:?}");
        }
        assert!(add_user(&path, "dev-3", b"").is_err());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
