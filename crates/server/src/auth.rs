//! API keys: `sk_<random>`, stored only as a blake3 hash; scopes; the per-key token bucket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use herald_engine::{get_api_key_by_hash, Actor, ApiKey, ApiKeyId, Engine, OrgId, Scope};

use crate::error::{ApiError, Family};
use crate::state::AppState;

mod extract;

pub use extract::{scope, Auth, Plain};

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk_";
/// Random bytes in a generated key.
const KEY_RANDOM_BYTES: usize = 24;
/// Buckets kept, at most; beyond it the full ones (idle keys) are forgotten.
const BUCKETS_MAX: usize = 100_000;
/// Keys the authentication cache holds, at most.
pub const KEY_CACHE_MAX: usize = 10_000;

/// Who is calling: a live key and its organisation (`None`: admin). Its scopes were checked when
/// it was authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: ApiKeyId,
    pub org_id: Option<OrgId>,
}

impl Principal {
    pub fn actor(&self) -> Actor {
        Actor { org_id: self.org_id, key_id: Some(self.key_id) }
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

/// The token of an `Authorization: Bearer <token>` value. The scheme name is case-insensitive
/// (RFC 9110, section 11.1): `bearer` and `BEARER` are taken too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// The key of a request's `Authorization: Bearer` header, if it has one.
pub fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Checks the bearer key, the caller's rate and the scope the route needs.
pub fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    family: Family,
    scope: Scope,
) -> Result<Principal, ApiError> {
    let key = bearer_key(headers).ok_or_else(|| ApiError::unauthorized(family))?;
    let stored = state
        .keys
        .find(Some(&state.engine), &key_hash(key))
        .map_err(|e| e.into_api(family))?
        .ok_or_else(|| ApiError::unauthorized(family))?;
    if stored.revoked {
        return Err(ApiError::unauthorized(family));
    }
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
    Ok(Principal { key_id: stored.id, org_id: stored.org_id })
}

/// What authentication needs of a stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    pub id: ApiKeyId,
    pub org_id: Option<OrgId>,
    pub scopes: Arc<[Scope]>,
    pub revoked: bool,
}

impl CachedKey {
    /// Whether the key grants `scope`, as [`ApiKey::allows`] decides it.
    pub fn allows(&self, scope: Scope) -> bool {
        !self.revoked && self.scopes.iter().any(|&s| s == scope || s == Scope::Admin)
    }
}

impl From<&ApiKey> for CachedKey {
    fn from(k: &ApiKey) -> CachedKey {
        CachedKey {
            id: k.id,
            org_id: k.org_id,
            scopes: k.scopes.as_slice().into(),
            revoked: k.revoked_at_ms.is_some(),
        }
    }
}

/// Keys by hash, as last read from the projection, so a request does not read and decode its key
/// from the store. Only keys the projection finds by hash are cached (an unknown or revoked key is
/// read each time, so guessing cannot fill the cache), at most `max` of them: two generations, the older dropped when the
/// newer fills, a hit in the older moving back to the newer.
///
/// Invalidation: every entry belongs to the engine's [`api_key_epoch`](herald_engine::Engine::api_key_epoch),
/// which grows once a batch creating or revoking a key is applied to the store, whatever
/// submitted it (this server's routes or an embedder), before that batch's callers are answered.
/// A request reads the epoch first, then the cache or the projection. When it sees a newer epoch
/// the cache is emptied; an entry read under an older epoch than the cache's is not kept. So once
/// a revoke returns, every request reads the epoch it moved to and the revoked row.
///
/// Where keys are read: the engine the request runs on (one node), or a [`KeySource`] (cluster
/// mode: every key lives in the control partition, which every node follows). Clones share
/// their entries and their source (one cache for every partition a node serves).
#[derive(Clone)]
pub struct KeyCache {
    max: usize,
    inner: Arc<Mutex<KeyCacheInner>>,
    source: Option<Arc<dyn KeySource>>,
    /// Refreshes of the source done so far, and the lock that lets one run at a time.
    refreshes: Arc<(AtomicU64, tokio::sync::Mutex<()>)>,
}

/// Where keys come from when not from the engine a request runs on: cluster mode's control
/// partition (the owner's engine or this node's replica of it).
pub trait KeySource: Send + Sync {
    /// Moves whenever the keys may have changed (see [`KeyCache`]).
    fn api_key_epoch(&self) -> u64;
    /// The key of a blake3 hash, revoked ones included.
    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String>;
    /// Catches the keys up now (a key just created through another node); blocking.
    fn refresh_control(&self) -> Result<(), String>;
    /// Ok while the keys may be answered from (memory only): a followed copy known current.
    fn keys_current(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why a key could not be read: the store, or the key source.
#[derive(Debug)]
pub enum KeyReadError {
    Engine(herald_engine::EngineError),
    Source(String),
}

impl KeyReadError {
    /// A 503 in `family`'s shape: the key may well exist.
    pub fn into_api(self, family: Family) -> ApiError {
        match self {
            KeyReadError::Engine(e) => ApiError::from_read(family, e),
            KeyReadError::Source(e) => ApiError::new(
                family,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the API keys could not be read: {e}"),
            ),
        }
    }
}

#[derive(Default)]
struct KeyCacheInner {
    epoch: u64,
    newer: HashMap<[u8; 32], CachedKey>,
    older: HashMap<[u8; 32], CachedKey>,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::new(KEY_CACHE_MAX)
    }
}

impl KeyCache {
    /// A cache of at most `max` keys (at least 2).
    pub fn new(max: usize) -> KeyCache {
        KeyCache {
            max: max.max(2),
            inner: Arc::new(Mutex::new(KeyCacheInner::default())),
            source: None,
            refreshes: Arc::new((AtomicU64::new(0), tokio::sync::Mutex::new(()))),
        }
    }

    /// A cache of at most `max` keys read from `source` rather than from the engine.
    pub fn with_source(max: usize, source: Arc<dyn KeySource>) -> KeyCache {
        KeyCache { source: Some(source), ..KeyCache::new(max) }
    }

    /// The key of `hash` (revoked ones included), from the cache or else from the source or
    /// `engine`, read after the epoch (see the type's doc). `None`: no such key.
    pub fn find(&self, engine: Option<&Engine>, hash: &[u8; 32]) -> Result<Option<CachedKey>, KeyReadError> {
        let epoch = match (&self.source, engine) {
            (Some(source), _) => {
                // A followed copy not known current answers nothing, not even from the cache.
                source.keys_current().map_err(KeyReadError::Source)?;
                source.api_key_epoch()
            }
            (None, Some(engine)) => engine.api_key_epoch(),
            (None, None) => return Err(KeyReadError::Source("no source of API keys".into())),
        };
        if let Some(cached) = self.get(epoch, hash) {
            return Ok(Some(cached));
        }
        let read = match (&self.source, engine) {
            (Some(source), _) => source.api_key_by_hash(hash).map_err(KeyReadError::Source)?,
            (None, Some(engine)) => {
                engine.read(|t| get_api_key_by_hash(t, hash)).map_err(KeyReadError::Engine)?
            }
            (None, None) => None,
        };
        Ok(read.map(|key| {
            let cached = CachedKey::from(&key);
            self.insert(epoch, *hash, cached.clone());
            cached
        }))
    }

    /// Whether the keys come from a followed source not known current now: a
    /// [`KeyCache::refresh`] is due before any key is answered.
    pub fn stale(&self) -> bool {
        self.source.as_ref().is_some_and(|s| s.keys_current().is_err())
    }

    /// Whether a miss is worth a [`KeyCache::refresh`] (keys come from a followed source).
    pub fn refreshable(&self) -> bool {
        self.source.is_some()
    }

    /// Catches the source up once (nothing without one). Callers that missed while one refresh
    /// ran wait for it and do not start another: a flood of unknown keys costs one at a time.
    pub async fn refresh(&self) {
        let Some(source) = self.source.clone() else { return };
        let (done, one_at_a_time) = &*self.refreshes;
        let seen = done.load(Ordering::SeqCst);
        let _one = one_at_a_time.lock().await;
        if done.load(Ordering::SeqCst) != seen {
            // Another caller's refresh ended while this one waited: it covers this miss.
            return;
        }
        match tokio::task::spawn_blocking(move || source.refresh_control()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "catching the API keys up failed"),
            Err(e) => tracing::warn!(error = %e, "catching the API keys up failed"),
        }
        done.fetch_add(1, Ordering::SeqCst);
    }

    /// The key of `hash` cached under `epoch` (the engine's, read before this call), if any.
    pub fn get(&self, epoch: u64, hash: &[u8; 32]) -> Option<CachedKey> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if epoch != inner.epoch {
            if epoch > inner.epoch {
                // Keys were created or revoked since: forget everything.
                inner.epoch = epoch;
                inner.newer.clear();
                inner.older.clear();
            }
            // An older epoch: this request started before the change; read the store.
            return None;
        }
        if let Some(k) = inner.newer.get(hash) {
            return Some(k.clone());
        }
        let k = inner.older.remove(hash)?;
        self.put(&mut inner, *hash, k.clone());
        Some(k)
    }

    /// Keeps `key`, read from the projection after `epoch` was read, unless the epoch moved since.
    pub fn insert(&self, epoch: u64, hash: [u8; 32], key: CachedKey) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if epoch > inner.epoch {
            inner.epoch = epoch;
            inner.newer.clear();
            inner.older.clear();
        }
        if epoch == inner.epoch {
            self.put(&mut inner, hash, key);
        }
    }

    fn put(&self, inner: &mut KeyCacheInner, hash: [u8; 32], key: CachedKey) {
        if inner.newer.len() >= self.max / 2 {
            inner.older = std::mem::take(&mut inner.newer);
        }
        inner.newer.insert(hash, key);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.newer.len() + inner.older.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-key token buckets: `rate` tokens a second, up to `burst`.
/// Clones share their buckets (one set for every partition a cluster node serves).
#[derive(Clone)]
pub struct Buckets {
    rate: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<ApiKeyId, (f64, Instant)>>>,
}

impl Buckets {
    pub fn new(rate_per_s: u64, burst: u64) -> Buckets {
        Buckets {
            rate: rate_per_s as f64,
            burst: burst.max(1) as f64,
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
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
    fn the_bearer_scheme_is_case_insensitive_and_required() {
        for value in ["Bearer sk_a", "bearer sk_a", "BEARER sk_a", "bEaReR sk_a"] {
            assert_eq!(bearer_token(value), Some("sk_a"), "{value}");
        }
        for value in ["Basic sk_a", "Bearersk_a", "sk_a", "", "Bearer"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_a_wait() {
        let b = Buckets::new(1, 3);
        let key = ApiKeyId(uuid::Uuid::from_u128(1));
        assert_eq!((b.take(key), b.take(key), b.take(key)), (None, None, None));
        assert_eq!(b.take(key), Some(1));
        // Another key has its own bucket.
        assert_eq!(b.take(ApiKeyId(uuid::Uuid::from_u128(2))), None);
    }

    fn cached(n: u128, revoked: bool) -> CachedKey {
        CachedKey {
            id: ApiKeyId(uuid::Uuid::from_u128(n)),
            org_id: Some(OrgId(uuid::Uuid::from_u128(1000 + n))),
            scopes: vec![Scope::EventsWrite].into(),
            revoked,
        }
    }

    fn hash(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn the_key_cache_answers_what_was_read_until_the_epoch_moves() {
        let cache = KeyCache::new(100);
        assert_eq!(cache.get(0, &hash(1)), None);
        cache.insert(0, hash(1), cached(1, false));
        cache.insert(0, hash(2), cached(2, true));
        assert_eq!(cache.get(0, &hash(1)), Some(cached(1, false)));
        // A revoked key is cached as revoked (a revocation is final).
        assert_eq!(cache.get(0, &hash(2)), Some(cached(2, true)));
        assert_eq!(cache.get(0, &hash(3)), None);
        // A key was created or revoked: everything is read again.
        assert_eq!(cache.get(1, &hash(1)), None);
        assert!(cache.is_empty());
        cache.insert(1, hash(1), cached(1, true));
        assert_eq!(cache.get(1, &hash(1)), Some(cached(1, true)));
    }

    #[test]
    fn a_key_read_under_an_older_epoch_is_never_kept() {
        let cache = KeyCache::new(100);
        cache.insert(3, hash(1), cached(1, false));
        // A request that read the epoch before the change and the key (maybe not yet revoked)
        // before it too: its read is not kept, and it does not hide the newer entries.
        cache.insert(2, hash(2), cached(2, false));
        assert_eq!(cache.get(3, &hash(2)), None);
        assert_eq!(cache.get(2, &hash(1)), None, "a request of the older epoch reads the store");
        assert_eq!(cache.get(3, &hash(1)), Some(cached(1, false)));
        // An entry inserted under the current epoch is dropped as soon as a request sees a newer one.
        assert_eq!(cache.get(4, &hash(1)), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_key_cache_is_bounded_and_keeps_the_keys_in_use() {
        let cache = KeyCache::new(10);
        cache.insert(0, hash(0), cached(0, false));
        for n in 1..100u8 {
            cache.insert(0, hash(n), cached(u128::from(n), false));
            // Key 0 is used all along: it stays.
            assert_eq!(cache.get(0, &hash(0)), Some(cached(0, false)), "after {n}");
            assert!(cache.len() <= 10, "{} keys", cache.len());
        }
        assert_eq!(cache.get(0, &hash(1)), None, "an idle key was forgotten");
    }

    /// An engine over a store in memory, and a request's headers with a key; for the tests of
    /// this module and of [`super::extract`].
    pub(super) mod with_an_engine {
        use super::super::*;
        use axum::http::HeaderValue;
        use herald_engine::clock::SystemClock;
        use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
        use herald_engine::{Command, Engine, EngineConfig, Parts};
        use herald_log::MemStore;

        struct Accepting;

        impl Sender for Accepting {
            fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
                Box::pin(async {
                    SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None }
                })
            }
        }

        pub(in crate::auth) fn engine() -> Engine {
            let parts = Parts {
                store: Arc::new(MemStore::new()),
                clock: Arc::new(SystemClock),
                sender: Arc::new(Accepting),
            };
            Engine::open_with(EngineConfig::default(), parts).unwrap()
        }

        pub(in crate::auth) fn bearer(key: &str) -> HeaderMap {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {key}")).unwrap());
            headers
        }

        /// Revocation by an embedder (straight through the engine, not through this server's
        /// route) is refused on the very next request, although the key was cached.
        #[test]
        fn a_cached_key_revoked_through_the_engine_is_refused_on_the_next_request() {
            let engine = engine();
            let state = AppState::new(engine.clone(), &crate::config::Config::default());
            let org = OrgId(uuid::Uuid::now_v7());
            let (key, id) = (generate_key().unwrap(), ApiKeyId(uuid::Uuid::now_v7()));
            let create = Command::CreateApiKey {
                id,
                org_id: Some(org),
                scopes: vec![Scope::EventsWrite],
                name: "cached".into(),
                key_hash: key_hash(&key),
            };
            engine.execute_blocking(Actor::admin(), create).unwrap();
            let headers = bearer(&key);
            for _ in 0..3 {
                let who = authenticate(&state, &headers, Family::Named, Scope::EventsWrite).unwrap();
                assert_eq!((who.key_id, who.org_id), (id, Some(org)));
            }
            assert_eq!(state.keys.len(), 1, "the key is served from the cache");
            let err = authenticate(&state, &headers, Family::Named, Scope::DeliveriesRead).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN);
            // An unknown key is refused and not cached.
            let err =
                authenticate(&state, &bearer("sk_unknown_0123456789"), Family::Named, Scope::EventsWrite)
                    .unwrap_err();
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
            assert_eq!(state.keys.len(), 1);

            engine.execute_blocking(Actor::admin(), Command::RevokeApiKey { id }).unwrap();
            let err = authenticate(&state, &headers, Family::Named, Scope::EventsWrite).unwrap_err();
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
            // And it stays refused: a revoked key's hash finds nothing in the projection, so it
            // is not cached at all.
            let err = authenticate(&state, &headers, Family::Named, Scope::EventsWrite).unwrap_err();
            assert_eq!(err.status, StatusCode::UNAUTHORIZED);
            assert!(state.keys.is_empty());
            engine.shutdown();
        }
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
