//! The committed CRD YAML in deploy/crds/ must be exactly what the types generate.
//! Regenerate with `make generate`.

#[test]
fn committed_crds_match_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/fleet-access.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("deploy/crds/fleet-access.yaml exists");
    let generated = fleet_access_crds::crds_yaml();
    assert!(
        committed == generated,
        "deploy/crds/fleet-access.yaml is out of date: run `make generate` and commit the result"
    );
}
