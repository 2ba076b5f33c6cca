//! `keys`: the API keys of a stopped server's data directory. [`create_key`] makes one (an admin
//! key is the way back from a lost one), [`list_keys`] lists them (never a secret or its hash),
//! [`revoke_key`] revokes one. A change is a command of the engine's ([`Command::CreateApiKey`],
//! [`Command::RevokeApiKey`]) run by its command machine on the log, so it is validated as the
//! API validates it and written as a record like any other (`herald replay` and `verify` see it).
//! The record names no actor: the log does not keep who acted yet, and the command runs as
//! [`Actor::admin`].
//!
//! The engine itself is not opened: its dispatcher would start sending due deliveries, and it
//! would record the configuration's policy, neither of which a key change should do.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_engine::{Actor, Command, CommandError, CommandLimits, Commands, Submitted};
use herald_log::{Log, LogConfig, SledStore};
use herald_projector::{
    get_api_key, list_api_keys, ApiKey, ApiKeyId, CheckedTables, CorruptValue, OrgId, RebuildError, Scope,
};
use uuid::Uuid;

use super::{now_ms, open_existing, ts, OfflineError};

use herald_server::generate_key;
pub use herald_server::key_hash;
pub use herald_server::KEY_PREFIX;
/// Keys read per page while listing.
const LIST_PAGE: usize = 1000;

/// What is wrong with a key tool's arguments or its subject: the `herald` binary exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// A scope name that is not one of [`Scope::ALL`]'s.
    UnknownScope(String),
    /// An organisation's key needs at least one scope.
    NoScopes,
    /// Not a UUID: what it should have been the id of, and the text.
    BadId { what: &'static str, text: String },
    /// No key has this id.
    NoSuchKey(ApiKeyId),
    /// The key is revoked already, at this time (unix milliseconds).
    AlreadyRevoked { id: ApiKeyId, at_ms: u64 },
    /// The engine's command refused it (a name too long, ...).
    Refused(CommandError),
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::UnknownScope(name) => {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
                write!(f, "{name:?} is not a scope; the scopes are {}", known.join(", "))
            }
            KeyProblem::NoScopes => {
                write!(f, "an organisation's key needs at least one scope (--scopes a,b)")
            }
            KeyProblem::BadId { what, text } => write!(f, "{text:?} is not {what} (a UUID)"),
            KeyProblem::NoSuchKey(id) => write!(f, "no API key {id} in this data directory"),
            KeyProblem::AlreadyRevoked { id, at_ms } => {
                write!(f, "API key {id} is already revoked (at {})", ts(*at_ms))
            }
            KeyProblem::Refused(e) => write!(f, "refused: {e}"),
        }
    }
}

/// Scope names separated by commas (`events.write,deliveries.read`), each once, in their order.
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, OfflineError> {
    let mut scopes = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let scope = Scope::from_name(name).ok_or_else(|| KeyProblem::UnknownScope(name.to_owned()))?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(KeyProblem::NoScopes.into());
    }
    Ok(scopes)
}

fn parse_uuid(text: &str, what: &'static str) -> Result<Uuid, OfflineError> {
    herald_server::parse_id(text).ok_or_else(|| KeyProblem::BadId { what, text: text.to_owned() }.into())
}

/// An organisation's id.
pub fn parse_org_id(text: &str) -> Result<OrgId, OfflineError> {
    parse_uuid(text, "an organisation id").map(OrgId)
}

/// An API key's id (as `herald keys list` shows it).
pub fn parse_key_id(text: &str) -> Result<ApiKeyId, OfflineError> {
    parse_uuid(text, "an API key id").map(ApiKeyId)
}

/// Whose key [`create_key`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOwner {
    /// An admin key: every organisation, the `admin` scope.
    Admin,
    /// A key of one organisation, with these scopes (at least one).
    Org { org_id: OrgId, scopes: Vec<Scope> },
}

/// The key [`create_key`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCreateOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    pub owner: KeyOwner,
    pub name: String,
}

impl KeyCreateOptions {
    /// An admin key.
    pub fn admin(data_dir: PathBuf) -> KeyCreateOptions {
        KeyCreateOptions { data_dir, owner: KeyOwner::Admin, name: "admin (herald keys create)".into() }
    }

    /// A key of organisation `org_id` with `scopes`.
    pub fn org(data_dir: PathBuf, org_id: OrgId, scopes: Vec<Scope>) -> KeyCreateOptions {
        let owner = KeyOwner::Org { org_id, scopes };
        KeyCreateOptions { data_dir, owner, name: "herald keys create".into() }
    }
}

/// A key [`create_key`] made: `key` is the secret, which herald keeps only as a hash (show it
/// once), and `stored` the key as the store holds it. Its `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyCreated {
    pub key: String,
    pub stored: ApiKey,
}

impl fmt::Debug for KeyCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCreated").field("key", &"<shown once>").field("stored", &self.stored).finish()
    }
}

impl fmt::Display for KeyCreated {
    /// What was created, without the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "created API key {}; the key is shown once, on stdout", Line(&self.stored))
    }
}

/// What [`list_keys`] and [`revoke_key`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
}

/// What [`revoke_key`] revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRevokeOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    pub id: ApiKeyId,
}

/// A stored key as one line, everything but its hash: `<id> org=<org id or admin> scopes=a,b
/// name="..." created=<time> revoked=<time or ->`.
struct Line<'a>(&'a ApiKey);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        let org = k.org_id.map_or_else(|| "admin".to_owned(), |o| o.to_string());
        let scopes: Vec<&str> = k.scopes.iter().map(|s| s.name()).collect();
        let revoked = k.revoked_at_ms.map_or_else(|| "-".to_owned(), ts);
        write!(
            f,
            "{} org={org} scopes={} name={:?} created={} revoked={revoked}",
            k.id,
            scopes.join(","),
            k.name,
            ts(k.created_at_ms)
        )
    }
}

/// Every key of a data directory as stored, by id (so by creation time). Its `Display` shows
/// one line a key (a line saying so when there is none), never a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
}

impl fmt::Display for KeyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.keys.is_empty() {
            return writeln!(f, "no API keys");
        }
        self.keys.iter().try_for_each(|k| writeln!(f, "{}", Line(k)))
    }
}

/// The key [`revoke_key`] revoked, as it is now stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRevoked {
    pub stored: ApiKey,
}

impl fmt::Display for KeyRevoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revoked API key {}", Line(&self.stored))
    }
}

/// The data directory opened to run key commands: the store checked and converted as
/// `herald serve` would before writing, and the engine's command machine on its log.
fn open_for_commands(dir: &Path) -> Result<(Arc<SledStore>, Log<Commands>), OfflineError> {
    let store = open_existing(dir)?;
    let rules = read(&store, |t| herald_projector::rules(t))?;
    if rules > herald_projector::RULES_CURRENT {
        return Err(OfflineError::NewerRules { rules });
    }
    let (applied, last) = herald_projector::projection_lag(store.as_ref()).map_err(OfflineError::Rebuild)?;
    if applied != last {
        return Err(OfflineError::ProjectionBehind { applied, last });
    }
    herald_projector::compact::drop_legacy(store.clone()).map_err(OfflineError::Compact)?;
    herald_log::upgrade_format(store.as_ref()).map_err(OfflineError::Log)?;
    let machine = Commands::new(CommandLimits::default());
    let log = Log::open(store.clone(), machine, LogConfig::default()).map_err(OfflineError::Log)?;
    Ok((store, log))
}

/// Runs `command` as [`Actor::admin`], durably, then closes the log.
fn execute(log: &Log<Commands>, command: Command) -> Result<(), OfflineError> {
    let submitted = Submitted { actor: Actor::admin(), at_ms: now_ms(), command, request: None };
    let outcome = log.submit(submitted);
    log.close();
    match outcome.map_err(OfflineError::Log)? {
        Ok(_) => Ok(()),
        Err(CommandError::Internal { message }) => Err(OfflineError::Command(message)),
        Err(e) => Err(KeyProblem::Refused(e).into()),
    }
}

/// Runs a query of the stored projection.
fn read<T>(
    store: &SledStore,
    query: impl FnOnce(&CheckedTables<'_>) -> Result<T, CorruptValue>,
) -> Result<T, OfflineError> {
    CheckedTables::run(store, query)
        .map_err(|e| OfflineError::Log(e.into()))?
        .map_err(|e| OfflineError::Rebuild(RebuildError::Projection(e)))
}

/// Creates a key on a stopped server's data directory and returns it (the only time its secret
/// is known).
pub fn create_key(options: &KeyCreateOptions) -> Result<KeyCreated, OfflineError> {
    let (org_id, scopes) = match &options.owner {
        KeyOwner::Admin => (None, vec![Scope::Admin]),
        KeyOwner::Org { org_id, scopes } => (Some(*org_id), scopes.clone()),
    };
    let (store, log) = open_for_commands(&options.data_dir)?;
    let key = generate_key().map_err(OfflineError::Random)?;
    let id = ApiKeyId(Uuid::now_v7());
    execute(
        &log,
        Command::CreateApiKey { id, org_id, scopes, name: options.name.clone(), key_hash: key_hash(&key) },
    )?;
    let stored = read(&store, |t| get_api_key(t, id))?.ok_or(KeyProblem::NoSuchKey(id))?;
    Ok(KeyCreated { key, stored })
}

/// Every key of a stopped server's data directory.
pub fn list_keys(options: &KeysOptions) -> Result<KeyList, OfflineError> {
    let store = open_existing(&options.data_dir)?;
    let mut keys = Vec::new();
    let mut after = None;
    loop {
        let page = read(&store, |t| list_api_keys(t, after, LIST_PAGE))?;
        keys.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(KeyList { keys }),
        }
    }
}

/// Revokes a live key on a stopped server's data directory.
pub fn revoke_key(options: &KeyRevokeOptions) -> Result<KeyRevoked, OfflineError> {
    let id = options.id;
    let (store, log) = open_for_commands(&options.data_dir)?;
    match read(&store, |t| get_api_key(t, id))? {
        None => return Err(KeyProblem::NoSuchKey(id).into()),
        Some(ApiKey { revoked_at_ms: Some(at_ms), .. }) => {
            return Err(KeyProblem::AlreadyRevoked { id, at_ms }.into())
        }
        Some(_) => {}
    }
    execute(&log, Command::RevokeApiKey { id })?;
    let stored = read(&store, |t| get_api_key(t, id))?.ok_or(KeyProblem::NoSuchKey(id))?;
    Ok(KeyRevoked { stored })
}
