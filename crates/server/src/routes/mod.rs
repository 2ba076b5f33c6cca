//! The handlers, one module per route family.

pub mod api_keys;
pub mod deliveries;
pub mod endpoints;
pub mod events;
pub mod ops;
pub mod recover;
pub mod seeds;

use herald_engine::OrgId;

use crate::auth::Principal;
use crate::error::{ApiError, Family};
use crate::state::AppState;
use crate::util::parse_id;

/// Organisations an admin's list walks at most when it names none; past that it must name one.
pub const ADMIN_LIST_ORGS_MAX: usize = 64;

/// The organisation a list is scoped to: the key's own, or for an admin key the `org_id` given,
/// or `None` (every organisation) for an admin key that gives none.
pub fn list_scope(family: Family, who: &Principal, given: Option<&str>) -> Result<Option<OrgId>, ApiError> {
    match (who.org_id, given) {
        (None, None) => Ok(None),
        _ => org_of(family, who, given).map(Some),
    }
}

/// The organisations a list of `scope` walks: the one, or every one that has deliveries (at
/// most [`ADMIN_LIST_ORGS_MAX`]; past that the caller must name one).
pub fn scope_orgs(state: &AppState, family: Family, scope: Option<OrgId>) -> Result<Vec<OrgId>, ApiError> {
    if let Some(org) = scope {
        return Ok(vec![org]);
    }
    let orgs = state
        .engine
        .read(|t| herald_engine::delivery_orgs(t, ADMIN_LIST_ORGS_MAX))
        .map_err(|e| ApiError::from_read(family, e))?;
    if orgs.len() > ADMIN_LIST_ORGS_MAX {
        return Err(ApiError::validation(
            family,
            "org_id",
            format!(
                "required with an admin key once over {ADMIN_LIST_ORGS_MAX} organisations have deliveries"
            ),
        ));
    }
    Ok(orgs)
}

/// The organisation a request acts for: the key's own, or for an admin key the `org_id` given.
pub fn org_of(family: Family, who: &Principal, given: Option<&str>) -> Result<OrgId, ApiError> {
    let given = match given {
        Some(text) => Some(
            parse_id(text)
                .map(OrgId)
                .ok_or_else(|| ApiError::validation(family, "org_id", "must be a UUID"))?,
        ),
        None => None,
    };
    match (who.org_id, given) {
        (Some(own), None) => Ok(own),
        (Some(own), Some(g)) if g == own => Ok(own),
        (Some(_), Some(_)) => {
            Err(ApiError::validation(family, "org_id", "a key may act only for its own organisation"))
        }
        (None, Some(g)) => Ok(g),
        (None, None) => Err(ApiError::validation(family, "org_id", "required with an admin key")),
    }
}
