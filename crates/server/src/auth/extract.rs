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
        if state.keys.stale() {
            state.keys.refresh().await;
        }
        let who = match authenticate(state, &parts.headers, F::FAMILY, S::SCOPE) {
            // Keys followed from elsewhere (cluster mode): one just created through another
            // node may not have arrived yet; catch up once before refusing.
            Err(e)
                if e.status == axum::http::StatusCode::UNAUTHORIZED
                    && state.keys.refreshable()
                    && super::bearer_key(&parts.headers).is_some() =>
            {
                state.keys.refresh().await;
                authenticate(state, &parts.headers, F::FAMILY, S::SCOPE)?
            }
            other => other?,
        };
        S::admits(&who, F::FAMILY)?;
        Ok(Auth { who, marker: PhantomData })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use herald_engine::{Actor, ApiKeyId, Command, Engine, OrgId};

    use super::*;
    use crate::auth::tests::with_an_engine::{bearer, engine};
    use crate::auth::{generate_key, key_hash};

    /// A key of `org_id` (`None`: of no organisation) with `scopes`.
    fn key(engine: &Engine, org_id: Option<OrgId>, scopes: Vec<Scope>) -> String {
        let key = generate_key().unwrap();
        let id = ApiKeyId(uuid::Uuid::now_v7());
        let create =
            Command::CreateApiKey { id, org_id, scopes, name: "extractor".into(), key_hash: key_hash(&key) };
        engine.execute_blocking(Actor::admin(), create).unwrap();
        key
    }

    /// What `Auth<S, F>` makes of a request with `headers`.
    fn extract<S: RequiredScope, F: ErrorShape>(
        state: &Arc<AppState>,
        headers: axum::http::HeaderMap,
    ) -> Result<Principal, ApiError> {
        let mut request = Request::new(());
        *request.headers_mut() = headers;
        let (mut parts, ()) = request.into_parts();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(Auth::<S, F>::from_request_parts(&mut parts, state)).map(|auth| auth.who)
    }

    #[test]
    fn the_extractor_refuses_as_authenticate_does_in_the_routes_family() {
        let engine = engine();
        let state = Arc::new(AppState::new(engine.clone(), &crate::config::Config::default()));
        let org = OrgId(uuid::Uuid::now_v7());
        let org_admin = bearer(&key(&engine, Some(org), vec![Scope::Admin]));
        let admin = bearer(&key(&engine, None, vec![Scope::Admin]));
        let writer = bearer(&key(&engine, Some(org), vec![Scope::EventsWrite]));

        let who = extract::<scope::EventsWrite, Named>(&state, writer.clone()).unwrap();
        assert_eq!(who.org_id, Some(org));
        let lacks = extract::<scope::DeliveriesRead, Plain>(&state, writer.clone()).unwrap_err();
        assert_eq!(lacks, authenticate(&state, &writer, Family::Plain, Scope::DeliveriesRead).unwrap_err());
        assert_eq!(lacks.family, Family::Plain);
        let nobody = extract::<scope::EventsWrite, Named>(&state, Default::default()).unwrap_err();
        assert_eq!(nobody, ApiError::unauthorized(Family::Named));

        // An organisation's admin key holds every scope, but not the routes over every organisation.
        assert!(extract::<scope::Admin, Named>(&state, org_admin.clone()).is_ok());
        let refused = extract::<scope::AdminOfNoOrg, Named>(&state, org_admin).unwrap_err();
        assert_eq!(
            refused,
            ApiError::forbidden(Family::Named, "this route needs an admin key of no organisation")
        );
        assert_eq!(extract::<scope::AdminOfNoOrg, Named>(&state, admin).unwrap().org_id, None);
        engine.shutdown();
    }
}
