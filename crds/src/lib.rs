//! The fleet-access API (`fleetaccess.io`): the `SessionAccess` grant, the account-wide
//! `SessionPreferences`, the `SessionAccessPolicy` boundaries on grants and the
//! `SessionAccessApproval` of grants that need one, plus the offline
//! validation that `fleet-access-operator plan` uses. Behind the `fixtures` feature (tests
//! only), `fixtures::GrantFixture` writes grants for the tests of every crate.
//!
//! This crate does no I/O and depends on no runtime: the operator, the bridge and the tests build
//! on it.

pub mod agent_version;
pub mod bridge_contract;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod names;
pub mod peers;
pub mod ssm_documents;
// KubeSchema re-emits each struct inside a private module to derive its schema, which trips
// `unreachable_pub` on those copies; clippy reads repeated `printcolumn(type_ = ..)` as
// duplicated attributes.
#[allow(unreachable_pub, clippy::duplicated_attributes)]
pub mod v1alpha1;
pub mod validation;

pub use v1alpha1::{
    SessionAccess, SessionAccessApproval, SessionAccessPolicy, SessionAccessSpec,
    SessionPreferences, SessionPreferencesSpec,
};

use kube::CustomResourceExt;

/// The CRDs this crate defines, as one multi-document YAML stream (what `deploy/crds/` holds).
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in [
        SessionAccess::crd(),
        SessionPreferences::crd(),
        SessionAccessPolicy::crd(),
        SessionAccessApproval::crd(),
    ] {
        out.push_str("---\n");
        // A CRD built from derived types always serializes.
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}
