//! The vmkit criterion benches live beside this file: `boot.rs` (create → agent hello
//! on the real backend against a plain QEMU boot), `clone.rs` (root volume cloning per
//! storage method) and `control_plane.rs` (create/delete rate, `ls` latency, memory
//! per VM on the fakes). `base_boot.rs` is a plain bench program (no criterion): the
//! base image's agent hello against sshd listening and the first command through SSH,
//! in guest uptime, for one or more builds of the image. `https_edge.rs` is the binary
//! `https-edge`, vmkit's HTTPS edge over a fake host as `scripts/bench-https.sh` runs it
//! against nginx and Caddy. This library target is empty.
