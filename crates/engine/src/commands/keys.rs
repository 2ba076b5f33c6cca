//! The API key commands (admin only): create a key, revoke one.

use herald_projector::{get_api_key, ApiKeyId, Event, OrgId, Scope};

use super::{check_name, invalid, CommandError, Reply, Run};

impl Run<'_, '_> {
    pub(super) fn create_api_key(
        &mut self,
        id: ApiKeyId,
        org_id: Option<OrgId>,
        scopes: Vec<Scope>,
        name: String,
        key_hash: [u8; 32],
    ) -> Result<Reply, CommandError> {
        self.admin_only("api_keys")?;
        if scopes.is_empty() {
            return Err(invalid("scopes", "at least one scope"));
        }
        check_name(&name)?;
        self.events.push(Event::ApiKeyCreated { id, org_id, scopes, name, key_hash });
        Ok(Reply::Done)
    }

    pub(super) fn revoke_api_key(&mut self, id: ApiKeyId) -> Result<Reply, CommandError> {
        self.admin_only("api_keys")?;
        match get_api_key(&self.read(), id)? {
            Some(k) if k.revoked_at_ms.is_none() => {}
            _ => return Err(CommandError::NotFound { what: "api key", id: id.to_string() }),
        }
        self.events.push(Event::ApiKeyRevoked { id });
        Ok(Reply::Done)
    }
}
