//! Identifiers: one newtype per kind of object, so a function that wants an endpoint cannot be
//! handed a delivery's id.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The id's 16 bytes, as they appear in keys (UUID v7 bytes sort by creation time).
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// The id from the 16 bytes of a key.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

id_type!(
    /// An endpoint: one receiver URL of one organisation.
    EndpointId
);
id_type!(
    /// A delivery: one event going to one endpoint (or to an inline `webhook_url`).
    DeliveryId
);
id_type!(
    /// A published event; also the `webhook-id` every attempt carries.
    EventId
);
id_type!(
    /// An organisation, chosen by whoever creates its first API key.
    OrgId
);
id_type!(
    /// An API key (its record, never the key itself).
    ApiKeyId
);
id_type!(
    /// A bulk recover: one operator request that re-queued many deliveries at once.
    RecoveryId
);
