//! Wall-clock timestamps stored in state and events.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self(ms)
    }
}

/// Why a string is not a lifetime ([`parse_lifetime`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a lifetime such as 90m, 12h, 30d or 8w (a number and one of s, m, h, d, w)")]
#[non_exhaustive]
pub struct LifetimeError(pub String);

/// A lifetime such as `90m`, `12h`, `30d` or `8w`: a positive number and a unit
/// (`s`, `m`, `h`, `d`, `w`).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(vmkit_core::parse_lifetime("30d"), Ok(Duration::from_secs(30 * 86_400)));
/// assert!(vmkit_core::parse_lifetime("30").is_err());
/// ```
pub fn parse_lifetime(s: &str) -> Result<std::time::Duration, LifetimeError> {
    let error = || LifetimeError(s.to_owned());
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(error)?;
    let (number, unit) = s.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| error())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(error()),
    };
    match number.checked_mul(scale) {
        Some(0) | None => Err(error()),
        Some(secs) => Ok(std::time::Duration::from_secs(secs)),
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
