//! The vmkit criterion benches live beside this file: `boot.rs` (create → agent hello
//! on the real backend against a plain QEMU boot), `clone.rs` (root volume cloning per
//! storage method) and `control_plane.rs` (create/delete rate, `ls` latency, memory
//! per VM on the fakes). This library target is empty.
