//! Who a caller is: a JWT (HS256: `sub`, `tenant_id`, `exp`, `nbf`, `iss`,
//! `aud`, and `scope` or `scopes`) or an API key, each giving a tenant and
//! scopes (`read`, `ingest`, `command`, `admin`).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{ApiKey, AuthConfig};
use crate::message::now_ms;

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Devices, latest values, status, WebSocket subscriptions.
    Read,
    /// HTTP ingest.
    Ingest,
    /// Device commands.
    Command,
    /// Every tenant, scripts, all dead letters, stats, metrics.
    Admin,
}

impl Scope {
    const ALL: [Scope; 4] = [Scope::Read, Scope::Ingest, Scope::Command, Scope::Admin];

    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Ingest => 2,
            Scope::Command => 4,
            Scope::Admin => 8,
        }
    }

    /// The scope's name in credentials and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Ingest => "ingest",
            Scope::Command => "command",
            Scope::Admin => "admin",
        }
    }

    /// The scope called `name`.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Only `read`: what a credential without scopes gets.
    pub const READ: Scopes = Scopes(1);

    /// The scopes named, or the first name that is not a scope.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Scopes, String> {
        let mut scopes = Scopes(0);
        for name in names {
            let scope = Scope::parse(name).ok_or_else(|| {
                format!("unknown scope {name:?} (read, ingest, command or admin)")
            })?;
            scopes.0 |= scope.bit();
        }
        Ok(scopes)
    }

    /// Whether `scope` is in the set (`admin` implies every scope).
    pub fn allow(self, scope: Scope) -> bool {
        self.0 & (scope.bit() | Scope::Admin.bit()) != 0
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                Scope::ALL
                    .iter()
                    .filter(|s| self.0 & s.bit() != 0)
                    .map(|s| s.as_str()),
            )
            .finish()
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who: the token's `sub`, or `api-key` for a key.
    pub subject: String,
    /// The tenant whose devices it may see; `None` only for admin
    /// credentials, which see every tenant.
    pub tenant: Option<String>,
    /// What it may do.
    pub scopes: Scopes,
    /// When the credential expires (a JWT's `exp`, Unix seconds).
    pub expires_at: Option<i64>,
}

impl Identity {
    /// Whether it may do what `scope` covers.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.allow(scope)
    }

    /// Whether it sees devices of `tenant`: its own, or every one as admin.
    pub fn sees(&self, tenant: &str) -> bool {
        self.allows(Scope::Admin) || self.tenant.as_deref() == Some(tenant)
    }

    /// Its tenant as a string (empty for an admin without one).
    pub fn tenant_name(&self) -> &str {
        self.tenant.as_deref().unwrap_or_default()
    }
}

/// Why credentials were refused. Each has a stable code for error frames
/// and HTTP bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a token nor an API key was given.
    #[error("authentication required: send a token or an API key")]
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
    /// `nbf` has not come yet.
    #[error("token not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
    /// `iss` or `aud` is not the configured one.
    #[error("token {claim} is {found:?}, expected {expected:?}")]
    WrongClaim {
        /// `iss` or `aud`.
        claim: &'static str,
        /// What the token says.
        found: String,
        /// What is configured.
        expected: String,
    },
    /// The API key is not configured.
    #[error("unknown API key")]
    UnknownKey,
    /// Tokens are not accepted (no secret configured).
    #[error("tokens are not accepted here; use an API key")]
    TokensDisabled,
    /// Credentials in the query string are turned off.
    #[error("credentials in the URL are turned off here (auth.allow_query_tokens = false)")]
    QueryTokensDisabled,
}

impl AuthError {
    /// The code of the error frame or body.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Expired(_) => "token_expired",
            _ => "auth_failed",
        }
    }
}

/// Credentials as a client presents them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// A JWT.
    pub token: Option<String>,
    /// An API key.
    pub api_key: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in a log line.
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Credentials {
    /// Whether any credential is there.
    pub fn is_empty(&self) -> bool {
        self.token.is_none() && self.api_key.is_none()
    }
}

/// Checks credentials against the configuration.
#[derive(Clone, Default)]
pub struct Authenticator {
    /// `None`: authentication is off; every caller is let in, unrestricted.
    settings: Option<Settings>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.settings.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Settings {
    secret: Option<Vec<u8>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: i64,
    /// SHA-256 of each key, with who it is; compared in constant time.
    keys: Vec<([u8; 32], Identity)>,
    allow_query_tokens: bool,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// `aud` may be one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    tenant_id: Option<String>,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// Equal in time independent of where the bytes differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    /// From the `[auth]` section (already validated); `None` turns
    /// authentication off.
    pub fn new(config: Option<&AuthConfig>) -> Self {
        let settings = config.map(|c| Settings {
            secret: c.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            issuer: c.jwt_issuer.clone(),
            audience: c.jwt_audience.clone(),
            leeway: i64::try_from(c.leeway.as_secs()).unwrap_or(i64::MAX),
            keys: c
                .api_keys
                .0
                .iter()
                .map(|(key, entry)| {
                    let (tenant, scopes) = match entry {
                        ApiKey::Tenant(tenant) => (Some(tenant.clone()), Scopes::READ),
                        ApiKey::Scoped(scoped) => (
                            scoped.tenant.clone().filter(|t| !t.is_empty()),
                            // Checked when the configuration was loaded.
                            Scopes::from_names(scoped.scopes.iter().map(String::as_str))
                                .unwrap_or(Scopes::READ),
                        ),
                    };
                    (
                        Sha256::digest(key.as_bytes()).into(),
                        Identity {
                            subject: "api-key".into(),
                            tenant,
                            scopes,
                            expires_at: None,
                        },
                    )
                })
                .collect(),
            allow_query_tokens: c.allow_query_tokens,
        });
        Authenticator { settings }
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.settings.is_some()
    }

    /// Whether credentials may come in the query string of a WebSocket upgrade.
    pub fn allows_query_tokens(&self) -> bool {
        self.settings.as_ref().is_none_or(|s| s.allow_query_tokens)
    }

    /// The identity behind `credentials`; `Ok(None)` when authentication is off.
    pub fn check(&self, credentials: &Credentials) -> Result<Option<Identity>, AuthError> {
        let Some(settings) = &self.settings else {
            return Ok(None);
        };
        if let Some(token) = &credentials.token {
            // A bearer may be an API key.
            if let Some(identity) = settings.key(token) {
                return Ok(Some(identity));
            }
            let secret = settings.secret.as_ref().ok_or(AuthError::TokensDisabled)?;
            return settings.verify(token, secret, now_ms() / 1000).map(Some);
        }
        if let Some(key) = &credentials.api_key {
            return settings.key(key).map(Some).ok_or(AuthError::UnknownKey);
        }
        Err(AuthError::Missing)
    }
}

impl Settings {
    /// The identity of API key `key`, looked up in constant time.
    fn key(&self, key: &str) -> Option<Identity> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (stored, identity) in &self.keys {
            if same_digest(stored, &digest) && found.is_none() {
                found = Some(identity.clone());
            }
        }
        found
    }

    fn verify(&self, token: &str, secret: &[u8], now: i64) -> Result<Identity, AuthError> {
        let claims = verify_signature(token, secret)?;
        if claims.exp.saturating_add(self.leeway) <= now {
            return Err(AuthError::Expired(claims.exp));
        }
        if let Some(nbf) = claims.nbf
            && nbf.saturating_sub(self.leeway) > now
        {
            return Err(AuthError::NotYetValid(nbf));
        }
        if let Some(expected) = &self.issuer
            && claims.iss.as_deref() != Some(expected.as_str())
        {
            return Err(AuthError::WrongClaim {
                claim: "iss",
                found: claims.iss.clone().unwrap_or_default(),
                expected: expected.clone(),
            });
        }
        if let Some(expected) = &self.audience {
            let matches = match &claims.aud {
                Some(Audience::One(aud)) => aud == expected,
                Some(Audience::Many(auds)) => auds.iter().any(|a| a == expected),
                None => false,
            };
            if !matches {
                let found = match &claims.aud {
                    Some(Audience::One(aud)) => aud.clone(),
                    Some(Audience::Many(auds)) => auds.join(" "),
                    None => String::new(),
                };
                return Err(AuthError::WrongClaim {
                    claim: "aud",
                    found,
                    expected: expected.clone(),
                });
            }
        }
        let scopes = match (&claims.scope, &claims.scopes) {
            (Some(scope), _) => Scopes::from_names(scope.split_whitespace()),
            (None, Some(scopes)) => Scopes::from_names(scopes.iter().map(String::as_str)),
            (None, None) => Ok(Scopes::READ),
        }
        .map_err(AuthError::Malformed)?;
        let tenant = claims.tenant_id.filter(|t| !t.is_empty());
        if tenant.is_none() && !scopes.allow(Scope::Admin) {
            return Err(AuthError::Malformed(
                "claims: missing field `tenant_id` (only admin tokens may have none)".into(),
            ));
        }
        Ok(Identity {
            subject: claims.sub,
            tenant,
            scopes,
            expires_at: Some(claims.exp.saturating_add(self.leeway)),
        })
    }
}

/// Checks the HS256 signature of `token` and returns its claims.
fn verify_signature(token: &str, secret: &[u8]) -> Result<Claims, AuthError> {
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
    serde_json::from_slice(&decode(payload, "the payload")?)
        .map_err(|e| malformed(&format!("claims: {e}")))
}

/// Verifies an HS256 JWT signed with `secret` at `now` (Unix seconds),
/// with no leeway and no issuer or audience check.
pub fn verify_jwt(token: &str, secret: &[u8], now: i64) -> Result<Identity, AuthError> {
    Settings {
        secret: None,
        issuer: None,
        audience: None,
        leeway: 0,
        keys: Vec::new(),
        allow_query_tokens: false,
    }
    .verify(token, secret, now)
}

/// Signs an HS256 JWT with `claims` (a JSON object): for tests, tools and
/// operators issuing tokens.
pub fn sign_claims(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

/// Signs an HS256 JWT for `sub` of `tenant` expiring at `exp` (Unix
/// seconds), with the `read` scope.
pub fn sign_jwt(secret: &[u8], sub: &str, tenant: &str, exp: i64) -> String {
    sign_claims(
        secret,
        &serde_json::json!({"sub": sub, "tenant_id": tenant, "exp": exp}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKeys, ScopedKey};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_verify_and_expire() {
        let token = sign_jwt(SECRET, "ann", "acme", 2_000);
        let identity = verify_jwt(&token, SECRET, 1_000).unwrap();
        assert_eq!(identity.tenant.as_deref(), Some("acme"));
        assert_eq!(identity.subject, "ann");
        assert_eq!(identity.scopes, Scopes::READ, "no scope claim means read");
        assert_eq!(
            verify_jwt(&token, SECRET, 2_000),
            Err(AuthError::Expired(2_000))
        );
        assert_eq!(
            verify_jwt(&token, b"other", 1_000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            verify_jwt("a.b", SECRET, 1_000),
            Err(AuthError::Malformed(_))
        ));
        // A token whose payload was changed after signing.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(r#"{"sub":"ann","tenant_id":"other","exp":2000}"#);
        parts[1] = &forged;
        assert_eq!(
            verify_jwt(&parts.join("."), SECRET, 1_000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn scopes_come_from_scope_or_scopes_and_admin_may_have_no_tenant() {
        let spaced = sign_claims(
            SECRET,
            &json!({"sub": "a", "tenant_id": "acme", "exp": 9, "scope": "read ingest"}),
        );
        let identity = verify_jwt(&spaced, SECRET, 1).unwrap();
        assert!(identity.allows(Scope::Ingest) && identity.allows(Scope::Read));
        assert!(!identity.allows(Scope::Admin) && !identity.allows(Scope::Command));
        let listed = sign_claims(SECRET, &json!({"sub": "a", "exp": 9, "scopes": ["admin"]}));
        let admin = verify_jwt(&listed, SECRET, 1).unwrap();
        assert_eq!(admin.tenant, None);
        assert!(admin.allows(Scope::Command) && admin.sees("anyone"));
        let tenantless = sign_claims(SECRET, &json!({"sub": "a", "exp": 9, "scope": "read"}));
        assert!(matches!(
            verify_jwt(&tenantless, SECRET, 1),
            Err(AuthError::Malformed(_))
        ));
        let unknown = sign_claims(
            SECRET,
            &json!({"sub": "a", "tenant_id": "t", "exp": 9, "scope": "root"}),
        );
        assert!(matches!(
            verify_jwt(&unknown, SECRET, 1),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn nbf_iss_aud_and_leeway_are_checked() {
        let auth = Authenticator::new(Some(&AuthConfig {
            jwt_secret: Some(String::from_utf8(SECRET.to_vec()).unwrap()),
            jwt_issuer: Some("https://id.example".into()),
            jwt_audience: Some("sluice".into()),
            ..AuthConfig::default()
        }));
        let now = now_ms() / 1000;
        let token = |claims: serde_json::Value| Credentials {
            token: Some(sign_claims(SECRET, &claims)),
            api_key: None,
        };
        let good = json!({"sub": "a", "tenant_id": "t", "exp": now + 60, "iss": "https://id.example", "aud": ["x", "sluice"]});
        assert!(auth.check(&token(good.clone())).is_ok());
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = json!("https://evil.example");
        assert!(matches!(
            auth.check(&token(wrong_iss)),
            Err(AuthError::WrongClaim { claim: "iss", .. })
        ));
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = json!("other");
        assert!(matches!(
            auth.check(&token(wrong_aud)),
            Err(AuthError::WrongClaim { claim: "aud", .. })
        ));
        let mut early = good.clone();
        early["nbf"] = json!(now + 120);
        assert!(matches!(
            auth.check(&token(early)),
            Err(AuthError::NotYetValid(_))
        ));
        // Within the default leeway of 30 s.
        let mut just_expired = good.clone();
        just_expired["exp"] = json!(now - 10);
        assert!(auth.check(&token(just_expired)).is_ok());
        let mut long_expired = good;
        long_expired["exp"] = json!(now - 60);
        assert!(matches!(
            auth.check(&token(long_expired)),
            Err(AuthError::Expired(_))
        ));
    }

    #[test]
    fn api_keys_give_tenants_and_scopes() {
        let mut keys = ApiKeys::default();
        keys.0
            .insert("read-key-0123456789".into(), ApiKey::Tenant("acme".into()));
        keys.0.insert(
            "ingest-key-0123456789".into(),
            ApiKey::Scoped(ScopedKey {
                tenant: Some("acme".into()),
                scopes: vec!["ingest".into()],
            }),
        );
        let auth = Authenticator::new(Some(&AuthConfig {
            api_keys: keys,
            ..AuthConfig::default()
        }));
        let key = |k: &str| Credentials {
            api_key: Some(k.into()),
            token: None,
        };
        let reader = auth.check(&key("read-key-0123456789")).unwrap().unwrap();
        assert_eq!(reader.tenant.as_deref(), Some("acme"));
        assert!(reader.allows(Scope::Read) && !reader.allows(Scope::Ingest));
        let ingester = auth.check(&key("ingest-key-0123456789")).unwrap().unwrap();
        assert!(ingester.allows(Scope::Ingest) && !ingester.allows(Scope::Read));
        assert_eq!(auth.check(&key("nope")), Err(AuthError::UnknownKey));
        // A key may come as a bearer too.
        let bearer = Credentials {
            token: Some("read-key-0123456789".into()),
            api_key: None,
        };
        assert!(auth.check(&bearer).unwrap().is_some());
        assert_eq!(auth.check(&Credentials::default()), Err(AuthError::Missing));
        assert_eq!(
            Authenticator::new(None).check(&Credentials::default()),
            Ok(None)
        );
    }
}
