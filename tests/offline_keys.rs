//! The offline key tools and `config check`, through the real binary: a key created or revoked
//! on a stopped server's data directory is what the restarted server accepts or refuses, and a
//! running server's directory is refused.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Server, ADMIN_KEY};

/// `herald <args>`, with no `HERALD_*` variable of the test's environment.
fn herald(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run herald")
}

fn keys(args: &[&str], data_dir: &Path) -> Output {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", data_dir.to_str().expect("a UTF-8 path")]);
    herald(&all, &[])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The status `GET path` answers with `key`.
fn status_with(server: &Server, path: &str, key: &str) -> u16 {
    server.call("GET", path, Some(key), None).0
}

#[test]
fn keys_created_and_revoked_offline_are_what_the_restarted_server_accepts() {
    let mut server = Server::start();
    let dir = server.data_dir.clone();
    assert_eq!(status_with(&server, "/v1/api_keys", ADMIN_KEY), 200);

    // A running server holds the directory: refused, saying so.
    let out = keys(&["list"], &dir);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use by another herald process"), "{}", stderr(&out));

    assert!(server.terminate(), "the server did not stop cleanly");
    let out = keys(&["create", "--admin"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let new_admin = stdout(&out).trim().to_owned();
    assert!(new_admin.starts_with("sk_") && !new_admin.contains(char::is_whitespace), "{new_admin:?}");
    assert_eq!(stdout(&out).lines().count(), 1, "the key alone on stdout");
    assert!(!stderr(&out).contains(&new_admin), "the key in a message line: {}", stderr(&out));
    let org = uuid::Uuid::now_v7().to_string();
    let out = keys(&["create", "--org", &org, "--scopes", "endpoints.read", "--name", "ops"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let org_key = stdout(&out).trim().to_owned();

    let out = keys(&["list"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed = stdout(&out);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(!listed.contains(&new_admin) && !listed.contains(&org_key), "{listed}");
    let line = listed
        .lines()
        .find(|l| l.contains("name=\"admin (herald keys create)\""))
        .unwrap_or_else(|| panic!("no new admin key in {listed}"));
    assert!(line.contains(" org=admin scopes=admin ") && line.ends_with(" revoked=-"), "{line}");
    let new_admin_id = line.split(' ').next().expect("an id").to_owned();
    assert!(listed.contains(&format!(" org={org} scopes=endpoints.read name=\"ops\" ")), "{listed}");

    server.restart();
    assert_eq!(status_with(&server, "/v1/api_keys", &new_admin), 200);
    assert_eq!(status_with(&server, "/v1/endpoints", &org_key), 200);
    assert_eq!(status_with(&server, "/v1/api_keys", &org_key), 403);

    assert!(server.terminate(), "the server did not stop cleanly");
    let out = keys(&["revoke", &new_admin_id], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("revoked API key {new_admin_id} ")), "{}", stderr(&out));
    let again = keys(&["revoke", &new_admin_id], &dir);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("is already revoked"), "{}", stderr(&again));
    let unknown = keys(&["revoke", &uuid::Uuid::now_v7().to_string()], &dir);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
    let bad_scope = keys(&["create", "--org", &org, "--scopes", "events.write,root"], &dir);
    assert_eq!(bad_scope.status.code(), Some(2), "{}", stderr(&bad_scope));
    assert!(stderr(&bad_scope).contains("\"root\" is not a scope"), "{}", stderr(&bad_scope));
    let bad_org = keys(&["create", "--org", "acme", "--scopes", "events.write"], &dir);
    assert_eq!(bad_org.status.code(), Some(2), "{}", stderr(&bad_org));
    let verified = herald(&["verify", "--data-dir", dir.to_str().expect("a UTF-8 path")], &[]);
    assert!(verified.status.success(), "{}{}", stdout(&verified), stderr(&verified));

    server.restart();
    assert_eq!(status_with(&server, "/v1/api_keys", &new_admin), 401);
    assert_eq!(status_with(&server, "/v1/api_keys", ADMIN_KEY), 200);
}

#[test]
fn config_check_reports_every_problem() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[server]\nlisten = \"nowhere\"\n[delivery]\nmax_in_flight_total = 0\n")
        .expect("write");
    let path = file.to_str().expect("a UTF-8 path");
    let out = herald(&["config", "check", "--config", path], &[("HERALD_RETRIGGER_WINDOW", "0s")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let expected = [
        format!("config file {path}: server.listen: invalid address \"nowhere\": expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\""),
        format!("config file {path}: delivery.max_in_flight_total: must be at least 1"),
        "environment variable HERALD_RETRIGGER_WINDOW (retrigger.window): must be longer than 0s".to_owned(),
    ];
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), expected);
    assert!(stderr(&out).contains("3 problems in the configuration"), "{}", stderr(&out));

    std::fs::write(&file, herald_server::config::DEFAULT_TOML).expect("write");
    let out = herald(&["config", "check", "--config", path], &[]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "ok\n".to_owned()), "{}", stderr(&out));
    let out = herald(&["config", "check"], &[]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "ok\n".to_owned()), "{}", stderr(&out));
}
