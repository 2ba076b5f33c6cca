//! Security end to end, against the real binary: organisation isolation on every route, scopes,
//! 401s, key revocation, bad input that writes nothing, body limits, path ids, the per-key rate
//! limit, hostile requests that must not reach a 5xx, and the guard against private targets.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Receiver, Server, ADMIN_KEY, ORG_SCOPES};
use herald_server::ROUTES;
use serde_json::{json, Value};

/// The error shape of a route family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `{"name", "error", "status"}`.
    Named,
    /// `{"error"}` (seeds 000 and 001).
    Plain,
}

fn family(path: &str) -> Family {
    if path.starts_with("/api/webhooks/") || path.starts_with("/api/v4/") {
        Family::Plain
    } else {
        Family::Named
    }
}

/// The scope a route needs; `None` for the open operational routes.
fn scope_of(method: &str, path: &str) -> Option<&'static str> {
    Some(match (method, path) {
        ("get", "/healthz" | "/readyz" | "/metrics" | "/openapi.json") => return None,
        ("post", "/v1/endpoints") => "endpoints.write",
        ("get", p) if p.starts_with("/v1/endpoints") => "endpoints.read",
        (_, p) if p.starts_with("/v1/endpoints") => "endpoints.write",
        ("post", "/v1/events") => "events.write",
        ("get", "/v1/events/{id}") => "deliveries.read",
        ("get", p) if p.starts_with("/v1/webhook_deliveries") => "deliveries.read",
        ("post", "/v1/webhook_deliveries/{id}/redeliver" | "/v1/webhook_deliveries/recover") => {
            "deliveries.write"
        }
        ("get", "/v1/recoveries/{id}") => "deliveries.read",
        (_, p) if p.starts_with("/v1/api_keys") || p.starts_with("/v1/audit") => "admin",
        ("post", "/api/webhooks/v1/failures/{id}/retrigger") => "deliveries.write",
        ("get", p) if p.starts_with("/api/v4/tasks/webhook_failures") => "tasks.webhooks.read",
        ("post", p) if p.starts_with("/api/notifications/v1/admin/") => "admin",
        other => panic!("a route this test does not know: {other:?}; add it to every table here"),
    })
}

/// The route's path with every `{param}` replaced by `id`.
fn fill(path: &str, id: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') && seg.ends_with('}') { id } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

fn random_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn simple(id: &str) -> String {
    id.replace('-', "")
}

/// An answer: status, headers (lowercase names) and body bytes.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as it is over a fresh connection and reads the whole answer.
fn send_bytes(port: u16, request: &[u8]) -> Result<Resp, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    stream.write_all(request).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&rest[end + 2..end + 2 + n]);
            rest.drain(..end + 2 + n + 2);
        }
        rest = body;
    }
    Ok(Resp { status, headers, body: rest })
}

/// A request with an optional bearer key, body and extra headers.
fn send(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req =
        format!("{} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n", method.to_uppercase())
            .into_bytes();
    if let Some(k) = key {
        req.extend_from_slice(format!("authorization: Bearer {k}\r\n").as_bytes());
    }
    let body = body.unwrap_or(b"");
    req.extend_from_slice(
        format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()).as_bytes(),
    );
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    send_bytes(server.port, &req).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn send_json(server: &Server, method: &str, path: &str, key: &str, body: &Value) -> Resp {
    send(server, method, path, Some(key), Some(body.to_string().as_bytes()), &[])
}

/// The audit log's length and last seq, once it holds every record the projection has folded (the
/// audit log shows durable records only, and a batch is folded before its flush ends).
fn audit(server: &Server) -> (usize, u64) {
    server.wait_durable();
    audit_once(server)
}

fn audit_once(server: &Server) -> (usize, u64) {
    let r = send(server, "GET", "/v1/audit/log?after=0&limit=10000", Some(ADMIN_KEY), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/x-ndjson")));
    let text = r.text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines
        .last()
        .map(|l| serde_json::from_str::<Value>(l).expect("an NDJSON line")["seq"].as_u64().expect("a seq"))
        .unwrap_or(0);
    (lines.len(), last)
}

/// Checks an error body's shape for its family and status.
fn assert_error_shape(family: Family, status: u16, r: &Resp, context: &str) {
    assert_eq!(r.status, status, "{context}: {}", r.text());
    assert!(
        r.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "{context}: content-type {:?}",
        r.header("content-type")
    );
    let body = r.json();
    let obj = body.as_object().unwrap_or_else(|| panic!("{context}: not a JSON object: {}", r.text()));
    assert!(obj.get("error").is_some_and(Value::is_string), "{context}: {body}");
    match family {
        Family::Named => {
            assert_eq!(obj.len(), 3, "{context}: {body}");
            assert!(obj.get("name").is_some_and(Value::is_string), "{context}: {body}");
            assert_eq!(
                obj.get("status").and_then(Value::as_u64),
                Some(u64::from(status)),
                "{context}: {body}"
            );
        }
        Family::Plain => assert_eq!(obj.len(), 1, "{context}: {body}"),
    }
}

fn key_with(server: &Server, org: &str, scopes: &[&str]) -> String {
    server.key_for(org, scopes)
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v["id"].as_str().expect("an id").to_owned())
        .collect()
}

// ------------------------------------------------------------------------------------------------
// 1. Organisation isolation
// ------------------------------------------------------------------------------------------------

/// What org A sees of its own objects, to compare before and after org B's attempts.
fn snapshot(server: &Server, a: &str, paths: &[String]) -> Vec<(String, Value)> {
    paths
        .iter()
        .map(|p| {
            let r = send(server, "GET", p, Some(a), None, &[]);
            assert_eq!(r.status, 200, "A reading its own {p}: {}", r.text());
            (p.clone(), r.json())
        })
        .collect()
}

#[test]
fn organisations_are_isolated_on_every_route() {
    let server = Server::start();
    let ok_rx = Receiver::start();
    let bad_rx = Receiver::start();
    bad_rx.set_status(500);
    let (org_a, a) = server.org_key(ORG_SCOPES);
    let (org_b, b) = server.org_key(ORG_SCOPES);
    let b_admin = key_with(&server, &org_b, &["admin"]);

    // A: an endpoint whose deliveries succeed, one whose deliveries fail (a failure), events.
    let ep_ok = server.endpoint(&a, &ok_rx.url("/a"), &["a.ok"])["id"].as_str().unwrap().to_owned();
    let ep_bad = server.endpoint(&a, &bad_rx.url("/a"), &["a.bad"])["id"].as_str().unwrap().to_owned();
    let ev_ok = server.publish(&a, "a.ok", json!({"n": 1}));
    let ev_bad = server.publish(&a, "a.bad", json!({"n": 2}));
    let (ev_ok_id, ev_bad_id) = (ev_ok["id"].as_str().unwrap(), ev_bad["id"].as_str().unwrap());
    let d_ok = ev_ok["delivery_ids"][0].as_str().unwrap().to_owned();
    let d_bad = ev_bad["delivery_ids"][0].as_str().unwrap().to_owned();
    server.wait_status(&a, &d_ok, "delivered");
    server.wait_status(&a, &d_bad, "exhausted");
    // A recovery of A's, which redelivers its delivered delivery once more.
    let (status, recovered) = server.call(
        "POST",
        "/v1/webhook_deliveries/recover",
        Some(&a),
        Some(json!({"status": ["delivered"], "endpoint_id": ep_ok})),
    );
    assert_eq!((status, recovered["queued"].as_u64()), (200, Some(1)), "{recovered}");
    let recovery = recovered["recovery_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + common::WAIT_MAX;
    loop {
        let (_, d) = server.call("GET", &format!("/v1/webhook_deliveries/{d_ok}"), Some(&a), None);
        if d["status"] == "delivered" && d["attempt_count"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the recovered delivery was not delivered again: {d}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // B: an endpoint of its own, so lists and the batch have something of B's.
    let ep_b = server.endpoint(&b, &ok_rx.url("/b"), &["b.x"])["id"].as_str().unwrap().to_owned();
    let a_key_id = {
        let (s, keys) = server.call("GET", "/v1/api_keys?limit=250", Some(ADMIN_KEY), None);
        assert_eq!(s, 200, "{keys}");
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["org_id"] == org_a.as_str())
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .expect("A's key is listed")
    };

    let watched: Vec<String> = vec![
        format!("/v1/endpoints/{ep_ok}"),
        format!("/v1/endpoints/{ep_bad}"),
        "/v1/endpoints".into(),
        format!("/v1/events/{ev_ok_id}"),
        format!("/v1/events/{ev_bad_id}"),
        format!("/v1/webhook_deliveries/{d_ok}"),
        format!("/v1/webhook_deliveries/{d_bad}"),
        format!("/v1/webhook_deliveries/{d_ok}/attempts"),
        format!("/v1/webhook_deliveries/{d_bad}/attempts"),
        "/v1/webhook_deliveries".into(),
        format!("/api/v4/tasks/webhook_failures/{d_bad}"),
        "/api/v4/tasks/webhook_failures".into(),
    ];
    let before = snapshot(&server, &a, &watched);
    let audit_before = audit(&server);

    // Every route that takes an id, with A's object of the right kind.
    let object_of = |path: &str| -> &str {
        match path {
            p if p.starts_with("/v1/endpoints/") => &ep_bad,
            "/v1/events/{id}" => ev_bad_id,
            p if p.starts_with("/v1/webhook_deliveries/{id}/redeliver") => &d_ok,
            p if p.starts_with("/v1/webhook_deliveries/") => &d_bad,
            p if p.starts_with("/api/webhooks/v1/failures/") => &d_bad,
            p if p.starts_with("/api/v4/tasks/webhook_failures/") => &d_bad,
            p if p.starts_with("/api/notifications/") => &ep_bad,
            p if p.starts_with("/v1/api_keys/") => &a_key_id,
            "/v1/recoveries/{id}" => &recovery,
            other => panic!("no object of A for {other}"),
        }
    };
    let body_of = |method: &str, path: &str| -> Option<Value> {
        match (method, path) {
            ("patch", _) => Some(json!({"name": "taken over", "url": "https://example.com/b"})),
            (_, p) if p.ends_with("/secret/rotate") => Some(json!({})),
            (_, p) if p.starts_with("/api/notifications/") => {
                Some(json!({"webhookNotificationIds": [d_bad]}))
            }
            _ => None,
        }
    };
    let mut covered = 0;
    for &(method, route) in ROUTES {
        if !route.contains('{') {
            continue;
        }
        // The admin routes take an admin key; B's org-bound key with the admin scope must not
        // reach another organisation's keys either.
        let key = if scope_of(method, route) == Some("admin") { &b_admin } else { &b };
        let fam = family(route);
        let theirs = object_of(route);
        for (their_id, unknown_id) in
            [(theirs.to_owned(), random_id()), (simple(theirs), simple(&random_id()))]
        {
            let body = body_of(method, route).map(|v| v.to_string());
            let body = body.as_deref().map(str::as_bytes);
            let r_theirs = send(&server, method, &fill(route, &their_id), Some(key), body, &[]);
            let r_unknown = send(&server, method, &fill(route, &unknown_id), Some(key), body, &[]);
            let context = format!("B {method} {route} on A's object");
            if route.starts_with("/v1/api_keys") {
                // Not B's business at all: refused, whatever the id.
                assert_error_shape(fam, 403, &r_theirs, &context);
                assert_eq!(r_theirs.text(), r_unknown.text(), "{context}");
                continue;
            }
            assert_error_shape(fam, 404, &r_theirs, &context);
            assert_error_shape(fam, 404, &r_unknown, &format!("B {method} {route} on an unknown id"));
            assert_eq!(
                r_theirs.text().replace(&their_id, "<id>"),
                r_unknown.text().replace(&unknown_id, "<id>"),
                "{context}: A's object must answer exactly as an unknown one"
            );
        }
        covered += 1;
    }
    assert_eq!(covered, ROUTES.iter().filter(|(_, r)| r.contains('{')).count());
    assert!(covered >= 13, "only {covered} routes with ids");

    // B's batch on its own endpoint naming A's failure: a failed item, as for an unknown id.
    let batch = |id: &str| {
        let r = send_json(
            &server,
            "POST",
            &format!("/api/notifications/v1/admin/webhooks/{ep_b}/notifications/retrigger"),
            &b_admin,
            &json!({"webhookNotificationIds": [id]}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(body["totalSuccess"], 0, "{body}");
        assert_eq!(body["totalFailed"], 1, "{body}");
        body["failedNotifications"][0]["error"].as_str().unwrap().replace(id, "<id>")
    };
    let unknown = random_id();
    assert_eq!(batch(&d_bad), batch(&unknown));

    // B's lists hold nothing of A's, whatever the filter.
    let a_ids = [&ep_ok, &ep_bad, &d_ok, &d_bad];
    let list = |path: &str, key: &str, field: &str| -> Vec<String> {
        let r = send(&server, "GET", path, Some(key), None, &[]);
        assert_eq!(r.status, 200, "B GET {path}: {}", r.text());
        ids(&r.json()[field])
    };
    assert_eq!(list("/v1/endpoints", &b, "data"), vec![ep_b.clone()]);
    for q in [
        String::new(),
        format!("?endpoint_id={ep_bad}"),
        format!("?endpoint_id={ep_ok}"),
        "?status=exhausted".into(),
        "?status=delivered".into(),
        "?event_type=a.bad".into(),
        format!("?endpoint_id={ep_bad}&status=exhausted"),
    ] {
        let got = list(&format!("/v1/webhook_deliveries{q}"), &b, "data");
        assert!(got.is_empty(), "B's deliveries{q}: {got:?}");
    }
    for q in [String::new(), format!("?webhook_id={ep_bad}"), "?status=exhausted".into()] {
        let got = list(&format!("/api/v4/tasks/webhook_failures{q}"), &b, "webhook_failures");
        assert!(got.is_empty(), "B's failures{q}: {got:?}");
    }
    // Naming A's organisation does not help B.
    let org_a_q = format!("?org_id={org_a}");
    for path in ["/v1/endpoints", "/v1/webhook_deliveries", "/api/v4/tasks/webhook_failures"] {
        let r = send(&server, "GET", &format!("{path}{org_a_q}"), Some(&b), None, &[]);
        assert!(r.status >= 400 && r.status < 500, "B GET {path}{org_a_q}: {}", r.text());
        assert!(!a_ids.iter().any(|id| r.text().contains(id.as_str())), "{}", r.text());
    }
    let r = send_json(
        &server,
        "POST",
        "/v1/events",
        &b,
        &json!({"event_type": "a.ok", "payload": {}, "org_id": org_a}),
    );
    assert_eq!(r.status, 400, "B publishing for A: {}", r.text());
    let r = send_json(
        &server,
        "POST",
        "/v1/endpoints",
        &b,
        &json!({"url": "https://example.com/x", "org_id": org_a}),
    );
    assert_eq!(r.status, 400, "B creating an endpoint for A: {}", r.text());
    // An org-bound key, even with the admin scope, reads no other organisation's keys or log,
    // nor makes keys.
    for (method, path) in
        [("GET", "/v1/api_keys"), ("GET", "/v1/audit/log?after=0"), ("POST", "/v1/api_keys")]
    {
        let body = json!({"org_id": org_a, "scopes": ["admin"]}).to_string();
        let r = send(&server, method, path, Some(&b_admin), Some(body.as_bytes()), &[]);
        assert_error_shape(Family::Named, 403, &r, &format!("an org-bound admin-scope key: {method} {path}"));
        assert!(!r.text().contains(&org_a), "{}", r.text());
    }

    // Nothing of A's changed, and nothing was written at all.
    assert_eq!(audit(&server), audit_before, "B's attempts wrote to the log");
    assert_eq!(snapshot(&server, &a, &watched), before);
    let (s, _) = server.call("GET", "/v1/endpoints", Some(&a), None);
    assert_eq!(s, 200, "A's key still works");
    // its first delivery and A's own recovery of it
    assert_eq!(ok_rx.received().iter().filter(|r| r.path == "/a").count(), 2);

    // Idempotency keys are per organisation: B reusing A's gets its own event, not A's answer.
    let publish = |key: &str| {
        let body = json!({"event_type": "a.ok", "payload": {"who": key}}).to_string();
        let r = send(
            &server,
            "POST",
            "/v1/events",
            Some(key),
            Some(body.as_bytes()),
            &[("idempotency-key", "shared-key")],
        );
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()
    };
    let first_a = publish(&a);
    let first_b = publish(&b);
    assert_ne!(first_a["id"], first_b["id"]);
    assert_eq!(first_b["delivery_ids"], json!([]), "B has no endpoint for a.ok: {first_b}");
    assert_eq!(publish(&a)["id"], first_a["id"], "A's replay is A's");
    assert_eq!(publish(&b)["id"], first_b["id"], "B's replay is B's");
}

// ------------------------------------------------------------------------------------------------
// 2. Scopes and 401s
// ------------------------------------------------------------------------------------------------

/// A body good enough to get past parsing, for routes that take one.
fn some_body(method: &str, route: &str) -> Option<&'static [u8]> {
    match (method, route) {
        ("post", "/v1/endpoints") => {
            Some(br#"{"url": "https://example.com/hook", "enabled_events": ["never.published"]}"#)
        }
        ("post", "/v1/events") => Some(br#"{"event_type": "scope.check", "payload": {}}"#),
        ("post", "/v1/api_keys") => Some(br#"{"scopes": ["admin"], "name": "scope check"}"#),
        ("patch", _) => Some(br#"{"name": "scope check"}"#),
        ("post", r) if r.starts_with("/api/notifications/") => {
            Some(br#"{"webhookNotificationIds": ["0190a0b0-0000-7000-8000-000000000001"]}"#)
        }
        _ => None,
    }
}

#[test]
fn every_route_checks_its_scope_and_its_key() {
    let server = Server::start();
    let org = random_id();
    // For each scope, a key of the organisation holding every other one.
    let mut lacking: HashMap<&str, String> = HashMap::new();
    for scope in ORG_SCOPES.iter().copied().chain(["admin"]) {
        let others: Vec<&str> = ORG_SCOPES.iter().copied().filter(|s| *s != scope).collect();
        lacking.insert(scope, key_with(&server, &org, &others));
    }
    let org_admin = key_with(&server, &org, &["admin"]);
    let revoked = {
        let (s, k) = server.call(
            "POST",
            "/v1/api_keys",
            Some(ADMIN_KEY),
            Some(json!({"org_id": org, "scopes": ORG_SCOPES})),
        );
        assert_eq!(s, 201, "{k}");
        let (s, body) = server.call(
            "DELETE",
            &format!("/v1/api_keys/{}", k["id"].as_str().unwrap()),
            Some(ADMIN_KEY),
            None,
        );
        assert_eq!(s, 204, "{body}");
        k["key"].as_str().unwrap().to_owned()
    };
    let audit_before = audit(&server);

    let mut checked = 0;
    for &(method, route) in ROUTES {
        let Some(scope) = scope_of(method, route) else {
            // The open routes answer without a key.
            let r = send(&server, method, route, None, None, &[]);
            assert_eq!(r.status, 200, "{method} {route}: {}", r.text());
            continue;
        };
        let fam = family(route);
        let path = fill(route, &random_id());
        let body = some_body(method, route);
        let context = format!("{method} {route}");

        // A key without the scope: 403 in the family's shape.
        let r = send(&server, method, &path, Some(&lacking[scope]), body, &[]);
        assert_error_shape(fam, 403, &r, &format!("{context} without {scope}"));
        if fam == Family::Named {
            assert_eq!(r.json()["name"], "AccessDenied", "{context}");
        }

        // No key, a garbage key, an unknown key, another scheme, a revoked key: 401.
        let unauthorized: [(&str, Vec<(&str, String)>); 6] = [
            ("no key", vec![]),
            ("garbage", vec![("authorization", "Bearer garbage".to_owned())]),
            ("empty bearer", vec![("authorization", "Bearer ".to_owned())]),
            (
                "unknown key",
                vec![("authorization", "Bearer sk_not_a_key_this_server_made_0123456789".into())],
            ),
            ("basic", vec![("authorization", "Basic YWRtaW46YWRtaW4=".to_owned())]),
            ("revoked key", vec![("authorization", format!("Bearer {revoked}"))]),
        ];
        for (what, headers) in &unauthorized {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = send(&server, method, &path, None, body, &headers);
            assert_error_shape(fam, 401, &r, &format!("{context} with {what}"));
            match fam {
                Family::Plain => {
                    assert_eq!(r.json(), json!({"error": "Invalid API key"}), "{context} {what}")
                }
                Family::Named => assert_eq!(r.json()["name"], "Unauthorized", "{context} {what}"),
            }
        }

        // `admin` implies the scope: never 401 or 403 (the global admin key on every route, an
        // org-bound key holding only `admin` on every organisation route).
        let mut admins = vec![ADMIN_KEY];
        if scope != "admin" {
            admins.push(&org_admin);
        }
        for key in admins {
            let r = send(&server, method, &path, Some(key), body, &[]);
            assert!(
                r.status != 401 && r.status != 403 && r.status < 500,
                "{context} with an admin key: {} {}",
                r.status,
                r.text()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, ROUTES.len() - 4);
    // The admin keys' requests above wrote (a key, endpoint, event); the refused ones did not:
    // check by refusing once more after a fresh count.
    let now = audit(&server);
    assert!(now.0 > audit_before.0);
    for &(method, route) in ROUTES {
        if let Some(scope) = scope_of(method, route) {
            let path = fill(route, &random_id());
            let r = send(&server, method, &path, Some(&lacking[scope]), some_body(method, route), &[]);
            assert_eq!(r.status, 403);
            let r = send(&server, method, &path, None, some_body(method, route), &[]);
            assert_eq!(r.status, 401);
        }
    }
    assert_eq!(audit(&server), now, "refused requests wrote to the log");
}

// ------------------------------------------------------------------------------------------------
// 3. Key revocation
// ------------------------------------------------------------------------------------------------

#[test]
fn a_revoked_key_is_refused_at_once_and_keys_are_never_listed() {
    let server = Server::start();
    let org = random_id();
    let (s, created) = server.call(
        "POST",
        "/v1/api_keys",
        Some(ADMIN_KEY),
        Some(json!({"org_id": org, "scopes": ["endpoints.read", "tasks.webhooks.read"], "name": "doomed"})),
    );
    assert_eq!(s, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk_"));
    for k in ["id", "key", "org_id", "scopes", "name", "created_at"] {
        assert!(created.get(k).is_some(), "{k} missing from {created}");
    }
    let other = server.key_for(&org, &["endpoints.read"]);
    assert_eq!(server.call("GET", "/v1/endpoints", Some(&key), None).0, 200);

    // The list never shows a key, whatever the page.
    let (s, list) = server.call("GET", "/v1/api_keys", Some(ADMIN_KEY), None);
    assert_eq!(s, 200, "{list}");
    let data = list["data"].as_array().unwrap();
    assert!(data.len() >= 3, "{list}");
    for k in data {
        assert!(k.get("key").is_none(), "a key is listed: {k}");
    }
    assert!(!list.to_string().contains(&key), "the key's text is listed");
    let (s, page) = server.call("GET", "/v1/api_keys?limit=1", Some(ADMIN_KEY), None);
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert!(page["next_cursor"].is_string(), "{page}");

    // Revoked (by the 32-hex form of its id): refused at once, in both families' shapes.
    let (s, body) = server.call("DELETE", &format!("/v1/api_keys/{}", simple(&id)), Some(ADMIN_KEY), None);
    assert_eq!(s, 204, "{body}");
    let r = send(&server, "GET", "/v1/endpoints", Some(&key), None, &[]);
    assert_error_shape(Family::Named, 401, &r, "a revoked key");
    let r = send(&server, "GET", "/api/v4/tasks/webhook_failures", Some(&key), None, &[]);
    assert_error_shape(Family::Plain, 401, &r, "a revoked key");
    assert_eq!(r.json(), json!({"error": "Invalid API key"}));
    // Twice is not found; the other key of the organisation is untouched.
    let (s, body) = server.call("DELETE", &format!("/v1/api_keys/{id}"), Some(ADMIN_KEY), None);
    assert_eq!(s, 404, "{body}");
    assert_eq!(body["name"], "NotFound");
    assert_eq!(server.call("GET", "/v1/endpoints", Some(&other), None).0, 200);
    // The revoked key is still listed (without its text), with `revoked_at`.
    let (_, list) = server.call("GET", "/v1/api_keys?limit=250", Some(ADMIN_KEY), None);
    let listed = list["data"].as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).cloned();
    let listed = listed.expect("the revoked key is listed");
    assert!(listed.get("key").is_none(), "{listed}");
    assert!(listed["revoked_at"].is_string(), "{listed}");
    // A key cannot be revoked by itself or by a non-admin key.
    let r = send(&server, "DELETE", &format!("/v1/api_keys/{id}"), Some(&other), None, &[]);
    assert_eq!(r.status, 403, "{}", r.text());
}

// ------------------------------------------------------------------------------------------------
// 4. Bad input writes nothing
// ------------------------------------------------------------------------------------------------

/// Sends `body` and checks the answer is `status` with a message naming `needle`, and that the
/// log is unchanged.
fn refused(server: &Server, key: &str, (method, path, body): (&str, &str, &[u8]), status: u16, needle: &str) {
    let before = audit(server);
    let r = send(server, method, path, Some(key), Some(body), &[]);
    let context = format!("{method} {path} {}", String::from_utf8_lossy(body));
    assert_error_shape(family(path), status, &r, &context);
    let message = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(needle), "{context}: the message {message:?} does not name {needle:?}");
    assert_eq!(audit(server), before, "{context} wrote to the log");
}

/// A bad request: the key to send it with (`None`: the organisation's), method, path, body, and
/// what the 400's message must name.
struct Bad {
    admin: bool,
    method: &'static str,
    path: String,
    body: String,
    needle: &'static str,
}

fn bad(method: &'static str, path: impl Into<String>, body: impl Into<String>, needle: &'static str) -> Bad {
    Bad { admin: false, method, path: path.into(), body: body.into(), needle }
}

fn bad_admin(method: &'static str, path: &str, body: impl Into<String>, needle: &'static str) -> Bad {
    Bad { admin: true, ..bad(method, path, body, needle) }
}

#[test]
fn bad_input_is_refused_by_name_and_writes_nothing() {
    let server = Server::start();
    let rx = Receiver::start();
    let (_, key) = server.org_key(&[ORG_SCOPES, &["admin"]].concat());
    let ep = server.endpoint(&key, &rx.url("/hook"), &["*"]);
    let ep_id = ep["id"].as_str().unwrap().to_owned();
    let ep_path = format!("/v1/endpoints/{ep_id}");
    let rotate = format!("{ep_path}/secret/rotate");
    let batch = format!("/api/notifications/v1/admin/webhooks/{ep_id}/notifications/retrigger");
    let org = random_id();
    let (e, p, g) = ("/v1/endpoints", "/v1/events", "GET");
    let one = random_id();
    let many: Vec<String> = (0..26).map(|_| random_id()).collect();

    let mut cases = vec![
        // Malformed JSON names the problem.
        bad("POST", e, r#"{"url": "#, "JSON"),
        bad("POST", e, "{", "JSON"),
        bad("POST", e, "not json", "JSON"),
        bad("POST", e, r#"{"url": "https://e.com/",}"#, "JSON"),
        bad("POST", e, "", "JSON"),
        bad("POST", p, r#"{"event_type": "a", "payload": }"#, "JSON"),
        bad("PATCH", &ep_path, r#"{"name": "#, "JSON"),
        bad("POST", &batch, "{", "JSON"),
        // Wrong types and missing fields name the field.
        bad("POST", e, r#"{"url": 5}"#, "url"),
        bad("POST", e, r#"{"url": null}"#, "url"),
        bad("POST", e, r#"{"name": "no url"}"#, "url"),
        bad("POST", e, r#"{"url": "https://e.com/", "enabled_events": "x"}"#, "enabled_events"),
        bad("POST", e, r#"{"url": "https://e.com/", "name": ["x"]}"#, "name"),
        bad("POST", e, r#"{"url": "https://e.com/", "bogus": 1}"#, "bogus"),
        bad("POST", e, "[1, 2]", ""),
        bad("POST", e, r#"{"url": "https://e.com/", "secret": "nope"}"#, "secret"),
        bad("PATCH", &ep_path, r#"{"url": 5}"#, "url"),
        bad("PATCH", &ep_path, r#"{"enabled_events": [1]}"#, "enabled_events"),
        bad("PATCH", &ep_path, r#"{"enabled_events": []}"#, "enabled_events"),
        bad("POST", &rotate, r#"{"secret": 5}"#, "secret"),
        bad("POST", &rotate, r#"{"secret": "nope"}"#, "secret"),
        bad("POST", p, r#"{"event_type": 5, "payload": {}}"#, "event_type"),
        bad("POST", p, r#"{"event_type": "a.b"}"#, "payload"),
        bad("POST", p, r#"{"event_type": "a.b", "payload": {}, "call_id": 7}"#, "call_id"),
        bad("POST", p, r#"{"event_type": "a.b", "payload": {}, "call_id": "nope"}"#, "call_id"),
        bad_admin("POST", "/v1/api_keys", r#"{"org_id": "x", "scopes": ["events.write"]}"#, "org_id"),
        bad_admin("POST", "/v1/api_keys", r#"{"org_id": 5, "scopes": ["events.write"]}"#, "org_id"),
        bad_admin("POST", "/v1/api_keys", r#"{"scopes": ["events.write"]}"#, "org_id"),
        bad_admin(
            "POST",
            "/v1/api_keys",
            format!(r#"{{"org_id": "{org}", "scopes": ["events.writ"]}}"#),
            "scopes",
        ),
        bad_admin("POST", "/v1/api_keys", format!(r#"{{"org_id": "{org}", "scopes": []}}"#), "scopes"),
        // Filters, the audit log's parameters.
        bad(g, "/v1/webhook_deliveries?status=bogus", "", "status"),
        bad(g, "/v1/webhook_deliveries?status=", "", "status"),
        bad(g, "/v1/webhook_deliveries?status=PENDING", "", "status"),
        bad(g, "/api/v4/tasks/webhook_failures?status=bogus", "", "status"),
        bad(g, "/api/v4/tasks/webhook_failures?status=pending", "", "status"),
        bad(g, "/v1/webhook_deliveries?endpoint_id=xyz", "", "endpoint_id"),
        bad(g, "/api/v4/tasks/webhook_failures?webhook_id=xyz", "", "webhook_id"),
        bad(g, "/v1/webhook_deliveries?created_after=yesterday", "", "created_after"),
        bad(g, "/v1/webhook_deliveries?created_before=2026-13-01T00:00:00Z", "", "created_before"),
        bad_admin(g, "/v1/audit/log?after=x", "", "after"),
        bad_admin(g, "/v1/audit/log?limit=0", "", "limit"),
        bad_admin(g, "/v1/audit/log?limit=10001", "", "limit"),
    ];
    // The batch: 1 to 25 UUIDs, no duplicates.
    for ids in [json!([]), json!(many), json!(["x"]), json!([one, one]), json!("x"), Value::Null] {
        let body = if ids.is_null() { json!({}) } else { json!({ "webhookNotificationIds": ids }) };
        cases.push(bad("POST", &batch, body.to_string(), "webhookNotificationIds"));
    }
    // URLs that are not http(s): endpoints, their changes, inline webhook URLs.
    for url in
        ["ftp://example.com/", "javascript:alert(1)", "not a url", "", "https://", "file:///etc/passwd"]
    {
        cases.push(bad("POST", e, json!({ "url": url }).to_string(), "url"));
        cases.push(bad("PATCH", &ep_path, json!({ "url": url }).to_string(), "url"));
        let publish = json!({"event_type": "a.b", "payload": {}, "webhook_url": url});
        cases.push(bad("POST", p, publish.to_string(), "webhook_url"));
    }
    // Event types outside [A-Za-z0-9._-]{1,128}.
    let long = "a".repeat(129);
    for t in ["", "has space", "slash/no", "ünïcode", "semi;colon", "star*", "tab\t", long.as_str()] {
        cases.push(bad("POST", p, json!({"event_type": t, "payload": {}}).to_string(), "event_type"));
        let endpoint = json!({"url": "https://e.com/", "enabled_events": [t]});
        cases.push(bad("POST", e, endpoint.to_string(), "enabled_events"));
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()) {
            cases.push(bad(g, format!("/v1/webhook_deliveries?event_type={t}"), "", "event_type"));
        }
    }
    // Limits and cursors of every list.
    for list in ["/v1/endpoints", "/v1/webhook_deliveries", "/api/v4/tasks/webhook_failures", "/v1/api_keys"]
    {
        let admin = list == "/v1/api_keys";
        for limit in ["0", "251", "abc", "-1", "1.5", "99999999999999999999999"] {
            cases.push(Bad { admin, ..bad(g, format!("{list}?limit={limit}"), "", "limit") });
        }
        for cursor in ["garbage!", "AAAA", "%00", &"z".repeat(56)] {
            cases.push(Bad { admin, ..bad(g, format!("{list}?cursor={cursor}"), "", "cursor") });
        }
    }

    for case in &cases {
        let k = if case.admin { ADMIN_KEY } else { key.as_str() };
        refused(&server, k, (case.method, &case.path, case.body.as_bytes()), 400, case.needle);
    }
    for list in ["/v1/endpoints", "/v1/webhook_deliveries", "/api/v4/tasks/webhook_failures"] {
        let r = send(&server, g, &format!("{list}?limit=250"), Some(&key), None, &[]);
        assert_eq!(r.status, 200, "{list}?limit=250: {}", r.text());
    }
    // The endpoint is as it was.
    let (code, now) = server.call("GET", &ep_path, Some(&key), None);
    assert_eq!(code, 200);
    let mut was = ep.clone();
    was.as_object_mut().unwrap().remove("secret");
    assert_eq!(now, was);
}

#[test]
fn bodies_over_the_limits_are_413_and_write_nothing() {
    let small = Server::start_with(&[("HERALD_SERVER_MAX_EVENT_BYTES", "1024")]);
    let (_, key) = small.org_key(ORG_SCOPES);
    let payload = |n: usize| json!({"event_type": "big.one", "payload": {"x": "y".repeat(n)}}).to_string();
    let r = send(&small, "POST", "/v1/events", Some(&key), Some(payload(900).as_bytes()), &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    for n in [1100, 4096, 200_000] {
        let before = audit(&small);
        let body = payload(n);
        let r = send(&small, "POST", "/v1/events", Some(&key), Some(body.as_bytes()), &[]);
        assert_error_shape(Family::Named, 413, &r, &format!("an event of {n} bytes over 1024"));
        assert_eq!(audit(&small), before);
    }

    // The defaults: 256 KiB for events, 64 KiB for every other body.
    let server = Server::start();
    let (_, key) = server.org_key(ORG_SCOPES);
    let r = send(&server, "POST", "/v1/events", Some(&key), Some(payload(200 * 1024).as_bytes()), &[]);
    assert_eq!(r.status, 202, "200 KiB is under the default: {}", r.text());
    let before = audit(&server);
    let r = send(&server, "POST", "/v1/events", Some(&key), Some(payload(300 * 1024).as_bytes()), &[]);
    assert_error_shape(Family::Named, 413, &r, "an event over 256 KiB");
    let big = json!({"url": "https://example.com/", "name": "n".repeat(70 * 1024)}).to_string();
    let r = send(&server, "POST", "/v1/endpoints", Some(&key), Some(big.as_bytes()), &[]);
    assert_error_shape(Family::Named, 413, &r, "an endpoint body over 64 KiB");
    let r = send(&server, "GET", "/v1/endpoints", Some(&key), None, &[]);
    assert_eq!(r.json()["data"], json!([]), "{}", r.text());
    assert_eq!(audit(&server), before);
}

#[test]
fn path_ids_take_both_uuid_forms_and_nothing_else() {
    let server = Server::start();
    let rx = Receiver::start();
    rx.set_status(500);
    let (_, key) = server.org_key(&[ORG_SCOPES, &["admin"]].concat());
    let ep = server.endpoint(&key, &rx.url("/hook"), &["*"])["id"].as_str().unwrap().to_owned();
    let ev = server.publish(&key, "id.forms", json!({}));
    let ev_id = ev["id"].as_str().unwrap().to_owned();
    let d = ev["delivery_ids"][0].as_str().unwrap().to_owned();
    server.wait_status(&key, &d, "exhausted");

    let gets: [(&str, &str); 5] = [
        ("/v1/endpoints/{id}", ep.as_str()),
        ("/v1/events/{id}", ev_id.as_str()),
        ("/v1/webhook_deliveries/{id}", d.as_str()),
        ("/v1/webhook_deliveries/{id}/attempts", d.as_str()),
        ("/api/v4/tasks/webhook_failures/{id}", d.as_str()),
    ];
    for (route, id) in gets {
        for form in [id.to_owned(), simple(id)] {
            let r = send(&server, "GET", &fill(route, &form), Some(&key), None, &[]);
            assert_eq!(r.status, 200, "GET {route} as {form}: {}", r.text());
        }
    }
    let before = audit(&server);
    let u = d.as_str();
    let bad_forms = [
        format!("urn:uuid:{u}"),
        format!("%7B{u}%7D"),
        format!("{u}x"),
        format!("x{u}"),
        simple(u)[..31].to_owned(),
        format!("{}0", simple(u)),
        u.replacen('-', "", 1),
        u.replace(|c: char| c.is_ascii_digit(), "g"),
        format!("{u}%00"),
        "%ff%fe".to_owned(),
        "0".to_owned(),
        "..".to_owned(),
        "a".repeat(5000),
    ];
    let writes: [(&str, &str); 6] = [
        ("post", "/v1/endpoints/{id}/enable"),
        ("post", "/v1/endpoints/{id}/secret/rotate"),
        ("delete", "/v1/endpoints/{id}"),
        ("post", "/v1/webhook_deliveries/{id}/redeliver"),
        ("post", "/api/webhooks/v1/failures/{id}/retrigger"),
        ("post", "/api/notifications/v1/admin/webhooks/{webhookId}/notifications/retrigger"),
    ];
    let routes = gets.iter().map(|(r, _)| ("get", *r)).chain(writes).chain([("delete", "/v1/api_keys/{id}")]);
    for (method, route) in routes {
        let key = if route.starts_with("/v1/api_keys") { ADMIN_KEY } else { key.as_str() };
        for form in &bad_forms {
            let body = (route.starts_with("/api/notifications/"))
                .then(|| format!(r#"{{"webhookNotificationIds": ["{d}"]}}"#));
            let r =
                send(&server, method, &fill(route, form), Some(key), body.as_deref().map(str::as_bytes), &[]);
            assert_error_shape(family(route), 404, &r, &format!("{method} {route} with {form:?}"));
        }
    }
    assert_eq!(audit(&server), before, "a bad path id wrote to the log");
}

// ------------------------------------------------------------------------------------------------
// 5. Rate limit
// ------------------------------------------------------------------------------------------------

#[test]
fn a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let server =
        Server::start_with(&[("HERALD_SERVER_KEY_REQUESTS_PER_S", "1"), ("HERALD_SERVER_KEY_BURST", "3")]);
    // Three keys spend the admin key's burst.
    let org = random_id();
    let k1 = key_with(&server, &org, ORG_SCOPES);
    let k2 = key_with(&server, &org, ORG_SCOPES);
    let k3 = key_with(&server, &org, ORG_SCOPES);
    for (key, path, fam) in
        [(&k1, "/v1/endpoints", Family::Named), (&k3, "/api/v4/tasks/webhook_failures", Family::Plain)]
    {
        for i in 0..3 {
            let r = send(&server, "GET", path, Some(key), None, &[]);
            assert_eq!(r.status, 200, "request {i} within the burst: {}", r.text());
        }
        let r = send(&server, "GET", path, Some(key), None, &[]);
        assert_error_shape(fam, 429, &r, "the 4th quick request");
        if fam == Family::Named {
            assert_eq!(r.json()["name"], "TooManyRequests");
        }
        let wait: u64 = r
            .header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=5).contains(&wait), "Retry-After {wait}");
    }
    // Another key is unaffected.
    let r = send(&server, "GET", "/v1/endpoints", Some(&k2), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // The limited key recovers after its Retry-After.
    std::thread::sleep(Duration::from_millis(1100));
    let r = send(&server, "GET", "/v1/endpoints", Some(&k1), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

// ------------------------------------------------------------------------------------------------
// 6. No panic reachable
// ------------------------------------------------------------------------------------------------

#[test]
fn hostile_requests_never_get_a_5xx_and_the_server_stays_up() {
    let server = Server::start();
    let rx = Receiver::start();
    let (_, key) = server.org_key(&[ORG_SCOPES, &["admin"]].concat());
    let ep = server.endpoint(&key, &rx.url("/hook"), &["*"])["id"].as_str().unwrap().to_owned();
    let port = server.port;
    let alive = |what: &str| {
        let r = send(&server, "GET", "/healthz", None, None, &[]);
        assert_eq!(r.status, 200, "the server is down after {what}");
    };
    let check = |what: &str, r: Result<Resp, String>, may_drop: bool| {
        match r {
            Ok(r) => assert!(r.status < 500, "{what}: {} {}", r.status, r.text()),
            Err(e) => assert!(may_drop, "{what}: {e}"),
        }
        alive(what);
    };
    let raw = |head: &str, body: &[u8]| -> Vec<u8> {
        let mut req = format!(
            "{head}\r\nhost: 127.0.0.1\r\nconnection: close\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req
    };

    // Huge path ids.
    for n in [1_000, 10_000, 60_000, 200_000] {
        let id = "a".repeat(n);
        for route in
            ["/v1/endpoints/{id}", "/v1/webhook_deliveries/{id}", "/api/v4/tasks/webhook_failures/{id}"]
        {
            let head = format!("GET {} HTTP/1.1", fill(route, &id));
            check(&format!("a {n}-byte id on {route}"), send_bytes(port, &raw(&head, b"")), n > 60_000);
        }
    }
    // Non-UTF-8 bytes in bodies.
    let non_utf8: [&[u8]; 4] = [
        b"{\"url\": \"https://e.com/\xff\xfe\"}",
        b"\xff\xfe\xfd",
        b"{\"event_type\": \"a.b\", \"payload\": \"\xc3\x28\"}",
        b"{\"event_type\": \"a.b\", \"payload\": {\"\xed\xa0\x80\": 1}}",
    ];
    for body in non_utf8 {
        for path in ["/v1/endpoints", "/v1/events", &format!("/v1/endpoints/{ep}/secret/rotate")] {
            let r = send_bytes(port, &raw(&format!("POST {path} HTTP/1.1"), body));
            check(&format!("non-UTF-8 body on {path}"), r, false);
        }
        let r = send_bytes(port, &raw(&format!("PATCH /v1/endpoints/{ep} HTTP/1.1"), body));
        check("non-UTF-8 body on PATCH", r, false);
    }
    // Deeply nested JSON, everywhere a body is read.
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let deep_obj = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
    for body in [deep(100_000), deep_obj(20_000), format!("{{\"url\": {}}}", deep(50_000))] {
        for path in ["/v1/endpoints", "/v1/events", "/v1/api_keys"] {
            let r = send_bytes(port, &raw(&format!("POST {path} HTTP/1.1"), body.as_bytes()));
            check(&format!("deep JSON on {path}"), r, false);
        }
    }
    // A payload of 10k nested arrays: stored or refused, never a 5xx, and readable afterwards.
    for payload in [deep(10_000), deep_obj(5_000), deep(100_000)] {
        let body = format!("{{\"event_type\": \"deep.one\", \"payload\": {payload}}}");
        let r = send(&server, "POST", "/v1/events", Some(&key), Some(body.as_bytes()), &[]);
        assert!(r.status < 500, "a deep payload: {} {}", r.status, r.text());
        if r.status == 202 {
            let ev = r.json();
            let id = ev["id"].as_str().unwrap();
            let got = send(&server, "GET", &format!("/v1/events/{id}"), Some(&key), None, &[]);
            assert_eq!(got.status, 200, "reading a deep payload back: {}", got.text());
            assert!(got.text().contains(&payload), "the payload comes back as published");
            let d = ev["delivery_ids"][0].as_str().unwrap();
            server.wait_status(&key, d, "delivered");
        }
        alive("a deep payload");
    }
    let r = send(&server, "GET", "/v1/audit/log?after=0&limit=10000", Some(ADMIN_KEY), None, &[]);
    assert_eq!(r.status, 200, "the audit log with deep payloads: {}", r.text());
    // Header values with odd bytes.
    let odd_headers: [&[u8]; 6] = [
        b"x-odd: \x80\xff\xfe",
        b"authorization: Bearer sk_\xff\xfe\x80",
        b"idempotency-key: \x80\xff",
        b"idempotency-key: ",
        b"x-ctl: a\x01b",
        b"x-long: ",
    ];
    for (i, h) in odd_headers.iter().enumerate() {
        let mut h = h.to_vec();
        if i == 5 {
            h.extend(std::iter::repeat_n(b'x', 100_000));
        }
        let body = br#"{"event_type": "odd.header", "payload": {}}"#;
        let mut req = format!(
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        if i != 1 {
            req.extend_from_slice(format!("authorization: Bearer {key}\r\n").as_bytes());
        }
        req.extend_from_slice(&h);
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body);
        check(
            &format!("header {}", String::from_utf8_lossy(&h[..h.len().min(40)])),
            send_bytes(port, &req),
            i == 5,
        );
    }
    // Odd request lines, lengths and queries.
    let odd: [Vec<u8>; 8] = [
        b"FOO /v1/endpoints HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
        b"GET /v1/endpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999\r\nconnection: close\r\n\r\n".to_vec(),
        b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\nconnection: close\r\n\r\nabcdef".to_vec(),
        b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\n".to_vec(),
        raw("GET /v1/webhook_deliveries?status=%ff%fe HTTP/1.1", b""),
        raw("GET /v1/webhook_deliveries?limit=%zz&cursor=%00 HTTP/1.1", b""),
        raw("GET /v1/webhook_deliveries?status=a&status=b HTTP/1.1", b""),
        raw("GET /v1/audit/log?after=18446744073709551615&limit=10000 HTTP/1.1", b""),
    ];
    for (i, req) in odd.iter().enumerate() {
        check(&format!("odd request {i}"), send_bytes(port, req), false);
    }
    // A connection cut half way through a body.
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.write_all(&raw("POST /v1/events HTTP/1.1", &[b'{'; 10])[..]);
        let _ = s.write_all(b"\r\n");
        drop(s);
    }
    alive("a cut connection");
    // Odd but valid JSON values.
    for body in [
        json!({"event_type": "odd.values", "payload": null}),
        json!({"event_type": "odd.values", "payload": "\u{0000}\u{ffff}"}),
        json!({"event_type": "odd.values", "payload": 1e308}),
        json!({"event_type": "odd.values", "payload": {"": ""}}),
    ] {
        let r = send_json(&server, "POST", "/v1/events", &key, &body);
        check(&format!("publish {body}"), Ok(r), false);
    }
    let r = send(&server, "GET", "/v1/webhook_deliveries?limit=250", Some(&key), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(&server, "GET", "/metrics", None, None, &[]);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("status=\"5"), "a 5xx was answered:\n{}", r.text());
}

// ------------------------------------------------------------------------------------------------
// 7. SSRF
// ------------------------------------------------------------------------------------------------

#[test]
fn private_targets_are_refused_unless_allowed() {
    let server = Server::start_with(&[("HERALD_DELIVERY_ALLOW_PRIVATE_TARGETS", "false")]);
    let (_, key) = server.org_key(ORG_SCOPES);
    let public = server.endpoint(&key, "https://example.com/hook", &["*"]);
    let path = format!("/v1/endpoints/{}", public["id"].as_str().unwrap());
    for url in [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/hook",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://0.0.0.0/",
        "http://localhost/",
        "http://LOCALHOST:9000/",
        "http://localhost./",
        "http://api.localhost/",
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "https://100.64.0.1/",
    ] {
        let body = json!({"url": url}).to_string();
        refused(&server, &key, ("POST", "/v1/endpoints", body.as_bytes()), 400, "url");
        refused(&server, &key, ("PATCH", &path, body.as_bytes()), 400, "url");
        let body = json!({"event_type": "a.b", "payload": {}, "webhook_url": url}).to_string();
        refused(&server, &key, ("POST", "/v1/events", body.as_bytes()), 400, "url");
    }
    let (s, list) = server.call("GET", "/v1/endpoints", Some(&key), None);
    assert_eq!(s, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["url"], "https://example.com/hook");
}

/// `HERALD_ADMIN_KEY` is taken as given, whatever its form, as long as it fits a bearer header;
/// a key that would not (a space in it) stops the first start with an error naming the variable.
#[test]
fn a_given_admin_key_is_taken_as_given() {
    let server = Server::start_with(&[("HERALD_ADMIN_KEY", "test-admin")]);
    let (status, body) = server.call("GET", "/v1/api_keys", Some("test-admin"), None);
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.call("GET", "/v1/api_keys", Some("test-admin-2"), None);
    assert_eq!(status, 401);
    drop(server);

    let scratch = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(scratch.path())
        .env("HERALD_ADMIN_KEY", "two words")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERALD_ADMIN_KEY"), "{stderr}");
}

/// A path no route serves answers 404, and a route asked with a method it does not serve 405,
/// each in its route family's error shape, like every other error.
#[test]
fn unknown_paths_and_methods_answer_in_the_error_shape() {
    let server = Server::start();
    let r = send(&server, "GET", "/v1/nope", Some(ADMIN_KEY), None, &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["name"], "NotFound", "{}", r.text());
    assert_eq!(r.json()["status"], 404);
    assert!(r.json()["error"].as_str().unwrap().contains("/v1/nope"));
    let r = send(&server, "PUT", "/v1/endpoints", Some(ADMIN_KEY), None, &[]);
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.json()["name"], "MethodNotAllowed", "{}", r.text());
    assert_eq!(r.json()["status"], 405);
    let allow = r.header("allow").unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("POST"), "allow: {allow:?}");
    let r = send(&server, "DELETE", "/api/v4/tasks/webhook_failures", Some(ADMIN_KEY), None, &[]);
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.json()["error"].is_string() && r.json().get("name").is_none(), "{}", r.text());
}

/// An admin key that names no organisation lists across all of them (API.md: an admin key is for
/// all organisations); naming one narrows the list to it; an organisation's key still sees only
/// its own.
#[test]
fn an_admin_key_lists_across_organisations() {
    let server = Server::start();
    let receiver = Receiver::start();
    receiver.set_status(500);
    let (org_a, key_a) = server.org_key(ORG_SCOPES);
    let (_org_b, key_b) = server.org_key(ORG_SCOPES);
    let ep_a = server.endpoint(&key_a, &receiver.url("/a"), &["*"])["id"].as_str().unwrap().to_owned();
    let ep_b = server.endpoint(&key_b, &receiver.url("/b"), &["*"])["id"].as_str().unwrap().to_owned();
    let d_a = server.publish(&key_a, "a.b", json!({}))["delivery_ids"][0].as_str().unwrap().to_owned();
    let d_b = server.publish(&key_b, "a.b", json!({}))["delivery_ids"][0].as_str().unwrap().to_owned();
    // Two failures (300 ms and 600 ms schedule) exhaust each.
    server.wait_status(&key_a, &d_a, "exhausted");
    server.wait_status(&key_b, &d_b, "exhausted");

    let ids = |body: &Value, list: &str, field: &str| -> Vec<String> {
        body[list].as_array().unwrap().iter().map(|x| x[field].as_str().unwrap().to_owned()).collect()
    };
    let (status, body) = server.call("GET", "/v1/endpoints", Some(ADMIN_KEY), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body, "data", "id"), vec![ep_b.clone(), ep_a.clone()], "newest first");
    let (status, body) = server.call("GET", "/v1/webhook_deliveries", Some(ADMIN_KEY), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body, "data", "id"), vec![d_b.clone(), d_a.clone()]);
    let (_, body) =
        server.call("GET", "/v1/webhook_deliveries?status=exhausted&limit=1", Some(ADMIN_KEY), None);
    assert_eq!(ids(&body, "data", "id"), vec![d_b.clone()]);
    let cursor = body["next_cursor"].as_str().expect("a second page").to_owned();
    let path = format!("/v1/webhook_deliveries?status=exhausted&limit=1&cursor={cursor}");
    let (_, body) = server.call("GET", &path, Some(ADMIN_KEY), None);
    assert_eq!(ids(&body, "data", "id"), vec![d_a.clone()]);
    assert!(body["next_cursor"].is_null(), "{body}");
    let (status, body) = server.call("GET", "/api/v4/tasks/webhook_failures", Some(ADMIN_KEY), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body, "webhook_failures", "id"), vec![d_b.clone(), d_a.clone()]);

    // Narrowed to one organisation, and an organisation's own key.
    let path = format!("/v1/webhook_deliveries?org_id={org_a}");
    let (_, body) = server.call("GET", &path, Some(ADMIN_KEY), None);
    assert_eq!(ids(&body, "data", "id"), vec![d_a.clone()]);
    let (_, body) = server.call("GET", "/v1/webhook_deliveries", Some(&key_b), None);
    assert_eq!(ids(&body, "data", "id"), vec![d_b.clone()]);
    let (_, body) = server.call("GET", "/v1/endpoints", Some(&key_a), None);
    assert_eq!(ids(&body, "data", "id"), vec![ep_a.clone()]);

    // A deleted endpoint leaves the admin's list too.
    let (status, _) = server.call("DELETE", &format!("/v1/endpoints/{ep_b}"), Some(&key_b), None);
    assert_eq!(status, 204);
    let (_, body) = server.call("GET", "/v1/endpoints", Some(ADMIN_KEY), None);
    assert_eq!(ids(&body, "data", "id"), vec![ep_a]);
}
