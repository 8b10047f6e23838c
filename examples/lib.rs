//! Shared helpers for the vmkit examples.
