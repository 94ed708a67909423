//! Device authentication per listener (a password file of argon2 hashes, or JWTs), the
//! failed-attempt rate limit per source address, and publish ACLs. The identity a device
//! proves here is its device id for the whole connection, as a client certificate's is.

pub mod acl;
pub mod jwt;
pub mod limiter;
pub mod password;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;

use crate::config::{AuthConfig, AuthKind};
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel};
use acl::{Acl, TopicRule};
use jwt::{JwtVerifier, TokenError};
use limiter::FailureLimiter;
use password::{PasswordFile, PasswordMismatch};

/// Longest identity accepted, in bytes (as a device id anywhere in weir).
pub const MAX_IDENTITY_BYTES: usize = 256;

/// Password verifications running at once per listener: argon2 takes tens of milliseconds of
/// CPU by design, on the blocking pool, and a login flood must not take every core.
const MAX_VERIFYING: usize = 2;

/// Auth failure log lines per listener per minute; beyond, they are counted and the next line
/// says how many were left out (the metrics count every one).
const LOG_LINES_PER_MINUTE: u32 = 20;

/// Checks that an identity can name a device everywhere weir uses one: not empty, at most
/// [`MAX_IDENTITY_BYTES`], no MQTT wildcard (`+`, `#`), no `/` (it would span topic levels in
/// ACL templates), no control character (NUL included).
pub fn check_identity(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.len() > MAX_IDENTITY_BYTES {
        return Err("is longer than 256 bytes");
    }
    if id.contains(['+', '#']) {
        return Err("contains an MQTT wildcard ('+' or '#')");
    }
    if id.contains('/') {
        return Err("contains '/' (a topic level separator)");
    }
    if id.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    Ok(())
}

/// What a device presents.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// MQTT user name; HTTP Basic user.
    pub username: Option<&'a str>,
    /// MQTT password (the token, for JWT); HTTP Basic password or Bearer token.
    pub password: Option<&'a [u8]>,
}

/// Who the device proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub device_id: Arc<str>,
    /// When the credentials stop being valid (a token's `exp`): the connection closes then.
    pub expires: Option<SystemTime>,
}

/// Why authentication failed; `label` is the `reason` of `weir_auth_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no credentials (a user name and password, or a token, are required)")]
    MissingCredentials,
    #[error("unknown user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("{0}")]
    Token(TokenError),
    #[error("the identity {0:?} {1}")]
    InvalidIdentity(String, &'static str),
    #[error("{0}")]
    IdentityMismatch(String),
    #[error("too many failed attempts from this address; try again later")]
    RateLimited,
}

impl AuthFailure {
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::Token(error) => error.label(),
            AuthFailure::InvalidIdentity(..) => "invalid_identity",
            AuthFailure::IdentityMismatch(_) => "identity_mismatch",
            AuthFailure::RateLimited => "rate_limited",
        }
    }

    /// Whether the credentials themselves were wrong (MQTT: 0x86 bad user name or password),
    /// rather than valid ones naming an identity that may not connect (0x87 not authorized).
    pub fn is_bad_credentials(&self) -> bool {
        matches!(
            self,
            AuthFailure::MissingCredentials
                | AuthFailure::UnknownUser
                | AuthFailure::WrongPassword
                | AuthFailure::Token(_)
        )
    }
}

/// How one listener checks credentials.
pub enum Authenticator {
    Password { path: PathBuf, file: RwLock<Arc<PasswordFile>> },
    Jwt(Box<JwtVerifier>),
}

impl Authenticator {
    /// Reads the password file or the JWT key (a relative path was resolved with the config).
    pub fn load(config: &AuthConfig) -> Result<Self, String> {
        match config.kind {
            AuthKind::PasswordFile => {
                let path =
                    config.password_file.clone().ok_or("kind = \"password_file\" needs password_file")?;
                let file = PasswordFile::load(&path).map_err(|e| e.to_string())?;
                Ok(Authenticator::Password { path, file: RwLock::new(Arc::new(file)) })
            }
            AuthKind::Jwt => {
                let jwt = config.jwt.as_ref().ok_or("kind = \"jwt\" needs a jwt table")?;
                JwtVerifier::load(jwt).map(|v| Authenticator::Jwt(Box::new(v)))
            }
        }
    }

    /// Re-reads the password file (SIGHUP); on error the previous users stay. JWT keys are
    /// read at startup only.
    pub fn reload(&self) -> Result<(), String> {
        if let Authenticator::Password { path, file } = self {
            let fresh = PasswordFile::load(path).map_err(|e| e.to_string())?;
            *file.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        }
        Ok(())
    }
}

/// A listener's authentication at run time: the authenticator, the failure limit, the bounded
/// verification pool, metrics and rate-limited logging.
pub struct ListenerAuth {
    authenticator: Authenticator,
    limiter: FailureLimiter,
    verifying: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    log: LogGate,
}

impl ListenerAuth {
    pub fn new(config: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        Ok(Self {
            authenticator: Authenticator::load(config)?,
            limiter: FailureLimiter::new(config.max_failures, config.failures_per_minute),
            verifying: Arc::new(Semaphore::new(MAX_VERIFYING)),
            metrics,
            log: LogGate::default(),
        })
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    /// Checks `credentials` from `peer` (for the failure limit). Failures are counted, logged
    /// (rate-limited) and charged to the peer's address; over its limit an attempt is refused
    /// without being checked.
    pub async fn authenticate(
        &self,
        protocol: &'static str,
        peer: Option<IpAddr>,
        credentials: Credentials<'_>,
    ) -> Result<Authenticated, AuthFailure> {
        if let Some(ip) = peer {
            if !self.limiter.allows(ip, Instant::now()) {
                self.metrics.auth_rate_limited.get_or_create(&ProtocolLabel { protocol }).inc();
                self.log_failure(protocol, peer, credentials.username, &AuthFailure::RateLimited);
                return Err(AuthFailure::RateLimited);
            }
        }
        let result = self.check(credentials).await;
        match &result {
            Ok(authenticated) => {
                self.metrics.auth_successes.get_or_create(&ProtocolLabel { protocol }).inc();
                tracing::debug!(device = &*authenticated.device_id, "authenticated");
            }
            Err(failure) => {
                if let Some(ip) = peer {
                    self.limiter.failed(ip, Instant::now());
                }
                self.count_failure(protocol, failure);
                self.log_failure(protocol, peer, credentials.username, failure);
            }
        }
        result
    }

    /// Counts a failure decided outside [`ListenerAuth::authenticate`] (e.g. a client id that
    /// is not the identity).
    pub fn count_failure(&self, protocol: &'static str, failure: &AuthFailure) {
        let label = ProtocolReasonLabel { protocol, reason: failure.label() };
        self.metrics.auth_failures.get_or_create(&label).inc();
    }

    fn log_failure(
        &self,
        protocol: &'static str,
        peer: Option<IpAddr>,
        username: Option<&str>,
        failure: &AuthFailure,
    ) {
        if let Some(suppressed) = self.log.admit(Instant::now()) {
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            // The user name is the device's claim, shown escaped; passwords never are.
            tracing::warn!(protocol, peer, user = ?username, reason = failure.label(), suppressed, "authentication failed: {failure}");
        }
    }

    async fn check(&self, credentials: Credentials<'_>) -> Result<Authenticated, AuthFailure> {
        let authenticated = match &self.authenticator {
            Authenticator::Password { file, .. } => {
                let (Some(user), Some(password)) = (credentials.username, credentials.password) else {
                    return Err(AuthFailure::MissingCredentials);
                };
                if user.is_empty() {
                    return Err(AuthFailure::MissingCredentials);
                }
                let file = Arc::clone(&file.read().unwrap_or_else(PoisonError::into_inner));
                let (user, password) = (user.to_owned(), password.to_vec());
                // Closed only when the gateway is dropped; then nothing verifies.
                let permit = Arc::clone(&self.verifying)
                    .acquire_owned()
                    .await
                    .map_err(|_| AuthFailure::WrongPassword)?;
                let checked = tokio::task::spawn_blocking(move || {
                    let checked = file.verify(&user, &password).map(|()| user);
                    drop(permit);
                    checked
                })
                .await
                .map_err(|_| AuthFailure::WrongPassword)?;
                let user = checked.map_err(|mismatch| match mismatch {
                    PasswordMismatch::UnknownUser => AuthFailure::UnknownUser,
                    PasswordMismatch::WrongPassword => AuthFailure::WrongPassword,
                })?;
                Authenticated { device_id: user.into(), expires: None }
            }
            Authenticator::Jwt(verifier) => {
                let Some(token) = credentials.password.filter(|p| !p.is_empty()) else {
                    return Err(AuthFailure::MissingCredentials);
                };
                let token = std::str::from_utf8(token)
                    .map_err(|_| AuthFailure::Token(TokenError::Invalid("not UTF-8".into())))?;
                let verified = verifier.verify(token).map_err(AuthFailure::Token)?;
                // The user name is optional with a token; given, it must be the token's device.
                if let Some(user) = credentials.username.filter(|u| !u.is_empty()) {
                    if user != verified.device_id {
                        return Err(AuthFailure::IdentityMismatch(format!(
                            "the user name {user:?} is not the token's device {:?}",
                            verified.device_id
                        )));
                    }
                }
                Authenticated { device_id: verified.device_id.into(), expires: Some(verified.expires) }
            }
        };
        check_identity(&authenticated.device_id)
            .map_err(|reason| AuthFailure::InvalidIdentity(authenticated.device_id.to_string(), reason))?;
        Ok(authenticated)
    }
}

/// A listener's publish policy: `None` when nothing is enforced (no auth and no rules: every
/// topic allowed, as without this module). Shared by the listener's connections; a config
/// reload replaces the rules in place (the next publish is checked against the new ones).
#[derive(Debug, Default)]
pub struct PublishPolicy {
    acl: RwLock<Option<Arc<Acl>>>,
}

impl PublishPolicy {
    /// Rules are enforced (default deny) when `enforced`, i.e. the listener authenticates
    /// devices or has rules of its own.
    pub fn new(rules: &[String], enforced: bool) -> Result<Self, String> {
        if !enforced && rules.is_empty() {
            return Ok(Self::default());
        }
        let rules = rules.iter().map(|r| TopicRule::parse(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { acl: RwLock::new(Some(Arc::new(Acl::new(rules)))) })
    }

    /// Takes `other`'s rules (a config reload).
    pub fn replace(&self, other: PublishPolicy) {
        let rules = other.acl.into_inner().unwrap_or_else(PoisonError::into_inner);
        *self.acl.write().unwrap_or_else(PoisonError::into_inner) = rules;
    }

    fn acl(&self) -> Option<Arc<Acl>> {
        self.acl.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn is_enforced(&self) -> bool {
        self.acl.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    pub fn allows(&self, topic: &str, identity: Option<&str>) -> bool {
        self.acl().is_none_or(|acl| acl.allows_publish(topic, identity))
    }
}

/// Admits at most [`LOG_LINES_PER_MINUTE`] lines a minute; says how many were left out since
/// the last one admitted.
#[derive(Debug, Default)]
struct LogGate {
    state: Mutex<LogWindow>,
}

#[derive(Debug, Default)]
struct LogWindow {
    started: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogGate {
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if w.started.is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(60)) {
            w.started = Some(now);
            w.lines = 0;
        }
        if w.lines >= LOG_LINES_PER_MINUTE {
            w.suppressed += 1;
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_that_could_widen_a_topic_are_refused() {
        assert_eq!(check_identity("dev-1.factory:7"), Ok(()));
        for bad in ["", "#", "+", "a+b", "dev/1", "nul\0", "tab\t", &"x".repeat(257)] {
            assert!(check_identity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_lines_are_limited_and_the_rest_counted() {
        let gate = LogGate::default();
        let t0 = Instant::now();
        let admitted = (0..50).filter(|_| gate.admit(t0).is_some()).count();
        assert_eq!(admitted, LOG_LINES_PER_MINUTE as usize);
        assert_eq!(gate.admit(t0 + Duration::from_secs(61)), Some(30));
    }
}
