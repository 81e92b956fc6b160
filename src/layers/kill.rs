//! Kill switch: with AI disabled for a route (config `ai_enabled = false` or
//! `POST /admin/routes/{name}/ai`), the request goes straight to the fallback chain with
//! `ai_disabled` and no AI service is called. The lever for an emergency patch.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{ProxyRequest, ProxyResponse};

/// The route's AI switch: the config value plus an admin override that holds until the
/// config itself changes `ai_enabled`.
#[derive(Debug)]
pub struct AiSwitch {
    configured: bool,
    /// 0 = follow config, 1 = forced on, 2 = forced off.
    admin: AtomicU8,
}

impl AiSwitch {
    pub fn new(configured: bool) -> Arc<Self> {
        Arc::new(AiSwitch {
            configured,
            admin: AtomicU8::new(0),
        })
    }

    /// Carries an admin override into a new config generation unless the config changed
    /// the switch itself.
    pub fn carried_over(old: &AiSwitch, configured: bool) -> Arc<Self> {
        let next = AiSwitch::new(configured);
        if old.configured == configured {
            next.admin
                .store(old.admin.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        next
    }

    pub fn enabled(&self) -> bool {
        match self.admin.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.configured,
        }
    }

    pub fn set(&self, enabled: bool) {
        self.admin
            .store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn overridden(&self) -> bool {
        self.admin.load(Ordering::Relaxed) != 0
    }
}

#[derive(Clone, Debug)]
pub struct KillSwitchLayer {
    switch: Arc<AiSwitch>,
}

impl KillSwitchLayer {
    pub fn new(switch: Arc<AiSwitch>) -> Self {
        KillSwitchLayer { switch }
    }
}

impl<S> Layer<S> for KillSwitchLayer {
    type Service = KillSwitch<S>;
    fn layer(&self, inner: S) -> KillSwitch<S> {
        KillSwitch {
            inner,
            switch: self.switch.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct KillSwitch<S> {
    inner: S,
    switch: Arc<AiSwitch>,
}

impl<S> Service<ProxyRequest> for KillSwitch<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        if !self.switch.enabled() {
            return Box::pin(std::future::ready(Err(ErrorKind::AiDisabled.into())));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::test_request;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test]
    async fn disabled_switch_never_calls_the_inner_service() {
        let (mock, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
        let switch = AiSwitch::new(true);
        let svc = KillSwitchLayer::new(switch.clone())
            .layer(mock.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
        switch.set(false);
        let err = svc
            .clone()
            .oneshot(test_request(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert!(matches!(err.kind, ErrorKind::AiDisabled));
        handle.allow(1);
        assert!(futures_util::FutureExt::now_or_never(handle.next_request()).is_none());
    }

    #[test]
    fn admin_override_survives_a_reload_until_config_changes_it() {
        let old = AiSwitch::new(true);
        old.set(false);
        assert!(!AiSwitch::carried_over(&old, true).enabled());
        // The config itself now says false -> true: config wins.
        let flipped = AiSwitch::new(false);
        flipped.set(true);
        assert!(!AiSwitch::carried_over(&flipped, true).overridden());
    }
}
