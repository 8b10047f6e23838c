//! Runnable templates for vmkit integrators will live beside this file; none exist
//! yet. This library target is empty.
