//! Who a WebSocket client is: a JWT (HS256, claims `sub`, `tenant_id`,
//! `exp`) or an API key, either one giving the client's tenant.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::config::AuthConfig;
use crate::message::now_ms;

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who: the token's `sub`, or `api-key` for a key.
    pub subject: String,
    /// The tenant whose devices it may see.
    pub tenant: String,
}

/// Why credentials were refused. Each has a stable code for error frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a token nor an API key was given.
    #[error("authentication required: send a token or an api_key")]
    Missing,
    /// The token is not a well-formed HS256 JWT.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match the configured secret.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired at {0} (Unix seconds)")]
    Expired(i64),
    /// The API key is not configured.
    #[error("unknown API key")]
    UnknownKey,
    /// Tokens are not accepted (no secret configured).
    #[error("tokens are not accepted here; use an api_key")]
    TokensDisabled,
}

impl AuthError {
    /// The code of the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Expired(_) => "token_expired",
            _ => "auth_failed",
        }
    }
}

/// Credentials as a client presents them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// A JWT.
    pub token: Option<String>,
    /// An API key.
    pub api_key: Option<String>,
}

/// Checks credentials against the configuration.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    /// `None`: authentication is off; every client is let in, with no tenant.
    config: Option<AuthSettings>,
}

#[derive(Debug, Clone)]
struct AuthSettings {
    secret: Option<Vec<u8>>,
    api_keys: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    tenant_id: String,
    exp: i64,
}

impl Authenticator {
    /// From the `[auth]` section; `None` turns authentication off.
    pub fn new(config: Option<&AuthConfig>) -> Self {
        Authenticator {
            config: config.map(|c| AuthSettings {
                secret: c.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
                api_keys: c.api_keys.clone(),
            }),
        }
    }

    /// Whether clients must authenticate.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The identity behind `credentials`; `Ok(None)` when authentication is off.
    pub fn check(&self, credentials: &Credentials) -> Result<Option<Identity>, AuthError> {
        let Some(settings) = &self.config else {
            return Ok(None);
        };
        if let Some(token) = &credentials.token {
            let secret = settings.secret.as_ref().ok_or(AuthError::TokensDisabled)?;
            return verify_jwt(token, secret, now_ms() / 1000).map(Some);
        }
        if let Some(key) = &credentials.api_key {
            return settings
                .api_keys
                .get(key)
                .map(|tenant| {
                    Some(Identity {
                        subject: "api-key".into(),
                        tenant: tenant.clone(),
                    })
                })
                .ok_or(AuthError::UnknownKey);
        }
        Err(AuthError::Missing)
    }
}

/// Verifies an HS256 JWT signed with `secret` at `now` (Unix seconds).
pub fn verify_jwt(token: &str, secret: &[u8], now: i64) -> Result<Identity, AuthError> {
    let malformed = |what: &str| AuthError::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected three dot-separated parts"));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| malformed(&format!("{what} is not base64url")))
    };
    let parsed: Header = serde_json::from_slice(&decode(header, "the header")?)
        .map_err(|e| malformed(&format!("header: {e}")))?;
    if parsed.alg != "HS256" {
        return Err(malformed(&format!(
            "alg {:?}; only HS256 is accepted",
            parsed.alg
        )));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    mac.verify_slice(&decode(signature, "the signature")?)
        .map_err(|_| AuthError::BadSignature)?;
    let claims: Claims = serde_json::from_slice(&decode(payload, "the payload")?)
        .map_err(|e| malformed(&format!("claims: {e}")))?;
    if claims.exp <= now {
        return Err(AuthError::Expired(claims.exp));
    }
    Ok(Identity {
        subject: claims.sub,
        tenant: claims.tenant_id,
    })
}

/// Signs an HS256 JWT for `sub` of `tenant` expiring at `exp` (Unix
/// seconds): for tests, tools and operators issuing tokens.
pub fn sign_jwt(secret: &[u8], sub: &str, tenant: &str, exp: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({"sub": sub, "tenant_id": tenant, "exp": exp});
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_expire() {
        let token = sign_jwt(b"secret", "ann", "acme", 2_000);
        let identity = verify_jwt(&token, b"secret", 1_000).unwrap();
        assert_eq!(identity.tenant, "acme");
        assert_eq!(identity.subject, "ann");
        assert_eq!(
            verify_jwt(&token, b"secret", 2_000),
            Err(AuthError::Expired(2_000))
        );
        assert_eq!(
            verify_jwt(&token, b"other", 1_000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            verify_jwt("a.b", b"secret", 1_000),
            Err(AuthError::Malformed(_))
        ));
        // A token whose payload was changed after signing.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(r#"{"sub":"ann","tenant_id":"other","exp":2000}"#);
        parts[1] = &forged;
        assert_eq!(
            verify_jwt(&parts.join("."), b"secret", 1_000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn api_keys_map_to_tenants() {
        let auth = Authenticator::new(Some(&AuthConfig {
            jwt_secret: None,
            api_keys: [("k1".to_owned(), "acme".to_owned())].into(),
        }));
        let key = |k: &str| Credentials {
            api_key: Some(k.into()),
            token: None,
        };
        assert_eq!(auth.check(&key("k1")).unwrap().unwrap().tenant, "acme");
        assert_eq!(auth.check(&key("k2")), Err(AuthError::UnknownKey));
        assert_eq!(auth.check(&Credentials::default()), Err(AuthError::Missing));
        assert_eq!(
            Authenticator::new(None).check(&Credentials::default()),
            Ok(None)
        );
    }
}
