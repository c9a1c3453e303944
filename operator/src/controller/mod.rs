//! The controllers and what they share: the grant controller (`reconcile`), the session
//! preferences controller (`preferences`), the one applier of changes (`apply`), what they
//! observe in AWS and Kubernetes (`observe`), leader election (`leader`) and the wiring of
//! `fleet-access-operator run` (`runner`).

pub mod leader;
pub mod preferences;
pub mod reconcile;
pub mod runner;
