//! SSH public key lines (what users paste at registration and `vmkit key add`) on
//! arbitrary text: no panic, and every key that parses survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmkit_core::SshPublicKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = SshPublicKey::parse(text) {
        let line = key.to_openssh();
        let again = SshPublicKey::parse(&line).expect("a parsed key's own line parses");
        assert_eq!(again, key);
        assert!(key.fingerprint().starts_with("SHA256:"));
    }
});
