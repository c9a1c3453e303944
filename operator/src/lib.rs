//! The fleet-access operator: reconciles `SessionAccess` grants into IAM policies, session
//! documents and bridge endpoints, and `SessionPreferences` into the account's session
//! preferences.
//!
//! ```text
//!  model/       pure: a grant → what it stands for (desired, policy, documents, naming),
//!               the diff against what is observed (plan, endpoints), the status (status),
//!               and how `plan` shows it (report). No I/O.
//!  controller/  I/O: the controllers (reconcile, preferences), which observe, plan with
//!               model/ and apply every change through one applier; leader election; the
//!               `run` wiring (runner).
//!  aws/         the IAM and SSM operations the controllers use, their one error
//!               classification, the SDK adapter and a fake for unit tests.
//!  cli, admin, metrics, settings, error: the command line, the admin endpoint, the metrics,
//!               the configuration and the crate's one error type.
//! ```

pub mod admin;
pub mod aws;
pub mod cli;
pub mod controller;
pub mod error;
pub mod metrics;
pub mod model;
pub mod settings;

pub use error::{Error, Result};
