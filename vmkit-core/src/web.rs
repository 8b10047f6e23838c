//! Browser sign-in: one-time links, sessions, and the tickets that carry a session
//! from the gateway's own host to one VM host.
//!
//! The dance, as the HTTPS edge runs it:
//! 1. `ssh HOST browser` makes a [`WebTokenKind::SignInLink`] (single use, minutes)
//!    and prints `https://APEX/__vmkit/login?token=…`; opening it makes a
//!    [`WebTokenKind::Session`] whose secret becomes a cookie on the apex host.
//! 2. A private VM host without a session redirects to the apex, which (signed in)
//!    makes a [`WebTokenKind::HostTicket`] bound to that host (single use, about two
//!    minutes) and redirects back with it; the VM host redeems it for a
//!    [`WebTokenKind::HostSession`] bound to that host, set as a host-only cookie.
//!
//! Every secret is 32 random bytes; only its [`TokenHash`] is stored, with the user,
//! the host it is bound to and its expiry, so a cookie is checked against a record
//! the server can delete (logout on one host, or everywhere).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state_store::{StateStore, StoreError};
use crate::time::Timestamp;
use crate::token::{TokenHash, new_secret};
use crate::user::{User, UserId};

/// What a web token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WebTokenKind {
    /// A one-time sign-in link (`ssh HOST browser`).
    SignInLink,
    /// A browser session on the gateway's own host.
    Session,
    /// A single-use ticket handing a session to one VM host.
    HostTicket,
    /// A browser session on one VM host.
    HostSession,
}

impl WebTokenKind {
    /// The prefix of its secrets, so a secret says what it is.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::SignInLink => "vml_",
            Self::Session => "vmw_",
            Self::HostTicket => "vmt_",
            Self::HostSession => "vmh_",
        }
    }
}

/// A web token as stored: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WebToken {
    /// The hash of the secret.
    pub hash: TokenHash,
    /// What it is.
    pub kind: WebTokenKind,
    /// Whom it signs in.
    pub user: UserId,
    /// The host it is valid on (host tickets and host sessions), lowercase, without
    /// a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The session it was handed from (host tickets and host sessions): signing out
    /// of that session ends them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<TokenHash>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops being valid.
    pub expires_at: Timestamp,
}

impl WebToken {
    /// Whether it has expired at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }
}

/// How long each kind of web token lives.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct WebTtls {
    /// A sign-in link (10 minutes).
    pub sign_in_link: Duration,
    /// A session, on the apex or a VM host (30 days).
    pub session: Duration,
    /// A host ticket (2 minutes).
    pub host_ticket: Duration,
}

impl Default for WebTtls {
    fn default() -> Self {
        Self {
            sign_in_link: Duration::from_secs(10 * 60),
            session: Duration::from_secs(30 * 24 * 3600),
            host_ticket: Duration::from_secs(120),
        }
    }
}

/// Browser sign-in over a [`StateStore`]: makes, redeems and checks web tokens.
#[derive(Clone)]
pub struct WebSessions {
    store: Arc<dyn StateStore>,
    ttls: WebTtls,
}

impl std::fmt::Debug for WebSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSessions")
            .field("ttls", &self.ttls)
            .finish_non_exhaustive()
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl WebSessions {
    /// Sign-in over `store` with the default lifetimes.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            ttls: WebTtls::default(),
        }
    }

    /// Uses `ttls` instead.
    pub fn with_ttls(mut self, ttls: WebTtls) -> Self {
        self.ttls = ttls;
        self
    }

    /// The lifetimes in use.
    pub fn ttls(&self) -> WebTtls {
        self.ttls
    }

    async fn make(
        &self,
        kind: WebTokenKind,
        user: UserId,
        host: Option<String>,
        parent: Option<TokenHash>,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let secret = new_secret(kind.prefix());
        let now = Timestamp::now();
        let token = WebToken {
            hash: TokenHash::of(&secret),
            kind,
            user,
            host,
            parent,
            created_at: now,
            expires_at: Timestamp(now.0.saturating_add(ttl.as_millis() as u64)),
        };
        self.store.put_web_token(&token).await?;
        Ok(secret)
    }

    /// A one-time sign-in link's secret for `user`.
    pub async fn sign_in_link(&self, user: UserId) -> Result<String, StoreError> {
        self.make(
            WebTokenKind::SignInLink,
            user,
            None,
            None,
            self.ttls.sign_in_link,
        )
        .await
    }

    /// A one-time sign-in link's secret for the active user whose email is `email`
    /// (compared without case), with that user; `None` when no active user has it.
    /// For sign-in by email: send the link to that address, never show it.
    pub async fn sign_in_link_for_email(
        &self,
        email: &str,
    ) -> Result<Option<(String, User)>, StoreError> {
        let email = email.trim();
        if email.is_empty() {
            return Ok(None);
        }
        let found = self.store.list_users().await?.into_iter().find(|u| {
            u.status == crate::user::UserStatus::Active
                && u.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
        });
        let Some(user) = found else {
            return Ok(None);
        };
        let secret = self.sign_in_link(user.id).await?;
        Ok(Some((secret, user)))
    }

    /// Redeems a sign-in link (once): a new session's secret and its user, or `None`
    /// when the link is unknown, used or expired.
    pub async fn redeem_sign_in_link(
        &self,
        secret: &str,
    ) -> Result<Option<(String, User)>, StoreError> {
        if !secret.starts_with(WebTokenKind::SignInLink.prefix()) {
            return Ok(None);
        }
        let Some(link) = self.store.take_web_token(&TokenHash::of(secret)).await? else {
            return Ok(None);
        };
        if link.kind != WebTokenKind::SignInLink || link.is_expired(Timestamp::now()) {
            return Ok(None);
        }
        let Some(user) = self.usable_user(link.user).await? else {
            return Ok(None);
        };
        let session = self
            .make(
                WebTokenKind::Session,
                user.id,
                None,
                None,
                self.ttls.session,
            )
            .await?;
        Ok(Some((session, user)))
    }

    /// A ticket for `host`, from the apex session `session`; `None` when the session
    /// is not valid.
    pub async fn host_ticket(
        &self,
        session: &str,
        host: &str,
    ) -> Result<Option<String>, StoreError> {
        let Some(token) = self.valid(session, WebTokenKind::Session, None).await? else {
            return Ok(None);
        };
        if self.usable_user(token.user).await?.is_none() {
            return Ok(None);
        }
        self.make(
            WebTokenKind::HostTicket,
            token.user,
            Some(normalize_host(host)),
            Some(token.hash),
            self.ttls.host_ticket,
        )
        .await
        .map(Some)
    }

    /// Redeems a ticket (once) on `host`: a new host session's secret, or `None`
    /// when the ticket is unknown, used, expired or for another host.
    pub async fn redeem_host_ticket(
        &self,
        ticket: &str,
        host: &str,
    ) -> Result<Option<String>, StoreError> {
        if !ticket.starts_with(WebTokenKind::HostTicket.prefix()) {
            return Ok(None);
        }
        let Some(token) = self.store.take_web_token(&TokenHash::of(ticket)).await? else {
            return Ok(None);
        };
        let host = normalize_host(host);
        if token.kind != WebTokenKind::HostTicket
            || token.is_expired(Timestamp::now())
            || token.host.as_deref() != Some(host.as_str())
        {
            return Ok(None);
        }
        // The session it came from must still be there: a logout between the
        // ticket and its use wins.
        let Some(parent) = token.parent else {
            return Ok(None);
        };
        match self.store.get_web_token(&parent).await? {
            Some(p) if !p.is_expired(Timestamp::now()) => {}
            _ => return Ok(None),
        }
        self.make(
            WebTokenKind::HostSession,
            token.user,
            Some(host),
            Some(parent),
            self.ttls.session,
        )
        .await
        .map(Some)
    }

    /// The user a session cookie signs in: an apex session when `host` is `None`,
    /// else a host session valid on `host`. `None` for anything else, and for a
    /// user who was deleted or suspended.
    pub async fn user(&self, secret: &str, host: Option<&str>) -> Result<Option<User>, StoreError> {
        let kind = match host {
            None => WebTokenKind::Session,
            Some(_) => WebTokenKind::HostSession,
        };
        let Some(token) = self.valid(secret, kind, host).await? else {
            return Ok(None);
        };
        self.usable_user(token.user).await
    }

    async fn valid(
        &self,
        secret: &str,
        kind: WebTokenKind,
        host: Option<&str>,
    ) -> Result<Option<WebToken>, StoreError> {
        if !secret.starts_with(kind.prefix()) {
            return Ok(None);
        }
        let Some(token) = self.store.get_web_token(&TokenHash::of(secret)).await? else {
            return Ok(None);
        };
        let host = host.map(normalize_host);
        if token.kind != kind
            || token.is_expired(Timestamp::now())
            || token.host.as_deref() != host.as_deref()
        {
            return Ok(None);
        }
        // A host session lives no longer than the session it was handed from.
        if let Some(parent) = &token.parent {
            match self.store.get_web_token(parent).await? {
                Some(p) if !p.is_expired(Timestamp::now()) => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(token))
    }

    async fn usable_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        Ok(self
            .store
            .get_user(id)
            .await?
            .filter(|u| u.status == crate::user::UserStatus::Active))
    }

    /// Signs out the session `secret` (an apex session ends every host session
    /// handed from it). Whether it was a session.
    pub async fn sign_out(&self, secret: &str) -> Result<bool, StoreError> {
        let hash = TokenHash::of(secret);
        let Some(token) = self.store.take_web_token(&hash).await? else {
            return Ok(false);
        };
        if token.kind == WebTokenKind::Session {
            self.store
                .delete_web_tokens(token.user, Some(&token.hash))
                .await?;
        }
        Ok(true)
    }

    /// Signs `user` out everywhere; how many tokens ended.
    pub async fn sign_out_everywhere(&self, user: UserId) -> Result<usize, StoreError> {
        self.store.delete_web_tokens(user, None).await
    }

    /// Deletes expired tokens; how many.
    pub async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.store.purge_web_tokens(Timestamp::now()).await
    }
}
