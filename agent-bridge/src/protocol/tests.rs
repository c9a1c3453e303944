//! Pair harness tests (placeholder).
