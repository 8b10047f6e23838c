//! Support code shared by the vmkit criterion benches.
