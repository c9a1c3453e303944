//! The pure model: what a grant stands for and how it differs from what is observed. Nothing
//! here performs I/O or reads the clock; the controller feeds it observations and applies the
//! changes it returns.

pub mod approval;
pub mod boundary;
pub mod census;
pub mod combination;
pub mod desired;
pub mod documents;
pub mod endpoints;
pub mod identity;
pub mod naming;
pub mod plan;
pub mod policy;
pub mod report;
pub mod status;
