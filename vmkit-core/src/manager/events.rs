//! Reading and following the event log.
//!
//! The manager stores every event (numbered by `seq`, one past the last) before it
//! broadcasts it. Broadcasts of different VMs' events can cross, and a slow
//! subscriber can fall behind the broadcast, so the broadcast alone loses events;
//! an [`EventFeed`] takes its events from the store and uses the broadcast only to
//! learn that there are new ones.

use std::collections::VecDeque;

use tokio::sync::broadcast::{self, error::RecvError};

use super::Manager;
use crate::error::ManagerError;
use crate::event::Event;

/// How many stored events a feed reads at a time while it catches up.
const PAGE: usize = 500;

impl Manager {
    /// Live events as they are stored. The broadcast alone can skip events (see
    /// [`EventFeed`]); [`Manager::follow_events`] does not.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Up to `limit` stored events with `seq > after`, oldest first.
    /// [`ManagerError::HistoryTrimmed`] when the event after `after` is no longer
    /// kept (the retention rule removed it): the caller would miss events.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, ManagerError> {
        let events = self.inner.backends.store.events(after, limit).await?;
        // Stored numbers are consecutive, so a gap after `after` is what was trimmed.
        match events.first() {
            Some(first) if first.seq > after.saturating_add(1) => {
                Err(ManagerError::HistoryTrimmed {
                    after,
                    first: first.seq,
                })
            }
            _ => Ok(events),
        }
    }

    /// The number of the newest stored event; 0 when there is none.
    pub async fn last_event_seq(&self) -> Result<u64, ManagerError> {
        Ok(self.inner.backends.store.last_event_seq().await?)
    }

    /// The number of the oldest stored event, where the kept history starts (the
    /// retention rule, [`ManagerConfig::event_retention`](crate::ManagerConfig),
    /// removed those before it); one past [`Manager::last_event_seq`] when there is
    /// none.
    pub async fn first_event_seq(&self) -> Result<u64, ManagerError> {
        Ok(self.inner.backends.store.first_event_seq().await?)
    }

    /// The newest `limit` stored events, oldest first.
    pub async fn newest_events(&self, limit: usize) -> Result<Vec<Event>, ManagerError> {
        let last = self.last_event_seq().await?;
        let count = u64::try_from(limit).unwrap_or(u64::MAX);
        let first = self.first_event_seq().await?;
        let after = last.saturating_sub(count).max(first.saturating_sub(1));
        // Read without the gap check: fewer than `limit` may be kept, and an event
        // trimmed meanwhile only shortens the answer.
        Ok(self.inner.backends.store.events(after, limit).await?)
    }

    /// Follows the event log from after `after` (0: from the first event): the
    /// stored events first, then new ones as they are stored, each exactly once and
    /// in `seq` order. It subscribes at once, so nothing stored from now on is
    /// missed, however long the caller waits before reading. If the events after
    /// its cursor are no longer kept (`after` is older than the kept history, or the
    /// feed fell that far behind), [`EventFeed::next`] fails with
    /// [`ManagerError::HistoryTrimmed`] rather than skip them.
    pub fn follow_events(&self, after: u64) -> EventFeed {
        EventFeed {
            manager: self.clone(),
            live: self.subscribe(),
            cursor: after,
            backlog: VecDeque::new(),
            behind: true,
        }
    }
}

/// Every event after a cursor, in order, each once: made by
/// [`Manager::follow_events`].
///
/// It reads the store page by page until it has caught up, then takes live events
/// while each is the one after the last it returned. An event whose number is
/// further ahead (the broadcasts of two VMs' events crossed) or a broadcast it fell
/// behind on sends it back to the store for the missing ones; events it has already
/// returned are dropped.
#[derive(Debug)]
pub struct EventFeed {
    manager: Manager,
    live: broadcast::Receiver<Event>,
    /// The number of the last event taken, from the store or the broadcast.
    cursor: u64,
    /// Events read from the store and not yet returned.
    backlog: VecDeque<Event>,
    /// The store may hold events after `cursor` that the broadcast will not bring.
    behind: bool,
}

impl EventFeed {
    /// The next event, waiting for one to be stored if need be; `None` once the
    /// manager is gone. A failed read of the store leaves the feed where it was:
    /// calling again retries. Cancel-safe: a dropped call loses no event.
    pub async fn next(&mut self) -> Result<Option<Event>, ManagerError> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Ok(Some(event));
            }
            if self.behind {
                let page = self.manager.events(self.cursor, PAGE).await?;
                // A short page is everything stored so far; whatever is stored
                // after this read is broadcast to the subscription made before it.
                self.behind = page.len() == PAGE;
                if let Some(last) = page.last() {
                    self.cursor = last.seq;
                }
                self.backlog.extend(page);
                continue;
            }
            match self.live.recv().await {
                // Already taken from the store.
                Ok(event) if event.seq <= self.cursor => {}
                Ok(event) if event.seq == self.cursor + 1 => {
                    self.cursor = event.seq;
                    return Ok(Some(event));
                }
                // Events in between are missing from the broadcast, or it dropped
                // some: they are all in the store.
                Ok(_) | Err(RecvError::Lagged(_)) => self.behind = true,
                Err(RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// The number of the last event [`EventFeed::next`] returned (at first, the
    /// cursor the feed started after): where to resume following later.
    pub fn last_seq(&self) -> u64 {
        self.backlog.front().map_or(self.cursor, |e| e.seq - 1)
    }
}
