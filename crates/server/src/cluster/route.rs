//! Which partition a request goes to: each route's class, and the decision for one request from
//! its key, query and body (pure functions; `front.rs` acts on them).

use herald_engine::OrgId;

use crate::util::parse_id;

/// The admin lists merged over the partitions, by how their pages are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `GET /v1/endpoints`: `{data, next_cursor}`, by id, newest first; cursor = the last id.
    Endpoints,
    /// `GET /v1/webhook_deliveries`: `{data, next_cursor}`, by (created_at, id), newest first;
    /// cursor = the last one's (created_at ms, id).
    Deliveries,
    /// `GET /api/v4/tasks/webhook_failures`: `{webhook_failures, next_cursor}`, as deliveries.
    Failures,
}

/// How a route finds its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// `/v1/api_keys*`: the control partition.
    Control,
    /// `/v1/audit/log?partition=N|control`.
    Audit,
    /// An admin key gives `org_id` in the JSON body.
    OrgBody,
    /// An admin key may give `org_id` in the query; without it, every partition's page merged.
    OrgList(ListKind),
    /// An object by id: an admin key's request is tried on each partition until one knows it.
    ById,
}

/// The class of a route of [`crate::ROUTES`], `None` for the routes this node answers itself
/// (health, readiness, metrics, the OpenAPI document).
pub fn class_of(method: &str, path: &str) -> Option<RouteClass> {
    use RouteClass::*;
    Some(match (method, path) {
        (_, p) if p.starts_with("/v1/api_keys") => Control,
        (_, "/v1/audit/log") => Audit,
        ("post", "/v1/endpoints" | "/v1/events" | "/v1/webhook_deliveries/recover") => OrgBody,
        ("get", "/v1/endpoints") => OrgList(ListKind::Endpoints),
        ("get", "/v1/webhook_deliveries") => OrgList(ListKind::Deliveries),
        ("get", "/api/v4/tasks/webhook_failures") => OrgList(ListKind::Failures),
        (_, p) if p.starts_with("/v1/") || p.starts_with("/api/") => ById,
        _ => return None,
    })
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This partition (numbered as `Placement::place` numbers them; control = `partitions`).
    One(u32),
    /// Each partition in turn until one answers other than 404.
    Each,
    /// Every partition's page, merged.
    Merge(ListKind),
    /// Refused before any partition: a 400 naming the field, with its message.
    Invalid(&'static str, String),
}

/// What the decision needs to know of the cluster.
pub struct Layout<'a> {
    pub partitions: u32,
    pub partition_of: &'a dyn Fn(&OrgId) -> u32,
}

impl Layout<'_> {
    fn control(&self) -> u32 {
        self.partitions
    }
}

/// The value of `name` in a query string (`a=1&b=2`), percent-decoding not needed for the
/// values looked at here (UUIDs, numbers, `control`).
pub fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The top-level `org_id` string of a JSON object body, if it has one.
pub fn body_org_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        org_id: Option<String>,
    }
    serde_json::from_slice::<Peek>(body).ok()?.org_id
}

/// The partition of an `org_id` text; one that is not a UUID goes to the control partition,
/// whose handler refuses it in its own words, as one node does.
fn org_partition(layout: &Layout<'_>, text: &str) -> u32 {
    match parse_id(text) {
        Some(id) => (layout.partition_of)(&OrgId(id)),
        None => layout.control(),
    }
}

/// Where a request of `class` goes, for a caller of `key_org` (`None`: a key of no
/// organisation; `admin_of_no_org` says whether it holds the admin scope).
pub fn target(
    layout: &Layout<'_>,
    class: RouteClass,
    key_org: Option<OrgId>,
    admin_of_no_org: bool,
    query: Option<&str>,
    body: &[u8],
) -> Target {
    match class {
        RouteClass::Control => Target::One(layout.control()),
        RouteClass::Audit => match (admin_of_no_org, query_value(query, "partition")) {
            (false, _) | (true, None | Some("control")) => Target::One(layout.control()),
            (true, Some(n)) => match n.parse::<u32>() {
                Ok(n) if n < layout.partitions => Target::One(n),
                _ => Target::Invalid(
                    "partition",
                    format!("must be control or 0 to {}, got {n:?}", layout.partitions.saturating_sub(1)),
                ),
            },
        },
        _ if key_org.is_some() => {
            Target::One(key_org.map_or(layout.control(), |o| (layout.partition_of)(&o)))
        }
        RouteClass::OrgBody => match body_org_id(body) {
            Some(text) => Target::One(org_partition(layout, &text)),
            None => Target::One(layout.control()),
        },
        RouteClass::OrgList(kind) => match query_value(query, "org_id") {
            Some(text) if !text.is_empty() => Target::One(org_partition(layout, text)),
            _ => Target::Merge(kind),
        },
        RouteClass::ById => Target::Each,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_class_and_the_node_routes_none() {
        for &(method, path) in crate::ROUTES {
            let class = class_of(method, path);
            let node_route = ["/healthz", "/readyz", "/metrics", "/openapi.json"].contains(&path);
            assert_eq!(class.is_none(), node_route, "{method} {path}");
        }
        assert_eq!(class_of("delete", "/v1/api_keys/{id}"), Some(RouteClass::Control));
        assert_eq!(class_of("patch", "/v1/endpoints/{id}"), Some(RouteClass::ById));
        assert_eq!(
            class_of("post", "/api/notifications/v1/admin/webhooks/{webhookId}/notifications/retrigger"),
            Some(RouteClass::ById)
        );
        assert_eq!(
            class_of("get", "/v1/webhook_deliveries"),
            Some(RouteClass::OrgList(ListKind::Deliveries))
        );
    }

    #[test]
    fn the_target_follows_the_key_then_the_org_id_given() {
        let of = |o: &OrgId| (o.0.as_u128() % 4) as u32;
        let layout = Layout { partitions: 4, partition_of: &of };
        let org = OrgId(uuid::Uuid::from_u128(6));
        let org_text = org.0.to_string();
        let body = format!(r#"{{"url":"x","org_id":"{org_text}"}}"#);
        // An organisation's key: its partition, whatever it gives.
        for class in [RouteClass::ById, RouteClass::OrgBody, RouteClass::OrgList(ListKind::Endpoints)] {
            assert_eq!(target(&layout, class, Some(org), false, None, b"{}"), Target::One(2));
        }
        // An admin key: the org_id given, in the body or the query.
        assert_eq!(target(&layout, RouteClass::OrgBody, None, true, None, body.as_bytes()), Target::One(2));
        assert_eq!(target(&layout, RouteClass::OrgBody, None, true, None, b"{\"url\":1}"), Target::One(4));
        assert_eq!(target(&layout, RouteClass::OrgBody, None, true, None, b"not json"), Target::One(4));
        let q = format!("limit=5&org_id={org_text}");
        let list = RouteClass::OrgList(ListKind::Endpoints);
        assert_eq!(target(&layout, list, None, true, Some(&q), b""), Target::One(2));
        assert_eq!(target(&layout, list, None, true, Some("org_id=nope"), b""), Target::One(4));
        assert_eq!(
            target(&layout, list, None, true, Some("limit=5"), b""),
            Target::Merge(ListKind::Endpoints)
        );
        assert_eq!(target(&layout, RouteClass::ById, None, true, None, b""), Target::Each);
        assert_eq!(target(&layout, RouteClass::Control, Some(org), false, None, b""), Target::One(4));
        // The audit log: the partition asked for, control when none.
        assert_eq!(target(&layout, RouteClass::Audit, None, true, Some("partition=3"), b""), Target::One(3));
        assert_eq!(target(&layout, RouteClass::Audit, None, true, Some("after=2"), b""), Target::One(4));
        assert_eq!(
            target(&layout, RouteClass::Audit, None, true, Some("partition=control"), b""),
            Target::One(4)
        );
        assert!(matches!(
            target(&layout, RouteClass::Audit, None, true, Some("partition=4"), b""),
            Target::Invalid("partition", _)
        ));
        // A key that may not read the audit log is refused by the control partition's handler.
        assert_eq!(
            target(&layout, RouteClass::Audit, Some(org), false, Some("partition=x"), b""),
            Target::One(4)
        );
    }
}
