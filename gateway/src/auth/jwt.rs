//! JSON Web Tokens: the signature (HS256, RS256 or ES256, the one algorithm configured: a
//! token naming another, `none` included, is refused), `exp` (required) and `nbf` with a
//! leeway, the audience and issuer when configured, and the device id from a claim.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{JwtAlgorithm, JwtConfig};

/// Checks tokens against one key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    device_id_claim: String,
    leeway: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithms", &self.validation.algorithms).finish()
    }
}

/// Why a token was refused; the `reason` label of `weir_auth_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token lacks the {0:?} claim, or it is not a string")]
    MissingClaim(String),
    #[error("the token is for another audience or issuer")]
    WrongAudienceOrIssuer,
    #[error("the token is malformed or uses another algorithm: {0}")]
    Invalid(String),
}

impl TokenError {
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::BadSignature => "bad_signature",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::WrongAudienceOrIssuer => "wrong_audience_or_issuer",
            TokenError::Invalid(_) => "invalid_token",
        }
    }
}

/// A verified token: who, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub device_id: String,
    /// `exp` plus the leeway: when the connection it opened must close.
    pub expires: SystemTime,
}

impl JwtVerifier {
    /// Reads the key: for HS256 the file's bytes are the secret (one trailing newline is not
    /// part of it); for RS256 and ES256 a PEM public key.
    pub fn load(config: &JwtConfig) -> Result<Self, String> {
        let bytes = std::fs::read(&config.key_file)
            .map_err(|e| format!("cannot read {}: {e}", config.key_file.display()))?;
        Self::new(config, &bytes, &config.key_file)
    }

    fn new(config: &JwtConfig, bytes: &[u8], path: &Path) -> Result<Self, String> {
        let (key, algorithm) = match config.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
                let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
                if secret.len() < 32 {
                    return Err(format!(
                        "{}: an HS256 secret needs at least 32 bytes (it has {})",
                        path.display(),
                        secret.len()
                    ));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            JwtAlgorithm::Rs256 => (
                DecodingKey::from_rsa_pem(bytes)
                    .map_err(|e| format!("{}: not a PEM RSA public key: {e}", path.display()))?,
                Algorithm::RS256,
            ),
            JwtAlgorithm::Es256 => (
                DecodingKey::from_ec_pem(bytes)
                    .map_err(|e| format!("{}: not a PEM EC (P-256) public key: {e}", path.display()))?,
                Algorithm::ES256,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken only checks `aud`/`iss` when the token has them: configured, they are
        // required too.
        let mut required: HashSet<String> = ["exp".to_owned()].into();
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.insert("iss".into());
        }
        validation.required_spec_claims = required;
        Ok(Self {
            key,
            validation,
            device_id_claim: config.device_id_claim.clone(),
            leeway: Duration::from_secs(config.leeway_s),
        })
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|error| match error.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => TokenError::WrongAudienceOrIssuer,
            ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
            _ => TokenError::Invalid(error.to_string()),
        })?;
        let claims = data.claims;
        let device_id = match claims.get(&self.device_id_claim) {
            Some(serde_json::Value::String(id)) => id.clone(),
            _ => return Err(TokenError::MissingClaim(self.device_id_claim.clone())),
        };
        // Validated as a number by jsonwebtoken; a fraction counts as its whole seconds.
        let exp = claims.get("exp").and_then(serde_json::Value::as_f64).unwrap_or(0.0).max(0.0);
        let expires = UNIX_EPOCH + Duration::from_secs(exp as u64) + self.leeway;
        Ok(VerifiedToken { device_id, expires })
    }
}

/// Seconds since the Unix epoch, for building test tokens.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn config(algorithm: JwtAlgorithm) -> JwtConfig {
        JwtConfig {
            algorithm,
            key_file: "unused".into(),
            device_id_claim: "sub".into(),
            audience: None,
            issuer: None,
            leeway_s: 0,
        }
    }

    fn hs256(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn hs256_tokens_are_checked() {
        let verifier = JwtVerifier::new(&config(JwtAlgorithm::Hs256), SECRET, Path::new("k")).unwrap();
        let now = unix_now();
        let ok = verifier.verify(&hs256(json!({"sub": "dev-1", "exp": now + 60}))).unwrap();
        assert_eq!(ok.device_id, "dev-1");
        assert_eq!(ok.expires, UNIX_EPOCH + Duration::from_secs(now + 60));
        let cases = [
            (json!({"sub": "dev-1", "exp": now - 5}), TokenError::Expired),
            (json!({"sub": "dev-1", "exp": now + 60, "nbf": now + 30}), TokenError::NotYetValid),
            (json!({"sub": "dev-1"}), TokenError::MissingClaim("exp".into())),
            (json!({"exp": now + 60}), TokenError::MissingClaim("sub".into())),
            (json!({"sub": 7, "exp": now + 60}), TokenError::MissingClaim("sub".into())),
        ];
        for (claims, expected) in cases {
            assert_eq!(verifier.verify(&hs256(claims.clone())), Err(expected), "{claims}");
        }
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "dev-1", "exp": now + 60}),
            &EncodingKey::from_secret(b"another secret, also 32 bytes long"),
        )
        .unwrap();
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
        // alg=none, and a token for another algorithm.
        let none =
            format!("{}.{}.", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", forged.split('.').nth(1).unwrap());
        assert_eq!(verifier.verify(&none).unwrap_err().label(), "invalid_token");
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "dev-1", "exp": now + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(verifier.verify(&hs384).unwrap_err().label(), "invalid_token");
        assert_eq!(verifier.verify("not a token").unwrap_err().label(), "invalid_token");
    }

    #[test]
    fn leeway_audience_issuer_and_claim_name() {
        let mut config = config(JwtAlgorithm::Hs256);
        config.leeway_s = 30;
        config.audience = Some("weir".into());
        config.issuer = Some("factory".into());
        config.device_id_claim = "device".into();
        let verifier = JwtVerifier::new(&config, SECRET, Path::new("k")).unwrap();
        let now = unix_now();
        let claims = json!({"device": "d", "exp": now - 10, "aud": "weir", "iss": "factory"});
        let ok = verifier.verify(&hs256(claims)).unwrap();
        assert_eq!(ok.expires, UNIX_EPOCH + Duration::from_secs(now - 10 + 30), "exp plus the leeway");
        for claims in [
            json!({"device": "d", "exp": now + 60, "iss": "factory"}),
            json!({"device": "d", "exp": now + 60, "aud": "other", "iss": "factory"}),
            json!({"device": "d", "exp": now + 60, "aud": "weir"}),
        ] {
            let label = verifier.verify(&hs256(claims.clone())).unwrap_err().label();
            assert!(matches!(label, "missing_claim" | "wrong_audience_or_issuer"), "{claims}: {label}");
        }
    }

    #[test]
    fn keys_are_checked() {
        let err = JwtVerifier::new(&config(JwtAlgorithm::Hs256), b"short\n", Path::new("k")).unwrap_err();
        assert!(err.contains("32 bytes"), "{err}");
        let err = JwtVerifier::new(&config(JwtAlgorithm::Rs256), b"nope", Path::new("k")).unwrap_err();
        assert!(err.contains("RSA"), "{err}");
        let err = JwtVerifier::new(&config(JwtAlgorithm::Es256), b"nope", Path::new("k")).unwrap_err();
        assert!(err.contains("EC"), "{err}");
    }

    #[test]
    fn es256_with_a_generated_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let verifier =
            JwtVerifier::new(&config(JwtAlgorithm::Es256), key.public_key_pem().as_bytes(), Path::new("k"))
                .unwrap();
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let claims = json!({"sub": "dev-9", "exp": unix_now() + 60});
        let token = encode(&Header::new(Algorithm::ES256), &claims, &signing).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().device_id, "dev-9");
    }
}
