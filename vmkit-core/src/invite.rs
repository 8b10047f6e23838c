//! Invites: single-use codes that let someone register while registration is by
//! invite ([`RegistrationPolicy::Invite`](crate::RegistrationPolicy::Invite)).

use std::time::Duration;

use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::token::{TokenHash, new_secret};
use crate::user::{Role, UserId};

/// The prefix of invite codes.
pub const INVITE_PREFIX: &str = "vmi_";

/// An invite as stored: its code is kept only as a hash, and shown once when made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Invite {
    /// Short public identifier, to list and delete it by (not the code).
    pub id: String,
    /// The hash of the code.
    pub hash: TokenHash,
    /// Who made it ([`UserId::LOCAL`] for the operator).
    pub created_by: UserId,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops being accepted.
    pub expires_at: Timestamp,
    /// The role of the user who registers with it.
    pub role: Role,
}

impl Invite {
    /// A new invite made by `created_by`, valid for `ttl` from now, for a user of
    /// `role`; with its code (`vmi_…`), which is not stored and cannot be shown
    /// again.
    pub fn new(created_by: UserId, ttl: Duration, role: Role) -> (Self, String) {
        let secret = new_secret(INVITE_PREFIX);
        let now = Timestamp::now();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let invite = Self {
            id: short_id(),
            hash: TokenHash::of(&secret),
            created_by,
            created_at: now,
            expires_at: Timestamp(now.0.saturating_add(ttl_ms)),
            role,
        };
        (invite, secret)
    }

    /// Whether the invite no longer counts at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }
}

/// Ten random lowercase letters and digits.
fn short_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invite_keeps_only_the_hash_of_its_code_and_expires_after_its_ttl() {
        let (invite, code) = Invite::new(UserId(1), Duration::from_secs(60), Role::User);
        assert!(code.starts_with(INVITE_PREFIX));
        assert!(invite.hash.matches(&code));
        assert!(!serde_json::to_string(&invite).unwrap().contains(&code));
        assert_eq!(invite.id.len(), 10);
        assert!(!invite.is_expired(invite.created_at));
        assert!(invite.is_expired(Timestamp(invite.created_at.0 + 60_000)));
    }
}
