//! Prints the fleet-access CRDs as YAML (the content of `deploy/crds/fleet-access.yaml`).
fn main() {
    print!("{}", fleet_access_crds::crds_yaml());
}
