//! API keys: `sk_<random>`, stored only as a blake3 hash; scopes; the per-key token bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use herald_engine::Actor;
use herald_projector::{get_api_key_by_hash, ApiKeyId, OrgId, Scope};

use crate::error::{ApiError, Family};
use crate::state::AppState;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk_";
/// Random bytes in a generated key.
const KEY_RANDOM_BYTES: usize = 24;
/// Buckets kept, at most; beyond it the full ones (idle keys) are forgotten.
const BUCKETS_MAX: usize = 100_000;

/// Who is calling: a live key, its organisation (`None`: admin) and its scopes.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: ApiKeyId,
    pub org_id: Option<OrgId>,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn actor(&self) -> Actor {
        Actor { org_id: self.org_id, key_id: Some(self.key_id) }
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether this caller may see an object of `org_id`.
    pub fn sees(&self, org_id: OrgId) -> bool {
        self.org_id.is_none_or(|own| own == org_id)
    }
}

/// The stored form of a key.
pub fn key_hash(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// A new random key.
pub fn generate_key() -> Result<String, String> {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness for a key: {e}"))?;
    Ok(format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)))
}

/// Checks the bearer key, the caller's rate and the scope the route needs.
pub fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    family: Family,
    scope: Scope,
) -> Result<Principal, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| k.starts_with(KEY_PREFIX))
        .ok_or_else(|| ApiError::unauthorized(family))?;
    let stored = get_api_key_by_hash(&state.engine.tables(), &key_hash(key))
        .map_err(|e| ApiError::internal(family, e.to_string()))?
        .filter(|k| k.revoked_at_ms.is_none())
        .ok_or_else(|| ApiError::unauthorized(family))?;
    if let Some(wait_s) = state.buckets.take(stored.id) {
        let mut err = ApiError::new(
            family,
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            format!("rate limit of this API key exceeded; retry in {wait_s} s"),
        );
        err.retry_after_s = Some(wait_s);
        return Err(err);
    }
    if !stored.allows(scope) {
        return Err(ApiError::forbidden(family, format!("this API key lacks the {} scope", scope.name())));
    }
    Ok(Principal { key_id: stored.id, org_id: stored.org_id, scopes: stored.scopes })
}

/// Checks for an admin key of no organisation: the routes over every organisation (API keys, the
/// audit log) refuse an organisation's key even when it holds the `admin` scope, as a missing
/// scope, so it never sees nor changes another organisation's keys or records.
pub fn authenticate_admin(
    state: &AppState,
    headers: &HeaderMap,
    family: Family,
) -> Result<Principal, ApiError> {
    let who = authenticate(state, headers, family, Scope::Admin)?;
    if who.org_id.is_some() {
        return Err(ApiError::forbidden(family, "this route needs an admin key of no organisation"));
    }
    Ok(who)
}

/// Per-key token buckets: `rate` tokens a second, up to `burst`.
pub struct Buckets {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<ApiKeyId, (f64, Instant)>>,
}

impl Buckets {
    pub fn new(rate_per_s: u64, burst: u64) -> Buckets {
        Buckets { rate: rate_per_s as f64, burst: burst.max(1) as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `key`; `Some(seconds to wait)` when there is none.
    pub fn take(&self, key: ApiKeyId) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= BUCKETS_MAX && !map.contains_key(&key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = map.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            None
        } else if self.rate <= 0.0 {
            Some(3600)
        } else {
            Some(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_a_wait() {
        let b = Buckets::new(1, 3);
        let key = ApiKeyId(uuid::Uuid::from_u128(1));
        assert_eq!((b.take(key), b.take(key), b.take(key)), (None, None, None));
        assert_eq!(b.take(key), Some(1));
        // Another key has its own bucket.
        assert_eq!(b.take(ApiKeyId(uuid::Uuid::from_u128(2))), None);
    }

    #[test]
    fn generated_keys_are_prefixed_random_and_hash_stably() {
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        assert!(a.starts_with(KEY_PREFIX) && a.len() > 30);
        assert_ne!(a, b);
        assert_eq!(key_hash(&a), key_hash(&a));
        assert_ne!(key_hash(&a), key_hash(&b));
    }
}
