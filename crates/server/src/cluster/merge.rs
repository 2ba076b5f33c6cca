//! An admin's list over every partition: each partition's page (asked with the client's own
//! query and cursor) merged newest first in the order each partition lists in, cut to the
//! page's size, with the cursor of the last item kept. Each partition lists "before the
//! cursor" in the same order, so the next page asked of each gives exactly what follows.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::route::ListKind;
use crate::util::{encode_cursor, parse_id, parse_ts};

/// One partition's page, its items kept as the bytes it wrote.
#[derive(Deserialize)]
struct Page {
    #[serde(alias = "webhook_failures")]
    data: Vec<Box<RawValue>>,
    next_cursor: Option<String>,
}

/// What orders an item: `id` and, for deliveries, `created_at`.
#[derive(Deserialize)]
struct Ordered {
    id: String,
    created_at: Option<String>,
}

/// An item's place in its list: (created_at ms or 0, id bytes); larger is newer.
type SortKey = (u64, [u8; 16]);

fn sort_key(kind: ListKind, item: &RawValue) -> Option<SortKey> {
    let o: Ordered = serde_json::from_str(item.get()).ok()?;
    let id = *parse_id(&o.id)?.as_bytes();
    match kind {
        ListKind::Endpoints => Some((0, id)),
        ListKind::Deliveries | ListKind::Failures => Some((parse_ts(o.created_at.as_deref()?)?, id)),
    }
}

fn cursor_of(kind: ListKind, key: &SortKey) -> String {
    match kind {
        ListKind::Endpoints => encode_cursor(&key.1),
        ListKind::Deliveries | ListKind::Failures => {
            let mut bytes = key.0.to_be_bytes().to_vec();
            bytes.extend_from_slice(&key.1);
            encode_cursor(&bytes)
        }
    }
}

/// A partition's `next_cursor` as a place in its list.
fn cursor_key(kind: ListKind, text: &str) -> Option<SortKey> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
    match kind {
        ListKind::Endpoints => Some((0, bytes.try_into().ok()?)),
        ListKind::Deliveries | ListKind::Failures => {
            let (at, id) = (bytes.get(..8)?, bytes.get(8..)?);
            Some((u64::from_be_bytes(at.try_into().ok()?), id.try_into().ok()?))
        }
    }
}

/// The merged page of `pages` (each a partition's 200 answer body), `limit` items at most, in
/// the list's JSON shape; `Err` names what could not be read.
///
/// A partition whose page stopped early (a filtered page spends a bounded scan) has looked only
/// down to its cursor: the merged page keeps nothing older than the newest such cursor (those
/// come again on the next page), and its cursor is never older than it, so no partition's
/// items are skipped nor listed twice.
pub fn merge(kind: ListKind, pages: &[bytes::Bytes], limit: usize) -> Result<Vec<u8>, String> {
    let mut items: Vec<(SortKey, Box<RawValue>)> = Vec::new();
    let mut floor: Option<SortKey> = None;
    for body in pages {
        let page: Page = serde_json::from_slice(body).map_err(|e| format!("a partition's page: {e}"))?;
        if let Some(next) = page.next_cursor.as_deref() {
            let key = cursor_key(kind, next).ok_or("a partition's next_cursor is not one of its list")?;
            floor = floor.max(Some(key));
        }
        for item in page.data {
            let key = sort_key(kind, &item).ok_or("a partition's item has no id or created_at")?;
            items.push((key, item));
        }
    }
    items.retain(|(key, _)| floor.is_none_or(|floor| *key >= floor));
    items.sort_by_key(|(key, _)| std::cmp::Reverse(*key));
    let cut = items.len() > limit;
    items.truncate(limit);
    let next_cursor = match (cut, items.last(), floor) {
        (true, Some((key, _)), _) => Some(cursor_of(kind, key)),
        (_, _, Some(floor)) => Some(cursor_of(kind, &floor)),
        _ => None,
    };
    let list = match kind {
        ListKind::Failures => "webhook_failures",
        ListKind::Endpoints | ListKind::Deliveries => "data",
    };
    // Written by hand so each item keeps the bytes (and key order) its partition wrote.
    let mut out = format!("{{\"{list}\":[").into_bytes();
    for (n, (_, item)) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.get().as_bytes());
    }
    out.extend_from_slice(b"],\"next_cursor\":");
    serde_json::to_writer(&mut out, &next_cursor).map_err(|e| e.to_string())?;
    out.push(b'}');
    Ok(out)
}

/// The page size a list query asks for (the handlers checked it already: 1..=250, default 50).
pub fn limit_of(query: Option<&str>) -> usize {
    super::route::query_value(query, "limit").and_then(|l| l.parse().ok()).unwrap_or(50)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(n: u128) -> String {
        format!(r#"{{"id":"{}","name":"e{n}"}}"#, uuid::Uuid::from_u128(n))
    }

    fn page(items: &[String], next: Option<&str>) -> bytes::Bytes {
        let next = next.map_or("null".to_owned(), |n| format!("\"{n}\""));
        format!(r#"{{"data":[{}],"next_cursor":{next}}}"#, items.join(",")).into()
    }

    #[test]
    fn pages_merge_newest_first_with_the_last_ones_cursor() {
        let a = page(&[endpoint(9), endpoint(5), endpoint(2)], None);
        let seven = encode_cursor(uuid::Uuid::from_u128(7).as_bytes());
        let b = page(&[endpoint(8), endpoint(7)], Some(&seven));
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Endpoints, &[a.clone(), b], 3).unwrap()).unwrap();
        let names: Vec<&str> =
            merged["data"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["e9", "e8", "e7"]);
        assert_eq!(merged["next_cursor"], encode_cursor(uuid::Uuid::from_u128(7).as_bytes()));
        // Everything fits and no partition has more: no cursor.
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Endpoints, &[a], 3).unwrap()).unwrap();
        assert_eq!(merged["next_cursor"], serde_json::Value::Null);
    }

    #[test]
    fn deliveries_merge_by_created_at_then_id_and_keep_their_cursor_form() {
        let d = |n: u128, at: &str| format!(r#"{{"id":"{}","created_at":"{at}"}}"#, uuid::Uuid::from_u128(n));
        // A larger id created earlier sorts after.
        let a = page(&[d(1, "2026-01-01T00:00:02.000Z")], None);
        let b = page(&[d(9, "2026-01-01T00:00:01.000Z")], None);
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Deliveries, &[b, a], 1).unwrap()).unwrap();
        assert_eq!(merged["data"][0]["id"], uuid::Uuid::from_u128(1).to_string());
        let mut cursor = parse_ts("2026-01-01T00:00:02.000Z").unwrap().to_be_bytes().to_vec();
        cursor.extend_from_slice(uuid::Uuid::from_u128(1).as_bytes());
        assert_eq!(merged["next_cursor"], encode_cursor(&cursor));
        // A partition that stopped its scan early (no items, a cursor): nothing older than
        // where it stopped is listed yet, and the cursor goes on from there.
        let at = |t: &str| parse_ts(t).unwrap().to_be_bytes().to_vec();
        let mut stopped = at("2026-01-01T00:00:05.000Z");
        stopped.extend_from_slice(uuid::Uuid::from_u128(50).as_bytes());
        let early =
            bytes::Bytes::from(format!(r#"{{"data":[],"next_cursor":"{}"}}"#, encode_cursor(&stopped)));
        let full = page(&[d(60, "2026-01-01T00:00:06.000Z"), d(2, "2026-01-01T00:00:02.000Z")], None);
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Deliveries, &[early.clone(), full], 5).unwrap()).unwrap();
        let ids: Vec<&str> =
            merged["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [uuid::Uuid::from_u128(60).to_string()], "the older one waits for the next page");
        assert_eq!(merged["next_cursor"], encode_cursor(&stopped));
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Deliveries, &[early], 5).unwrap()).unwrap();
        assert_eq!(merged["next_cursor"], encode_cursor(&stopped), "an empty page still goes on");
        // Failures keep their own list name.
        let f = bytes::Bytes::from(format!(
            r#"{{"webhook_failures":[{}],"next_cursor":null}}"#,
            d(3, "2026-01-01T00:00:00Z")
        ));
        let merged: serde_json::Value =
            serde_json::from_slice(&merge(ListKind::Failures, &[f], 5).unwrap()).unwrap();
        assert_eq!(merged["webhook_failures"].as_array().unwrap().len(), 1);
    }
}
