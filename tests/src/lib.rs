//! Fixtures that start real components for tests.
