//! Who may call what over gRPC: bearer tokens in two roles. A client token
//! opens the customer-facing calls; the admin token opens those too, plus the
//! calls a service marks as admin (stock changes, dead-letter list and replay).
//! Health and reflection stay open. Without tokens configured the API is open,
//! which the runtime allows on loopback only (or with an explicit
//! `--insecure-no-auth`).
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The tokens a server accepts and the paths only the admin token opens.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub client_token: Option<String>,
    pub admin_token: Option<String>,
    pub admin_paths: HashSet<String>,
}

/// What a request may do, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Unauthenticated,
    PermissionDenied,
}

impl Policy {
    pub fn is_open(&self) -> bool {
        self.client_token.is_none() && self.admin_token.is_none()
    }

    /// The verdict on a call of `path` carrying `authorization`.
    pub fn judge(&self, path: &str, authorization: Option<&str>) -> Verdict {
        if self.is_open()
            || path.starts_with("/grpc.health.v1.")
            || path.starts_with("/grpc.reflection.")
        {
            return Verdict::Allowed;
        }
        let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Verdict::Unauthenticated;
        };
        let matches = |expected: &Option<String>| {
            expected
                .as_deref()
                .is_some_and(|e| constant_time_eq(e.as_bytes(), token.as_bytes()))
        };
        let admin = matches(&self.admin_token);
        if self.admin_paths.contains(path) {
            if admin {
                Verdict::Allowed
            } else if matches(&self.client_token) {
                Verdict::PermissionDenied
            } else {
                Verdict::Unauthenticated
            }
        } else if admin || matches(&self.client_token) {
            Verdict::Allowed
        } else {
            Verdict::Unauthenticated
        }
    }
}

/// Compares without an early exit, so timing does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The layer that applies a [`Policy`] before a request reaches its service.
#[derive(Clone)]
pub struct Authorize<S> {
    pub inner: S,
    pub policy: Arc<Policy>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let refusal = match self.policy.judge(request.uri().path(), authorization) {
            Verdict::Allowed => None,
            Verdict::Unauthenticated => Some(tonic::Status::unauthenticated(
                "a bearer token is required: send `authorization: Bearer <token>`",
            )),
            Verdict::PermissionDenied => Some(tonic::Status::permission_denied(
                "this call needs the admin token",
            )),
        };
        match refusal {
            Some(status) => Box::pin(async move { Ok(status.into_http()) }),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

/// A client's side: adds `authorization: Bearer <token>` to every call when
/// it has a token (for sagactl, the demo and the tests).
#[derive(Debug, Clone, Default)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// A token from configuration; `None` or an empty one sends nothing.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(token) => {
                Ok(Bearer(Some(format!("Bearer {token}").parse().map_err(
                    |_| anyhow::anyhow!("the token is not printable ASCII"),
                )?)))
            }
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            client_token: Some("client".into()),
            admin_token: Some("admin".into()),
            admin_paths: ["/x.v1.X/Admin".to_owned()].into(),
        }
    }

    #[test]
    fn roles_open_their_calls_and_health_stays_open() {
        let p = policy();
        assert_eq!(p.judge("/x.v1.X/Get", None), Verdict::Unauthenticated);
        assert_eq!(
            p.judge("/x.v1.X/Get", Some("Bearer nope")),
            Verdict::Unauthenticated
        );
        assert_eq!(
            p.judge("/x.v1.X/Get", Some("client")),
            Verdict::Unauthenticated
        );
        assert_eq!(
            p.judge("/x.v1.X/Get", Some("Bearer client")),
            Verdict::Allowed
        );
        assert_eq!(
            p.judge("/x.v1.X/Get", Some("Bearer admin")),
            Verdict::Allowed
        );
        assert_eq!(
            p.judge("/x.v1.X/Admin", Some("Bearer client")),
            Verdict::PermissionDenied
        );
        assert_eq!(
            p.judge("/x.v1.X/Admin", Some("Bearer admin")),
            Verdict::Allowed
        );
        assert_eq!(p.judge("/x.v1.X/Admin", None), Verdict::Unauthenticated);
        assert_eq!(
            p.judge("/grpc.health.v1.Health/Check", None),
            Verdict::Allowed
        );
        assert_eq!(
            Policy::default().judge("/x.v1.X/Admin", None),
            Verdict::Allowed
        );
    }
}
