//! The fleet-access operator: reconciles `SessionAccess` grants into IAM policies, session
//! documents and bridge endpoints.
//!
//! Pure modules (`desired`, `policy`, `documents`, `naming`, `report`) turn a grant into the
//! state it stands for; the CLI (`cli`) wires them to files and standard output. `plan` (pure diff) and `status`
//! (pure conditions) feed `reconcile`, the controller, which talks to AWS through `aws`;
//! `preferences` reconciles the account's session preferences document; `leader` elects the one
//! replica that runs the controllers; `runner` wires them with `admin` and `metrics`.

pub mod admin;
pub mod aws;
pub mod cli;
pub mod desired;
pub mod documents;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod naming;
pub mod plan;
pub mod policy;
pub mod preferences;
pub mod reconcile;
pub mod report;
pub mod runner;
pub mod services;
pub mod settings;
pub mod status;

pub use error::{Error, Result};
