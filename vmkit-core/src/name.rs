//! VM names: DNS labels, validated once at the edge and trusted afterwards.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Names no VM may take: they collide with host names, front doors or lobby commands.
pub const RESERVED_NAMES: &[&str] = &[
    "admin",
    "api",
    "app",
    "dashboard",
    "default",
    "gateway",
    "help",
    "host",
    "localhost",
    "ls",
    "mcp",
    "new",
    "rm",
    "root",
    "share",
    "ssh",
    "vmkit",
    "www",
];

/// The longest name a DNS label allows.
pub const MAX_NAME_LEN: usize = 63;

/// A validated VM name: a DNS label of 1–63 lowercase letters, digits and hyphens,
/// neither starting nor ending with a hyphen, and not in [`RESERVED_NAMES`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// Why a string is not a valid [`VmName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("a VM name cannot be empty; use 1 to 63 lowercase letters, digits or hyphens")]
    Empty,
    /// The name is longer than a DNS label.
    #[error("VM name is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Length of the rejected name.
        len: usize,
    },
    /// The name holds a character outside `a-z`, `0-9` and `-`.
    #[error("VM name contains {found:?}; use only lowercase letters, digits and hyphens")]
    InvalidChar {
        /// The first offending character.
        found: char,
    },
    /// The name starts or ends with a hyphen.
    #[error("a VM name cannot start or end with '-'")]
    EdgeHyphen,
    /// The name is reserved.
    #[error("{0:?} is a reserved name; choose another")]
    Reserved(String),
    /// The name ends in `--` and a number: the HTTPS edge reaches port N of VM
    /// NAME at `NAME--N.domain`.
    #[error(
        "{0:?} ends in '--' and a number, which names a port of a VM \
         (NAME--8080.domain); choose another"
    )]
    PortForm(String),
}

impl VmName {
    /// Validates `name` as a VM name.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(&name)?;
        if port_form(&name).is_some() {
            return Err(NameError::PortForm(name));
        }
        Ok(Self(name))
    }

    /// The VM and port a host label names in the `NAME--PORT` form (`web--8080`):
    /// how the HTTPS edge reaches a port other than the VM's default. `None` when
    /// the label is not of that form.
    pub fn with_port(label: &str) -> Option<(VmName, u16)> {
        let (name, port) = port_form(label)?;
        let name = VmName::new(name).ok()?;
        Some((name, port))
    }

    /// Generates a readable random name such as `quiet-river-4821`.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let adjective = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
        let noun = NOUNS[rng.random_range(0..NOUNS.len())];
        let number: u16 = rng.random_range(1000..10000);
        Self(format!("{adjective}-{noun}-{number}"))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `(NAME, PORT)` of a `NAME--PORT` label: a port from 1 to 65535 written without
/// leading zeros.
fn port_form(label: &str) -> Option<(&str, u16)> {
    let (name, port) = label.rsplit_once("--")?;
    if name.is_empty() || port.is_empty() || port.starts_with('0') {
        return None;
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some((name, port))
}

fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar { found });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::EdgeHyphen);
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// From stored records and the wire: the rules of [`VmName::new`] but the port
/// form, which came later, so that a VM named that way before still loads.
impl TryFrom<String> for VmName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate(&s)?;
        Ok(Self(s))
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

const ADJECTIVES: &[&str] = &[
    "amber", "bold", "brave", "bright", "calm", "clever", "cosmic", "crisp", "dapper", "eager",
    "fancy", "gentle", "golden", "happy", "hidden", "jolly", "keen", "lively", "lucky", "mellow",
    "misty", "nimble", "noble", "proud", "quiet", "rapid", "silent", "silver", "sunny", "swift",
    "tidy", "vivid", "wild", "witty",
];

const NOUNS: &[&str] = &[
    "badger", "beacon", "brook", "canyon", "cedar", "comet", "dune", "falcon", "fern", "fjord",
    "galaxy", "glacier", "harbor", "heron", "island", "lagoon", "lantern", "maple", "meadow",
    "nebula", "orchid", "otter", "pebble", "pine", "prairie", "quartz", "river", "robin", "summit",
    "thistle", "tundra", "valley", "willow", "zephyr",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_accepted() {
        for n in ["a", "web-1", "x".repeat(63).as_str(), "0abc"] {
            assert_eq!(VmName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn the_port_form_is_reserved_for_new_names_and_parsed_from_hosts() {
        assert_eq!(
            VmName::new("web--8080"),
            Err(NameError::PortForm("web--8080".into()))
        );
        assert!(
            VmName::try_from("web--8080".to_owned()).is_ok(),
            "old records load"
        );
        for fine in ["web--x", "web--08", "a-b-1", "web-8080"] {
            VmName::new(fine).unwrap();
        }
        let (name, port) = VmName::with_port("web--8080").unwrap();
        assert_eq!((name.as_str(), port), ("web", 8080));
        let (name, port) = VmName::with_port("my--app--3000").unwrap();
        assert_eq!((name.as_str(), port), ("my--app", 3000));
        for not in [
            "web",
            "web--",
            "--80",
            "web--080",
            "web--70000",
            "web--8o",
            "admin--80",
        ] {
            assert_eq!(VmName::with_port(not), None, "{not}");
        }
    }

    #[test]
    fn invalid_names_are_rejected_with_the_reason() {
        assert_eq!(VmName::new(""), Err(NameError::Empty));
        assert_eq!(
            VmName::new("x".repeat(64)),
            Err(NameError::TooLong { len: 64 })
        );
        assert_eq!(
            VmName::new("Web"),
            Err(NameError::InvalidChar { found: 'W' })
        );
        assert_eq!(
            VmName::new("a_b"),
            Err(NameError::InvalidChar { found: '_' })
        );
        assert_eq!(
            VmName::new("a.b"),
            Err(NameError::InvalidChar { found: '.' })
        );
        assert_eq!(VmName::new("-ab"), Err(NameError::EdgeHyphen));
        assert_eq!(VmName::new("ab-"), Err(NameError::EdgeHyphen));
        assert_eq!(VmName::new("new"), Err(NameError::Reserved("new".into())));
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..200 {
            let n = VmName::generate();
            assert_eq!(VmName::new(n.as_str()).unwrap(), n);
        }
    }

    #[test]
    fn deserializing_an_invalid_name_fails() {
        assert!(serde_json::from_str::<VmName>("\"Bad Name\"").is_err());
        assert_eq!(
            serde_json::from_str::<VmName>("\"good\"").unwrap().as_str(),
            "good"
        );
    }
}
