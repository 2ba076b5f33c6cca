//! The `Auth<S, F>` extractor: a handler that names it in its arguments runs only for a live key
//! with the scope `S`, under its rate, and is refused in the error shape `F` otherwise.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use herald_engine::Scope;

use super::{authenticate, Principal};
use crate::error::{ApiError, Family};
use crate::state::AppState;

/// A scope a route requires, as a type: `Auth<scope::EventsWrite>`.
pub trait RequiredScope {
    /// The scope the key must hold (`admin` holds them all).
    const SCOPE: Scope;

    /// What the route asks of the caller beyond the scope; nothing unless a marker says so.
    fn admits(_who: &Principal, _family: Family) -> Result<(), ApiError> {
        Ok(())
    }
}

/// The error shape a route refuses in, as a type: [`Named`] (the default) or [`Plain`].
pub trait ErrorShape {
    const FAMILY: Family;
}

/// Refusals as `{"name", "error", "status"}`: the native routes and seed 002.
pub struct Named;

/// Refusals as `{"error"}`: the routes of seeds 000 and 001.
pub struct Plain;

impl ErrorShape for Named {
    const FAMILY: Family = Family::Named;
}

impl ErrorShape for Plain {
    const FAMILY: Family = Family::Plain;
}

/// The markers of [`RequiredScope`], one per scope, and [`scope::AdminOfNoOrg`] for the routes
/// over every organisation.
pub mod scope {
    use super::*;

    macro_rules! scopes {
        ($($marker:ident),*) => {$(
            #[doc = concat!("The scope [`Scope::", stringify!($marker), "`].")]
            pub struct $marker;

            impl RequiredScope for $marker {
                const SCOPE: Scope = Scope::$marker;
            }
        )*};
    }

    // `Admin` is that scope held by a key of any organisation; see [`AdminOfNoOrg`].
    scopes! { EventsWrite, EndpointsRead, EndpointsWrite, DeliveriesRead, DeliveriesWrite, TasksWebhooksRead, Admin }

    /// An admin key of no organisation: the routes over every organisation (API keys, the
    /// audit log) refuse an organisation's key even when it holds the `admin` scope, as a missing
    /// scope, so it never sees nor changes another organisation's keys or records.
    pub struct AdminOfNoOrg;

    impl RequiredScope for AdminOfNoOrg {
        const SCOPE: Scope = Scope::Admin;

        fn admits(who: &Principal, family: Family) -> Result<(), ApiError> {
            match who.org_id {
                Some(_) => {
                    Err(ApiError::forbidden(family, "this route needs an admin key of no organisation"))
                }
                None => Ok(()),
            }
        }
    }
}

/// The caller, authenticated for the scope `S` (see [`authenticate`]); refused in the shape `F`.
/// It derefs to its [`Principal`].
pub struct Auth<S, F = Named> {
    who: Principal,
    marker: PhantomData<fn() -> (S, F)>,
}

impl<S, F> Deref for Auth<S, F> {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.who
    }
}

impl<S: RequiredScope, F: ErrorShape> FromRequestParts<Arc<AppState>> for Auth<S, F> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let who = authenticate(state, &parts.headers, F::FAMILY, S::SCOPE)?;
        S::admits(&who, F::FAMILY)?;
        Ok(Auth { who, marker: PhantomData })
    }
}
