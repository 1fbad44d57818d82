//! Every route the server answers, in one table: the router is built from it (each route's
//! handler is chosen by an exhaustive `match` in `handlers`) and the HTTP metrics label
//! requests from it, so a route cannot be served without being counted under its own name.
//! Requests that reach a route of the embedder's own
//! ([`NetworkModule::with_routes`](crate::network::NetworkModule::with_routes)) are
//! `embedder`; any other path is `unmatched`, which keeps scanners from creating labels.

/// One route of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Root,
    Health,
    Live,
    Ready,
    WebSocket,
    Sync,
    Metrics,
}

impl Route {
    /// Every route, in the order of their metric slots.
    pub(crate) const ALL: [Self; 7] = [
        Self::Root,
        Self::Health,
        Self::Live,
        Self::Ready,
        Self::WebSocket,
        Self::Sync,
        Self::Metrics,
    ];

    /// The label of requests that matched no route.
    pub(crate) const UNMATCHED: &'static str = "unmatched";
    /// The label of requests served by a route of the embedder's own.
    pub(crate) const EMBEDDER: &'static str = "embedder";
    /// The metric slot of requests served by a route of the embedder's own.
    pub(crate) const EMBEDDER_SLOT: usize = Self::ALL.len() + 1;
    /// Metric slots: every route, `unmatched`, `embedder`.
    pub(crate) const SLOTS: usize = Self::ALL.len() + 2;

    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Root => "/",
            Self::Health => "/health",
            Self::Live => "/health/live",
            Self::Ready => "/health/ready",
            Self::WebSocket => "/ws",
            Self::Sync => "/sync",
            Self::Metrics => "/metrics",
        }
    }

    /// The metric slot of a request path: its route's position in [`ALL`](Self::ALL), or
    /// `ALL.len()` for a path no route matches.
    pub(crate) fn slot(path: &str) -> usize {
        Self::ALL.iter().position(|route| route.path() == path).unwrap_or(Self::ALL.len())
    }

    /// The label of a metric slot.
    pub(crate) fn slot_name(slot: usize) -> &'static str {
        match Self::ALL.get(slot) {
            Some(route) => route.path(),
            None if slot == Self::EMBEDDER_SLOT => Self::EMBEDDER,
            None => Self::UNMATCHED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_own_slot_and_others_share_unmatched() {
        for (slot, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(Route::slot(route.path()), slot);
            assert_eq!(Route::slot_name(slot), route.path());
        }
        assert_eq!(Route::slot_name(Route::slot("/wp-admin")), "unmatched");
        assert_eq!(Route::slot_name(Route::EMBEDDER_SLOT), "embedder");
        assert_eq!(Route::SLOTS, Route::EMBEDDER_SLOT + 1);
    }
}
