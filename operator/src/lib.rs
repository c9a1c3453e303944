//! The fleet-access operator: reconciles `SessionAccess` grants into IAM policies, session
//! documents and bridge endpoints.
//!
//! Pure modules (`desired`, `policy`, `documents`, `naming`, `report`) turn a grant into the
//! state it stands for; the CLI (`cli`) wires them to files and standard output.

pub mod cli;
pub mod desired;
pub mod documents;
pub mod error;
pub mod naming;
pub mod policy;
pub mod report;
pub mod settings;

pub use error::{Error, Result};
