//! The limit phase's state: GCRA rate limiters (per agent, per route, per agent×route), the
//! per-agent in-flight counter, and the metering body that counts session bytes and enforces
//! response caps while a body streams.

use axum::body::Body;
use bytes::Bytes;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body::{Frame, SizeHint};
use palisade_config::Config;
use palisade_core::PrincipalId;
use palisade_core::rate::RateLimit;
use palisade_core::session::LiveSession;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

/// A refused request: which limit, and when to retry.
#[derive(Debug)]
pub struct RateLimited {
    /// `agent`, `route` or `agent-route`.
    pub scope: &'static str,
    /// The limit that was hit.
    pub limit: RateLimit,
    /// Time until a request would be let through.
    pub retry_after: Duration,
}

/// Rate limiters and in-flight counters.
pub struct Limits {
    clock: DefaultClock,
    agents: RwLock<HashMap<PrincipalId, (RateLimit, Arc<DefaultDirectRateLimiter>)>>,
    routes: Vec<Option<(RateLimit, DefaultDirectRateLimiter)>>,
    agent_routes: Vec<Option<(RateLimit, DefaultKeyedRateLimiter<PrincipalId>)>>,
    in_flight: Mutex<HashMap<PrincipalId, Arc<AtomicU32>>>,
}

fn quota(r: RateLimit) -> Quota {
    let period = Duration::from_secs(u64::from(r.per_secs)) / r.count.max(1);
    let burst = NonZeroU32::new(r.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl Limits {
    /// Limiters for the configured routes.
    pub fn new(config: &Config) -> Self {
        Self {
            clock: DefaultClock::default(),
            agents: RwLock::default(),
            routes: config
                .routes
                .iter()
                .map(|r| r.rate_limit.map(|l| (l, RateLimiter::direct(quota(l)))))
                .collect(),
            agent_routes: config
                .routes
                .iter()
                .map(|r| {
                    r.agent_rate_limit
                        .map(|l| (l, RateLimiter::keyed(quota(l))))
                })
                .collect(),
            in_flight: Mutex::default(),
        }
    }

    fn refused(
        &self,
        scope: &'static str,
        limit: RateLimit,
        n: governor::NotUntil<<DefaultClock as governor::clock::Clock>::Instant>,
    ) -> RateLimited {
        RateLimited {
            scope,
            limit,
            retry_after: n.wait_time_from(self.clock.now()),
        }
    }

    /// Takes one request from each applicable limit: the agent across routes (`agent_limit`),
    /// the agent on the route, then the route as a whole. The shared route budget comes last, so
    /// an agent over its own limits cannot use it up for everyone else.
    pub fn check(
        &self,
        agent: &PrincipalId,
        agent_limit: Option<RateLimit>,
        route: usize,
    ) -> Result<(), RateLimited> {
        if let Some(limit) = agent_limit {
            let limiter = self.agent_limiter(agent, limit);
            limiter
                .check()
                .map_err(|n| self.refused("agent", limit, n))?;
        }
        if let Some(Some((limit, l))) = self.agent_routes.get(route) {
            l.check_key(agent)
                .map_err(|n| self.refused("agent-route", *limit, n))?;
        }
        if let Some(Some((limit, l))) = self.routes.get(route) {
            l.check().map_err(|n| self.refused("route", *limit, n))?;
        }
        Ok(())
    }

    fn agent_limiter(
        &self,
        agent: &PrincipalId,
        limit: RateLimit,
    ) -> Arc<DefaultDirectRateLimiter> {
        if let Some((l, limiter)) = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            && *l == limit
        {
            return limiter.clone();
        }
        // First request, or the agent's limit changed: a fresh limiter with the new quota.
        let mut map = self.agents.write().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(agent.clone())
            .or_insert_with(|| (limit, Arc::new(RateLimiter::direct(quota(limit)))));
        if entry.0 != limit {
            *entry = (limit, Arc::new(RateLimiter::direct(quota(limit))));
        }
        entry.1.clone()
    }

    /// Enters one request of `agent` if fewer than `max` are in flight; the slot is held until
    /// the returned guard drops (the gateway keeps it until the response body has been sent).
    pub fn enter(&self, agent: &PrincipalId, max: u32) -> Result<InFlight, u32> {
        let counter = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent.clone())
            .or_default()
            .clone();
        let now = counter.fetch_add(1, Ordering::SeqCst) + 1;
        if now > max {
            counter.fetch_sub(1, Ordering::SeqCst);
            return Err(max);
        }
        Ok(InFlight(counter))
    }
}

/// One request in flight; leaves when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An object read taken from a session's budget; given back when dropped unless the upstream
/// answered (then it counts).
pub struct ObjectRead {
    session: Arc<LiveSession>,
    route: usize,
    kept: bool,
}

impl ObjectRead {
    /// Wraps a read taken with [`LiveSession::take_object_read`].
    pub fn new(session: Arc<LiveSession>, route: usize) -> Self {
        Self {
            session,
            route,
            kept: false,
        }
    }

    /// The upstream served it: it counts.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ObjectRead {
    fn drop(&mut self) {
        if !self.kept {
            self.session.return_object_read(self.route);
        }
    }
}

/// Which session counter a metered body feeds.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// A request body: bytes the agent sends out.
    Out,
    /// A response body: bytes the agent receives.
    In,
}

/// A body that counts its bytes into the session, stops with an error once over `cap` or once
/// the session has ended (a kill cuts running streams too), and holds the request's in-flight
/// slot until it is done.
pub struct Metered {
    inner: Body,
    session: Option<Arc<LiveSession>>,
    direction: Direction,
    cap: Option<u64>,
    seen: u64,
    _slot: Option<InFlight>,
}

/// The error a metered body ends with when it crosses its cap.
#[derive(Debug, thiserror::Error)]
#[error("the body is larger than the route's limit of {0} bytes")]
pub struct OverCap(pub u64);

/// The error a metered body ends with when its session ends mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("the session ended; the stream was cut")]
pub struct SessionEnded;

impl Metered {
    /// Wraps `inner`.
    pub fn new(
        inner: Body,
        session: Option<Arc<LiveSession>>,
        direction: Direction,
        cap: Option<u64>,
        slot: Option<InFlight>,
    ) -> Self {
        Self {
            inner,
            session,
            direction,
            cap,
            seen: 0,
            _slot: slot,
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.session.as_ref().is_some_and(|s| s.is_ended()) {
                    return Poll::Ready(Some(Err(axum::Error::new(SessionEnded))));
                }
                if let Some(data) = frame.data_ref() {
                    let n = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    this.seen = this.seen.saturating_add(n);
                    if let Some(s) = &this.session {
                        match this.direction {
                            Direction::Out => s.add_bytes_out(n),
                            Direction::In => s.add_bytes_in(n),
                        }
                    }
                    if let Some(cap) = this.cap
                        && this.seen > cap
                    {
                        return Poll::Ready(Some(Err(axum::Error::new(OverCap(cap)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
