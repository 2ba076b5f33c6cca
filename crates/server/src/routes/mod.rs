//! The handlers, one module per route family.

pub mod api_keys;
pub mod deliveries;
pub mod endpoints;
pub mod events;
pub mod ops;
pub mod seeds;

use herald_projector::OrgId;

use crate::auth::Principal;
use crate::error::{ApiError, Family};
use crate::util::parse_id;

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
