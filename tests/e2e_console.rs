//! The operator's console (`/ui/`) end to end: the real `herald serve`, receivers on 127.0.0.1,
//! and a headless Chromium driven through chromedriver (WebDriver, by `fantoccini`). It signs in
//! with a wrong and a good key, finds a failure a failing receiver made, opens it, retriggers it
//! once the receiver is back, runs a recover from its dry run to done, and checks that a
//! `<script>` in the API's values shows as text and never runs. A screenshot of each page goes
//! to `target/console-screens/`. Also, without a browser: the page's headers and assets.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Receiver, Server, ORG_SCOPES, WAIT_MAX};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// The whole browser test ends within this, whatever happens.
const BROWSER_TEST_MAX: Duration = Duration::from_secs(150);
/// A wait for something on the page.
const PAGE_WAIT_MAX: Duration = Duration::from_secs(25);
const POLL: Duration = Duration::from_millis(100);

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

// ---------------------------------------------------------------------------------------------
// Without a browser: the page, its headers and its assets.

/// One GET over a fresh connection: the status, the headers (names lowercased) and the body.
fn get(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect to herald");
    stream.set_read_timeout(Some(WAIT_MAX)).expect("read timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status.expect("a status"), headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn assert_security_headers(path: &str, headers: &[(String, String)]) {
    assert_eq!(header(headers, "content-security-policy"), Some(CSP), "{path}: {headers:?}");
    assert_eq!(header(headers, "x-frame-options"), Some("DENY"), "{path}");
    assert_eq!(header(headers, "x-content-type-options"), Some("nosniff"), "{path}");
    assert_eq!(header(headers, "referrer-policy"), Some("no-referrer"), "{path}");
}

#[test]
fn the_console_loads_without_a_key_with_strict_headers_and_typed_assets() {
    let server = Server::start();

    let (status, headers, body) = get(&server, "/ui/", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
    assert_security_headers("/ui/", &headers);
    assert!(body.contains(r#"<script src="app.js" defer></script>"#), "{body}");
    assert!(body.contains("id=\"signin-form\""), "{body}");

    let (status, headers, _) = get(&server, "/ui", &[]);
    assert_eq!(status, 308);
    assert_eq!(header(&headers, "location"), Some("/ui/"));
    assert_security_headers("/ui", &headers);

    for (path, content_type, needle) in [
        ("/ui/app.js", "text/javascript; charset=utf-8", "sessionStorage"),
        ("/ui/app.css", "text/css; charset=utf-8", "font-family"),
    ] {
        let (status, headers, body) = get(&server, path, &[]);
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), Some(content_type), "{path}");
        assert_eq!(header(&headers, "cache-control"), Some("no-cache"), "{path}");
        assert_security_headers(path, &headers);
        assert!(body.contains(needle), "{path}");
        // The browser revalidates with the entity tag and gets no body when nothing changed.
        let etag = header(&headers, "etag").expect("an etag").to_owned();
        let (status, headers, body) = get(&server, path, &[("if-none-match", &etag)]);
        assert_eq!((status, body.as_str()), (304, ""), "{path}");
        assert_security_headers(path, &headers);
    }

    let (status, headers, _) = get(&server, "/ui/nothing-here", &[]);
    assert_eq!(status, 404);
    assert_security_headers("/ui/nothing-here", &headers);

    // The page is open; the API it calls is not.
    let (status, _) = server.call("GET", "/v1/webhook_deliveries", None, None);
    assert_eq!(status, 401);
}

// ---------------------------------------------------------------------------------------------
// In a browser.

/// `name` on the PATH, or a clear failure naming what to install.
fn program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: this test drives a real browser. Install it with \
             `apt-get install {package}` (scripts/test installs chromium and chromium-driver)"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// chromedriver as a child process; dropping it ends the browser session it holds (so Chromium
/// quits) and then stops chromedriver by its PID, on a panic too.
struct Chromedriver {
    child: Child,
    port: u16,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let driver = program("chromedriver", "chromium-driver");
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let profile = tempfile::tempdir().expect("a temp dir for the browser profile");
        let mut me = Chromedriver { child, port, session: None, _profile: profile };
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Ok((200, _)) = common::call_raw(&me.url("/status"), "GET", None, None, &[]) {
                return me;
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("chromedriver exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer on port {}", me.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A headless Chromium session with a fixed window and a fresh profile.
    async fn session(&mut self) -> Client {
        let chromium = program("chromium", "chromium");
        let profile = format!("--user-data-dir={}", self._profile.path().display());
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--no-first-run", profile],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url(""))
            .await
            .expect("chromedriver did not start a Chromium session");
        self.session = client.session_id().await.expect("the session id");
        client
    }

    /// The browser's console messages since the last call (chromedriver's log endpoint).
    fn browser_log(&self) -> Vec<String> {
        let id = self.session.as_deref().expect("a session");
        let url = self.url(&format!("/session/{id}/se/log"));
        let (status, body) = common::call_raw(&url, "POST", None, Some(r#"{"type":"browser"}"#), &[])
            .expect("the browser log");
        assert_eq!(status, 200, "{body}");
        let log: Value = serde_json::from_str(&body).expect("JSON");
        let entries = log["value"].as_array().cloned().unwrap_or_default();
        entries.iter().map(|e| e["message"].as_str().unwrap_or_default().to_owned()).collect()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = common::call_raw_within(
                &self.url(&format!("/session/{id}")),
                "DELETE",
                None,
                None,
                &[],
                Duration::from_secs(10),
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page as the test sees it, and where its screenshots go.
struct Page {
    client: Client,
    base: String,
    screens: PathBuf,
}

impl Page {
    /// The text of the first element `css` selects, if it is there and not inside a hidden one.
    async fn visible_text(&self, css: &str) -> Option<String> {
        let script = "const e = document.querySelector(arguments[0]); \
                      return e && !e.closest('[hidden]') ? e.textContent : null;";
        let value = self.client.execute(script, vec![json!(css)]).await.expect("execute");
        value.as_str().map(str::to_owned)
    }

    async fn count(&self, css: &str) -> usize {
        let script = "return document.querySelectorAll(arguments[0]).length;";
        let value = self.client.execute(script, vec![json!(css)]).await.expect("execute");
        value.as_u64().unwrap_or(0) as usize
    }

    /// Waits until `css` shows a text that `ok` accepts; returns it. On timeout, saves the page
    /// as `timeout.png` and fails naming what was awaited and what was there.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PAGE_WAIT_MAX;
        loop {
            let text = self.visible_text(css).await;
            if let Some(t) = text.as_deref().filter(|t| ok(t)) {
                return t.to_owned();
            }
            if Instant::now() > deadline {
                self.screenshot("timeout").await;
                let notice = self.visible_text("#notice").await;
                panic!("waited for {what} in {css}; it shows {text:?} (notice: {notice:?})");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_count(&self, css: &str, n: usize) {
        let deadline = Instant::now() + PAGE_WAIT_MAX;
        while self.count(css).await != n {
            if Instant::now() > deadline {
                self.screenshot("timeout").await;
                panic!("waited for {n} of {css}, there are {}", self.count(css).await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn click(&self, css: &str) {
        let element = self.client.wait().at_most(PAGE_WAIT_MAX).for_element(Locator::Css(css)).await;
        element
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let input = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
        input.clear().await.expect("clear");
        input.send_keys(text).await.expect("type");
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(self.screens.join(format!("{name}.png")), png).expect("write the screenshot");
    }
}

/// `target/console-screens/` (under `CARGO_TARGET_DIR` when set).
fn screens_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screens");
    std::fs::create_dir_all(&dir).expect("create target/console-screens");
    dir
}

/// An endpoint of the key's organisation, named `name`, for `events`.
fn endpoint(server: &Server, key: &str, name: &str, url: &str, events: &[&str]) -> String {
    let body = json!({"url": url, "name": name, "enabled_events": events});
    let (status, body) = server.call("POST", "/v1/endpoints", Some(key), Some(body));
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("an id").to_owned()
}

/// Waits until every delivery of `ids` is exhausted or inactive.
fn wait_failed(server: &Server, key: &str, ids: &[String]) {
    let deadline = Instant::now() + WAIT_MAX;
    for id in ids {
        loop {
            let (code, d) = server.call("GET", &format!("/v1/webhook_deliveries/{id}"), Some(key), None);
            assert_eq!(code, 200, "{d}");
            if d["status"] == "exhausted" || d["status"] == "inactive" {
                break;
            }
            assert!(Instant::now() < deadline, "delivery {id} never failed: {d}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn delivery_of(published: &Value) -> String {
    published["delivery_ids"][0].as_str().expect("a delivery").to_owned()
}

/// What the browser part works on: a failed `invoice.paid` to a receiver that answers 500, with
/// `<script>` in its endpoint's name and its payload, and three failed `order.created` to a
/// receiver that answers 503 (their endpoint goes inactive on the way).
struct Scene {
    server: Server,
    key: String,
    billing: Receiver,
    orders: Receiver,
    invoice: String,
    order_deliveries: Vec<String>,
}

fn scene() -> Scene {
    let server = Server::start_with(&[("HERALD_DELIVERY_RETRY_SCHEDULE", "200ms,200ms")]);
    let (_org, key) = server.org_key(ORG_SCOPES);
    let (billing, orders) = (Receiver::start(), Receiver::start());
    billing.set_status(500);
    orders.set_status(503);
    let billing_name = "Billing <script>window.heraldXss = 1</script>";
    endpoint(&server, &key, billing_name, &billing.url("/hook"), &["invoice.*"]);
    endpoint(&server, &key, "Orders", &orders.url("/hook"), &["order.*"]);
    let payload = json!({"amount": 42, "note": "<script>window.heraldXss = 2</script>"});
    let invoice = delivery_of(&server.publish(&key, "invoice.paid", payload));
    let order_deliveries: Vec<String> =
        (0..3).map(|n| delivery_of(&server.publish(&key, "order.created", json!({"order": n})))).collect();
    wait_failed(&server, &key, std::slice::from_ref(&invoice));
    wait_failed(&server, &key, &order_deliveries);
    Scene { server, key, billing, orders, invoice, order_deliveries }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_failure_retriggers_it_and_recovers_the_rest_in_a_browser() {
    let started = Instant::now();
    // Both programs are looked for first, so a machine without them fails here, saying so.
    program("chromium", "chromium");
    let mut driver = Chromedriver::start();
    let scene = tokio::task::spawn_blocking(scene).await.expect("the scene");
    let client = driver.session().await;
    let page = Page { client, base: scene.server.url("/ui/"), screens: screens_dir() };
    let walk = tokio::time::timeout(BROWSER_TEST_MAX, walk_through(&page, &scene)).await;
    walk.unwrap_or_else(|_| panic!("the browser walk-through took over {BROWSER_TEST_MAX:?}"));
    // The page ran under its CSP without a violation and without an uncaught error (the wrong
    // key's 401 and the browser's own /favicon.ico 404 are logged as failed loads, not these).
    let log = driver.browser_log();
    assert!(log.iter().any(|m| m.contains("401")), "the log holds the wrong key's 401: {log:#?}");
    let bad: Vec<&String> =
        log.iter().filter(|m| m.contains("Content Security Policy") || m.contains("Uncaught")).collect();
    assert!(bad.is_empty(), "the browser console: {bad:#?}");
    let _ = page.client.clone().close().await;
    driver.session = None;
    println!("console browser test: {:.1} s", started.elapsed().as_secs_f64());
}

async fn walk_through(page: &Page, scene: &Scene) {
    sign_in(page, &scene.key).await;
    let invoice_row = failures(page, scene).await;
    delivery(page, scene, &invoice_row).await;
    endpoints(page).await;
    recover(page, scene).await;
    // Nothing from the API ran as a script, and the key is in sessionStorage only.
    let xss = page.client.execute("return typeof window.heraldXss;", vec![]).await.expect("execute");
    assert_eq!(xss, json!("undefined"), "a <script> from the API ran");
    let where_key = "return [document.cookie, location.href, sessionStorage.getItem('herald.key')];";
    let places = page.client.execute(where_key, vec![]).await.expect("execute");
    assert_eq!(places[0], json!(""), "a cookie was set");
    assert!(!places[1].as_str().unwrap_or_default().contains(&scene.key), "the key is in the URL");
    assert_eq!(places[2], json!(scene.key));
    // Signing out forgets the key and shows the form again.
    page.click("#sign-out").await;
    page.wait_text("#view-signin h2", "the sign-in form", |t| t == "Sign in").await;
    let kept = page.client.execute("return sessionStorage.getItem('herald.key');", vec![]).await;
    assert_eq!(kept.expect("execute"), Value::Null);
}

async fn sign_in(page: &Page, key: &str) {
    page.client.goto(&page.base).await.expect("open /ui/");
    page.wait_text("#view-signin h2", "the sign-in form", |t| t == "Sign in").await;
    page.type_into("#signin-key", "sk_not_a_key_of_this_herald").await;
    page.click("#signin-form button[type=submit]").await;
    page.wait_text("#signin-error", "the wrong key's error", |t| t.contains("Wrong key")).await;
    page.screenshot("01-signin-wrong-key").await;
    page.type_into("#signin-key", key).await;
    page.click("#signin-form button[type=submit]").await;
    page.wait_text("#view-failures h2", "the failures list", |t| t == "Failures").await;
}

/// The four failures, newest first; returns the invoice's row selector.
async fn failures(page: &Page, scene: &Scene) -> String {
    page.wait_count("#failures-table tbody tr", 4).await;
    let first = page.visible_text("#failures-table tbody tr:first-child td:first-child").await;
    assert_eq!(first.as_deref(), Some("order.created"), "newest first");
    let row = format!("#failures-table tbody tr[data-id='{}']", scene.invoice);
    let endpoint = page.wait_text(&format!("{row} td:nth-child(2)"), "the endpoint", |_| true).await;
    assert!(endpoint.starts_with("Billing <script>window.heraldXss = 1</script>http://"), "{endpoint}");
    let status = page.wait_text(&format!("{row} td:nth-child(3)"), "the status", |_| true).await;
    assert_eq!(status, "exhausted");
    let reason = page.wait_text(&format!("{row} td:nth-child(4)"), "the reason", |_| true).await;
    assert!(reason.contains("500"), "{reason}");
    let attempts = page.wait_text(&format!("{row} td:nth-child(5)"), "the attempts", |_| true).await;
    assert_eq!(attempts, "3");
    for order in &scene.order_deliveries {
        let cell = format!("#failures-table tbody tr[data-id='{order}'] td:nth-child(3)");
        page.wait_text(&cell, "an order's status", |t| t == "inactive" || t == "exhausted").await;
    }
    // The status filter shows the API's list of that status alone.
    let exhausted = 1 + scene
        .order_deliveries
        .iter()
        .filter(|id| {
            let (_, d) =
                scene.server.call("GET", &format!("/v1/webhook_deliveries/{id}"), Some(&scene.key), None);
            d["status"] == "exhausted"
        })
        .count();
    filter_status(page, "exhausted").await;
    page.wait_count("#failures-table tbody tr", exhausted).await;
    let statuses = page.count("#failures-table tbody tr td:nth-child(3) .badge.exhausted").await;
    assert_eq!(statuses, exhausted);
    filter_status(page, "both").await;
    page.wait_count("#failures-table tbody tr", 4).await;
    // An event-type pattern, as endpoints take them.
    page.type_into("#failures-filter input[name=event_type]", "invoice.*").await;
    page.click("#failures-filter button[type=submit]").await;
    page.wait_count("#failures-table tbody tr", 1).await;
    assert_eq!(page.count(&format!("{row} td")).await, 6, "the invoice is the one left");
    page.type_into("#failures-filter input[name=event_type]", "").await;
    page.click("#failures-filter button[type=submit]").await;
    page.wait_count("#failures-table tbody tr", 4).await;
    page.screenshot("02-failures").await;
    row
}

async fn filter_status(page: &Page, status: &str) {
    let select = page.client.find(Locator::Css("#failures-filter select[name=status]")).await;
    select.expect("the status filter").select_by_value(status).await.expect("choose a status");
    page.click("#failures-filter button[type=submit]").await;
}

async fn delivery(page: &Page, scene: &Scene, row: &str) {
    page.click(&format!("{row} td:first-child a")).await;
    page.wait_text("#delivery-id", "the delivery view", |t| t == scene.invoice).await;
    page.wait_count("#attempts-table tbody tr", 3).await;
    let error =
        page.wait_text("#attempts-table tbody tr:first-child td:nth-child(5)", "a status", |_| true).await;
    assert_eq!(error, "500");
    let payload = page.wait_text("#delivery-payload", "the payload", |t| t.contains("amount")).await;
    assert!(payload.contains("<script>window.heraldXss = 2</script>"), "{payload}");
    page.screenshot("03-delivery").await;

    scene.billing.set_status(200);
    page.click("#delivery-retrigger").await;
    page.wait_text("#delivery-fields .badge", "delivered", |t| t == "delivered").await;
    page.wait_count("#attempts-table tbody tr", 4).await;
    let trigger = page.visible_text("#attempts-table tbody tr:last-child td:nth-child(2)").await;
    assert_eq!(trigger.as_deref(), Some("manual"));
    page.screenshot("04-delivery-retriggered").await;
    scene.server.wait_status(&scene.key, &scene.invoice, "delivered");
}

async fn endpoints(page: &Page) {
    page.click("#nav a[data-view=endpoints]").await;
    page.wait_count("#endpoints-table tbody tr", 2).await;
    page.wait_text("#endpoints-table tbody tr:first-child td:first-child", "Orders", |t| t == "Orders").await;
    let status =
        page.wait_text("#endpoints-table tbody tr:first-child td:nth-child(3)", "inactive", |_| true).await;
    assert!(status.starts_with("inactive"), "{status}");
    // Its failure run, from the endpoint's `failure_run`.
    assert!(status.contains("failures since the last success"), "{status}");
    page.click("#endpoints-table tbody tr:first-child button.details").await;
    page.wait_text("#endpoint-counts tbody tr", "the counts", |t| !t.is_empty()).await;
    let mut counts = Vec::new();
    for n in 1..=4 {
        let cell = page.visible_text(&format!("#endpoint-counts tbody td:nth-child({n})")).await;
        counts.push(cell.and_then(|t| t.parse::<usize>().ok()).expect("a count"));
    }
    // pending, delivered, exhausted, inactive: the three orders failed, none delivered.
    assert_eq!((counts[0], counts[1], counts[2] + counts[3]), (0, 0, 3), "{counts:?}");
    page.screenshot("05-endpoints").await;
    // Enable makes it active (its deliveries stay inactive until retriggered or recovered).
    page.click("#endpoints-table tbody tr:first-child button.enable").await;
    let row = "#endpoints-table tbody tr:first-child td:nth-child(3) .badge";
    page.wait_text(row, "the endpoint active", |t| t == "active").await;
    assert_eq!(page.count("#endpoints-table button.enable").await, 0);
}

async fn recover(page: &Page, scene: &Scene) {
    scene.orders.set_status(200);
    page.click("#nav a[data-view=recover]").await;
    page.click("#recover-form button[type=submit]").await;
    let matched = page.wait_text("#recover-matched", "the dry run's count", |t| !t.is_empty()).await;
    assert_eq!(matched, "3");
    let sample = page.count("#recover-sample li").await;
    assert_eq!(sample, 3);
    page.screenshot("06-recover-preview").await;
    page.click("#recover-confirm").await;
    page.wait_text("#recovery-state", "the recovery done", |t| t.starts_with("Done")).await;
    let counts = page.visible_text("#recovery-counts tbody tr").await.unwrap_or_default();
    page.screenshot("07-recovery-done").await;
    for id in &scene.order_deliveries {
        scene.server.wait_status(&scene.key, id, "delivered");
    }
    assert!(!counts.is_empty());
    assert!(scene.orders.received().iter().any(|r| r.status == 200));
}
