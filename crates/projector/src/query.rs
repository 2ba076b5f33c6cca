//! Reads over the projection for the engine. Every list is a page: its cost grows with the page,
//! not with the store.

use crate::codec;
use crate::delivery_settings::DeliverySettings;
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId};
use crate::index;
use crate::keys;
use crate::model::{
    ApiKey, AttemptRecord, Delivery, DeliveryStatus, Endpoint, EventRecord, IdempotencyHit,
    IDEMPOTENCY_WINDOW_MS,
};
use crate::policy::Policy;
use crate::tables::ReadTables;
use serde::de::DeserializeOwned;

/// The largest page any list returns, whatever limit it is asked for.
pub const PAGE_LEN_MAX: usize = 1_000;

/// A stored value (or key) that does not decode: the projection is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptValue {
    pub key: Vec<u8>,
}

impl std::fmt::Display for CorruptValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "corrupt projection value at key {:02x?}", self.key)
    }
}

impl std::error::Error for CorruptValue {}

/// A page of a list, and where the next one starts (`None`: this was the last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

fn read<V: DeserializeOwned>(t: &impl ReadTables, key: &[u8]) -> Result<Option<V>, CorruptValue> {
    match t.get(key) {
        None => Ok(None),
        Some(bytes) => codec::from_bytes(&bytes).map(Some).ok_or_else(|| CorruptValue { key: key.to_vec() }),
    }
}

/// The seq of the last event applied; 0 when none has been.
pub fn applied_seq(t: &impl ReadTables) -> Result<u64, CorruptValue> {
    match t.get(keys::META_APPLIED_SEQ) {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| CorruptValue { key: keys::META_APPLIED_SEQ.to_vec() }),
    }
}

/// The fold's rules version in force: the last `RulesAdopted`'s, or 1 before any.
pub fn rules(t: &impl ReadTables) -> Result<u32, CorruptValue> {
    match t.get(keys::META_RULES) {
        None => Ok(1),
        Some(bytes) => <[u8; 4]>::try_from(bytes.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| CorruptValue { key: keys::META_RULES.to_vec() }),
    }
}

/// The policy in force: the last `PolicySet`'s, or [`Policy::default`] before any.
pub fn policy(t: &impl ReadTables) -> Result<Policy, CorruptValue> {
    Ok(read(t, keys::META_POLICY)?.unwrap_or_default())
}

pub fn get_delivery(t: &impl ReadTables, id: DeliveryId) -> Result<Option<Delivery>, CorruptValue> {
    read(t, &keys::delivery(id))
}

/// The endpoint, deleted or not (see [`Endpoint::is_deleted`]).
pub fn get_endpoint(t: &impl ReadTables, id: EndpointId) -> Result<Option<Endpoint>, CorruptValue> {
    read(t, &keys::endpoint(id))
}

/// The endpoint's delivery settings: the default when none were ever set.
pub fn get_endpoint_settings(t: &impl ReadTables, id: EndpointId) -> Result<DeliverySettings, CorruptValue> {
    Ok(read(t, &keys::endpoint_settings(id))?.unwrap_or_default())
}

pub fn get_event(t: &impl ReadTables, id: EventId) -> Result<Option<EventRecord>, CorruptValue> {
    read(t, &keys::event(id))
}

pub fn get_api_key(t: &impl ReadTables, id: ApiKeyId) -> Result<Option<ApiKey>, CorruptValue> {
    read(t, &keys::api_key(id))
}

/// The unrevoked key with this hash (a revoked key's hash finds nothing).
pub fn get_api_key_by_hash(t: &impl ReadTables, hash: &[u8; 32]) -> Result<Option<ApiKey>, CorruptValue> {
    let key = keys::api_key_by_hash(hash);
    let Some(id) = t.get(&key) else {
        return Ok(None);
    };
    let id = <[u8; 16]>::try_from(id.as_slice()).map_err(|_| CorruptValue { key })?;
    get_api_key(t, ApiKeyId::from_bytes(id))
}

/// The organisation's default secret, which signs its inline deliveries.
pub fn org_secret(t: &impl ReadTables, org_id: OrgId) -> Result<Option<String>, CorruptValue> {
    read(t, &keys::org_secret(org_id))
}

/// What `idempotency_key` answered first in the organisation, if that was less than
/// [`IDEMPOTENCY_WINDOW_MS`] before `now_ms`.
pub fn idempotency_lookup(
    t: &impl ReadTables,
    org_id: OrgId,
    idempotency_key: &str,
    now_ms: u64,
) -> Result<Option<IdempotencyHit>, CorruptValue> {
    let hit: Option<IdempotencyHit> = read(t, &keys::idempotency(org_id, idempotency_key))?;
    Ok(hit.filter(|hit| now_ms.saturating_sub(hit.at_ms) < IDEMPOTENCY_WINDOW_MS))
}

/// Keys of `[from, to)` in pages, decoding each with `item`: `limit` items (at most
/// [`PAGE_LEN_MAX`]) and the key to resume after when there may be more.
fn page<T>(
    t: &impl ReadTables,
    from: &[u8],
    to: &[u8],
    limit: usize,
    item: impl FnMut(&[u8], &[u8]) -> Result<T, CorruptValue>,
) -> Result<(Vec<T>, Option<Vec<u8>>), CorruptValue> {
    let limit = limit.min(PAGE_LEN_MAX);
    page_of(t.scan(from, to, limit.saturating_add(1)), limit, item)
}

/// Like [`page`], walking down from `to` (exclusive) to `from`.
fn page_rev<T>(
    t: &impl ReadTables,
    from: &[u8],
    to: &[u8],
    limit: usize,
    item: impl FnMut(&[u8], &[u8]) -> Result<T, CorruptValue>,
) -> Result<(Vec<T>, Option<Vec<u8>>), CorruptValue> {
    let limit = limit.min(PAGE_LEN_MAX);
    page_of(t.scan_rev(from, to, limit.saturating_add(1)), limit, item)
}

/// The first `limit` of `pairs` (read one beyond it), decoded, and the key to go on after.
fn page_of<T>(
    mut pairs: Vec<(Vec<u8>, Vec<u8>)>,
    limit: usize,
    mut item: impl FnMut(&[u8], &[u8]) -> Result<T, CorruptValue>,
) -> Result<(Vec<T>, Option<Vec<u8>>), CorruptValue> {
    let more = pairs.len() > limit;
    pairs.truncate(limit);
    let last = pairs.last().map(|(k, _)| k.clone()).filter(|_| more);
    let items = pairs.iter().map(|(k, v)| item(k, v)).collect::<Result<Vec<T>, CorruptValue>>()?;
    Ok((items, last))
}

fn decode_value<V: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<V, CorruptValue> {
    codec::from_bytes(value).ok_or_else(|| CorruptValue { key: key.to_vec() })
}

fn end_of(prefix: &[u8]) -> Vec<u8> {
    keys::prefix_end(prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1])
}

/// Every API key (revoked ones too), by id.
pub fn list_api_keys(
    t: &impl ReadTables,
    after: Option<ApiKeyId>,
    limit: usize,
) -> Result<Page<ApiKey, ApiKeyId>, CorruptValue> {
    let prefix = [keys::KS_API_KEY];
    let from = match after {
        Some(id) => keys::successor(&keys::api_key(id)),
        None => prefix.to_vec(),
    };
    let (items, last) = page(t, &from, &end_of(&prefix), limit, decode_value::<ApiKey>)?;
    Ok(Page { next: last.and(items.last().map(|k| k.id)), items })
}

/// The organisation's endpoints that are not deleted, by id (so by creation time: ids are v7).
pub fn list_endpoints(
    t: &impl ReadTables,
    org_id: OrgId,
    after: Option<EndpointId>,
    limit: usize,
) -> Result<Page<Endpoint, EndpointId>, CorruptValue> {
    let prefix = keys::key(keys::KS_ENDPOINT_BY_ORG, &[org_id.as_bytes()]);
    let from = match after {
        Some(id) => keys::successor(&keys::endpoint_by_org(org_id, id)),
        None => prefix.clone(),
    };
    let (items, last) = page(t, &from, &end_of(&prefix), limit, |key, _| {
        let id = keys::trailing_id(key).ok_or_else(|| CorruptValue { key: key.to_vec() })?;
        get_endpoint(t, EndpointId::from_bytes(id))?.ok_or_else(|| CorruptValue { key: key.to_vec() })
    })?;
    Ok(Page { next: last.and(items.last().map(|e| e.id)), items })
}

/// The organisation's endpoints that are not deleted, newest first, before `before` (the last
/// one of the previous page).
pub fn list_endpoints_rev(
    t: &impl ReadTables,
    org_id: OrgId,
    before: Option<EndpointId>,
    limit: usize,
) -> Result<Page<Endpoint, EndpointId>, CorruptValue> {
    let prefix = keys::key(keys::KS_ENDPOINT_BY_ORG, &[org_id.as_bytes()]);
    let to = match before {
        Some(id) => keys::endpoint_by_org(org_id, id),
        None => end_of(&prefix),
    };
    let (items, last) = page_rev(t, &prefix, &to, limit, |key, _| {
        let id = keys::trailing_id(key).ok_or_else(|| CorruptValue { key: key.to_vec() })?;
        get_endpoint(t, EndpointId::from_bytes(id))?.ok_or_else(|| CorruptValue { key: key.to_vec() })
    })?;
    Ok(Page { next: last.and(items.last().map(|e| e.id)), items })
}

/// Every endpoint that is not deleted, of every organisation, newest first (by id), before
/// `before` (the last one of the previous page): an admin's list.
pub fn list_all_endpoints_rev(
    t: &impl ReadTables,
    before: Option<EndpointId>,
    limit: usize,
) -> Result<Page<Endpoint, EndpointId>, CorruptValue> {
    let limit = limit.min(PAGE_LEN_MAX);
    let from = [keys::KS_ENDPOINT];
    let mut to = match before {
        Some(id) => keys::endpoint(id),
        None => end_of(&from),
    };
    let mut items = Vec::new();
    // Deleted endpoints are skipped, so a page may take more than one read.
    loop {
        let pairs = t.scan_rev(&from, &to, limit.saturating_add(1));
        let exhausted = pairs.len() <= limit;
        for (key, value) in &pairs {
            let endpoint: Endpoint = decode_value(key, value)?;
            if endpoint.deleted_at_ms.is_none() {
                items.push(endpoint);
            }
        }
        match pairs.last() {
            Some((key, _)) if !exhausted && items.len() <= limit => to = key.clone(),
            _ => break,
        }
    }
    let more = items.len() > limit;
    items.truncate(limit);
    Ok(Page { next: items.last().map(|e| e.id).filter(|_| more), items })
}

/// The organisations that have deliveries, in id order: the first `max` of them, and one more if
/// there are more (so a caller can tell). Each costs one seek in the organisation index.
pub fn delivery_orgs(t: &impl ReadTables, max: usize) -> Result<Vec<OrgId>, CorruptValue> {
    let to = [keys::KS_CHUNKS_BY_ORG_STATUS + 1];
    let mut from = vec![keys::KS_CHUNKS_BY_ORG_STATUS];
    let mut orgs = Vec::new();
    while orgs.len() <= max {
        let Some((key, _)) = t.scan(&from, &to, 1).into_iter().next() else { break };
        let org: [u8; 16] = key
            .get(1..17)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| CorruptValue { key: key.clone() })?;
        orgs.push(OrgId::from_bytes(org));
        // Past every key of this organisation: its status byte is never 0xFF.
        from = keys::key(keys::KS_CHUNKS_BY_ORG_STATUS, &[&org, &[0xFF]]);
    }
    Ok(orgs)
}

/// Which delivery index a list walks. Each walks in creation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryIndex {
    Org(OrgId),
    /// The failures lists walk `OrgStatus(org, Inactive)` and `OrgStatus(org, Exhausted)`.
    OrgStatus(OrgId, DeliveryStatus),
    Endpoint(EndpointId),
    EndpointStatus(EndpointId, DeliveryStatus),
    OrgEventType(OrgId, String),
    /// Several indexes walked as one list (an admin's list over organisations, the failures
    /// list over its statuses).
    Union(Vec<DeliveryIndex>),
}

impl DeliveryIndex {
    /// The key prefixes of the index's parts, each walked in creation order. An organisation's
    /// or an endpoint's whole list has no keys of its own: it is its four status partitions,
    /// merged (two index keys fewer written per delivery).
    fn prefixes(&self) -> Vec<Vec<u8>> {
        let org_status = |org: &OrgId, status: DeliveryStatus| {
            keys::key(keys::KS_DELIVERY_BY_ORG_STATUS, &[org.as_bytes(), &[keys::status_byte(status)]])
        };
        let endpoint_status = |endpoint: &EndpointId, status: DeliveryStatus| {
            keys::key(
                keys::KS_DELIVERY_BY_ENDPOINT_STATUS,
                &[endpoint.as_bytes(), &[keys::status_byte(status)]],
            )
        };
        match self {
            DeliveryIndex::Org(org) => DeliveryStatus::ALL.iter().map(|s| org_status(org, *s)).collect(),
            DeliveryIndex::OrgStatus(org, status) => vec![org_status(org, *status)],
            DeliveryIndex::Endpoint(endpoint) => {
                DeliveryStatus::ALL.iter().map(|s| endpoint_status(endpoint, *s)).collect()
            }
            DeliveryIndex::EndpointStatus(endpoint, status) => vec![endpoint_status(endpoint, *status)],
            DeliveryIndex::OrgEventType(org, event_type) => vec![keys::org_type_prefix(*org, event_type)],
            DeliveryIndex::Union(parts) => parts.iter().flat_map(DeliveryIndex::prefixes).collect(),
        }
    }
}

/// A delivery list: an index and a creation-time range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryQuery {
    pub index: DeliveryIndex,
    /// Inclusive.
    pub created_from_ms: Option<u64>,
    /// Exclusive.
    pub created_before_ms: Option<u64>,
}

impl DeliveryQuery {
    /// The whole index.
    pub fn all(index: DeliveryIndex) -> Self {
        DeliveryQuery { index, created_from_ms: None, created_before_ms: None }
    }
}

/// Where a delivery list resumes: after this delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryCursor {
    pub created_at_ms: u64,
    pub id: DeliveryId,
}

/// A page of deliveries in creation order (then id order), after `after`.
pub fn list_deliveries(
    t: &impl ReadTables,
    query: &DeliveryQuery,
    after: Option<DeliveryCursor>,
    limit: usize,
) -> Result<Page<Delivery, DeliveryCursor>, CorruptValue> {
    deliveries_page(t, query, after, limit, Direction::Forward)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Oldest first, after the cursor.
    Forward,
    /// Newest first, before the cursor.
    Backward,
}

/// A page of the list: the first `limit` entries of every part of the index (one beyond, to know
/// whether there is more), merged in list order, and only those read.
fn deliveries_page(
    t: &impl ReadTables,
    query: &DeliveryQuery,
    cursor: Option<DeliveryCursor>,
    limit: usize,
    direction: Direction,
) -> Result<Page<Delivery, DeliveryCursor>, CorruptValue> {
    let limit = limit.min(PAGE_LEN_MAX);
    let mut entries: Vec<(u64, [u8; 16])> = Vec::new();
    for prefix in query.index.prefixes() {
        let mut from = prefix.clone();
        if let Some(from_ms) = query.created_from_ms {
            from.extend_from_slice(&from_ms.to_be_bytes());
        }
        let mut to = match query.created_before_ms {
            Some(before_ms) => [&prefix[..], &before_ms.to_be_bytes()].concat(),
            None => end_of(&prefix),
        };
        let at = |c: DeliveryCursor| keys::timed(&prefix, c.created_at_ms, c.id);
        let walk = match direction {
            Direction::Forward => {
                if let Some(c) = cursor {
                    from = from.max(keys::successor(&at(c)));
                }
                index::Walk::Forward
            }
            Direction::Backward => {
                if let Some(c) = cursor {
                    to = to.min(at(c));
                }
                index::Walk::Backward
            }
        };
        for key in index::scan(t, &prefix, &from, &to, limit.saturating_add(1), walk)? {
            let (at_ms, id) = keys::parse_timed(&key).ok_or_else(|| CorruptValue { key: key.clone() })?;
            entries.push((at_ms, *id.as_bytes()));
        }
    }
    // Byte order of the keys' (created_at, id) tail: the order every part is walked in.
    entries.sort_unstable();
    // A delivery met in two parts (parts that overlap, or a status that changed between two
    // reads when the caller does not read through `Engine::consistent_read`) is listed once;
    // its row is read below.
    entries.dedup();
    if direction == Direction::Backward {
        entries.reverse();
    }
    let more = entries.len() > limit;
    entries.truncate(limit);
    let items = entries
        .into_iter()
        .map(|(_, id)| {
            let id = DeliveryId::from_bytes(id);
            get_delivery(t, id)?.ok_or_else(|| CorruptValue { key: keys::delivery(id) })
        })
        .collect::<Result<Vec<_>, CorruptValue>>()?;
    Ok(Page {
        next: items
            .last()
            .filter(|_| more)
            .map(|d| DeliveryCursor { created_at_ms: d.created_at_ms, id: d.id }),
        items,
    })
}

/// How many deliveries are in each status (pending, delivered, exhausted, inactive).
pub fn delivery_counts(t: &impl ReadTables) -> Result<Vec<(DeliveryStatus, u64)>, CorruptValue> {
    [DeliveryStatus::Pending, DeliveryStatus::Delivered, DeliveryStatus::Exhausted, DeliveryStatus::Inactive]
        .into_iter()
        .map(|status| {
            let key = keys::count(status);
            match t.get(&key) {
                None => Ok((status, 0)),
                Some(v) => <[u8; 8]>::try_from(v.as_slice())
                    .map(|b| (status, u64::from_be_bytes(b)))
                    .map_err(|_| CorruptValue { key }),
            }
        })
        .collect()
}

/// An entry of the due queue: a pending delivery and when its next attempt is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Due {
    pub next_attempt_at_ms: u64,
    pub delivery_id: DeliveryId,
}

/// Up to `limit` (at most [`PAGE_LEN_MAX`]) pending deliveries due at or before `until_ms`,
/// soonest first, after `after` (pass the last one of the previous page to go on).
pub fn due_deliveries(
    t: &impl ReadTables,
    after: Option<Due>,
    until_ms: u64,
    limit: usize,
) -> Result<Vec<Due>, CorruptValue> {
    let from = match after {
        Some(due) => keys::successor(&keys::due(due.next_attempt_at_ms, due.delivery_id)),
        None => vec![keys::KS_DUE],
    };
    let to = match until_ms.checked_add(1) {
        Some(end_ms) => keys::key(keys::KS_DUE, &[&end_ms.to_be_bytes()]),
        None => vec![keys::KS_DUE + 1],
    };
    let limit = limit.min(PAGE_LEN_MAX);
    index::scan(t, &[keys::KS_DUE], &from, &to, limit, index::Walk::Forward)?
        .into_iter()
        .map(|key| {
            let (at_ms, id) = keys::parse_timed(&key).ok_or(CorruptValue { key })?;
            Ok(Due { next_attempt_at_ms: at_ms, delivery_id: id })
        })
        .collect()
}

/// Up to `limit` (at most [`PAGE_LEN_MAX`]) attempts of the delivery, oldest first, numbered
/// after `after_attempt` (0 for the first page).
pub fn attempts(
    t: &impl ReadTables,
    delivery_id: DeliveryId,
    after_attempt: u32,
    limit: usize,
) -> Result<Vec<AttemptRecord>, CorruptValue> {
    let prefix = keys::key(keys::KS_ATTEMPT, &[delivery_id.as_bytes()]);
    let from = keys::successor(&keys::attempt(delivery_id, after_attempt));
    let (items, _) = page(t, &from, &end_of(&prefix), limit, decode_value::<AttemptRecord>)?;
    Ok(items)
}

/// A page of deliveries newest first (creation time, then id, descending), before `before`.
pub fn list_deliveries_rev(
    t: &impl ReadTables,
    query: &DeliveryQuery,
    before: Option<DeliveryCursor>,
    limit: usize,
) -> Result<Page<Delivery, DeliveryCursor>, CorruptValue> {
    deliveries_page(t, query, before, limit, Direction::Backward)
}
