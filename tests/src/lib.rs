//! Shared harness for Cloister's integration tests.

pub mod conformance;
