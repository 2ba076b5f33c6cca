//! Folds the API key events: a key created, a key revoked.

use super::{ApplyError, Fold};
use crate::codec;
use crate::event::Scope;
use crate::ids::{ApiKeyId, OrgId};
use crate::keys;
use crate::model::ApiKey;
use crate::query;
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    pub(super) fn api_key_created(
        &mut self,
        id: ApiKeyId,
        org_id: Option<OrgId>,
        scopes: &[Scope],
        name: &str,
        key_hash: &[u8; 32],
    ) -> Result<(), ApplyError> {
        if query::get_api_key(self.t, id)?.is_some() {
            return Err(ApplyError::AlreadyExists { kind: "api key", id: id.0 });
        }
        if let Some(taken) = query::get_api_key_by_hash(self.t, key_hash)? {
            return Err(ApplyError::ApiKeyHashTaken { id: taken.id });
        }
        let key = ApiKey {
            id,
            org_id,
            scopes: scopes.to_vec(),
            name: name.to_string(),
            key_hash: *key_hash,
            created_at_ms: self.at_ms,
            revoked_at_ms: None,
        };
        self.t.put(keys::api_key(id), codec::to_bytes(&key));
        self.t.put(keys::api_key_by_hash(key_hash), id.as_bytes().to_vec());
        Ok(())
    }

    pub(super) fn api_key_revoked(&mut self, id: ApiKeyId) -> Result<(), ApplyError> {
        let mut key = query::get_api_key(self.t, id)?.ok_or(ApplyError::UnknownApiKey(id))?;
        if key.revoked_at_ms.is_some() {
            return Err(ApplyError::ApiKeyAlreadyRevoked(id));
        }
        key.revoked_at_ms = Some(self.at_ms);
        self.t.put(keys::api_key(id), codec::to_bytes(&key));
        self.t.delete(&keys::api_key_by_hash(&key.key_hash));
        Ok(())
    }
}
