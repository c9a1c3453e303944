//! The operator as its binary, killed (SIGKILL) at random points while grants are applied,
//! then restarted: it converges with no orphaned or duplicate AWS objects, and deleting the
//! grants leaves nothing behind. IAM on moto, SSM on the emulator with moto upstream.

use std::{process::Stdio, time::Duration};

use aws_sdk_iam::types::Policy;
use fleet_access_crds::{SessionAccess, fixtures::GrantFixture};
use fleet_access_operator::model::naming;
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode};
use fleet_access_tests::{ControlPlane, Moto, OperatorCommandLine, cluster_of};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};

const GRANTS: usize = 50;
const CONVERGE: Duration = Duration::from_secs(240);

fn operator(
    control_plane: &ControlPlane,
    moto: &Moto,
    ssm: &str,
    namespace: &str,
) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-access-operator"));
    OperatorCommandLine {
        kubeconfig: control_plane.kubeconfig_path(),
        moto,
        ssm_endpoint: ssm,
        watch_namespace: namespace,
        bridge_namespace: namespace,
        admin_address: "127.0.0.1:0",
        // One replica, restarted: like a restarted pod it keeps its name, so it takes its own
        // leader Lease back at once instead of waiting for it to expire.
        replica: "restart",
    }
    .apply(command.as_std_mut())
    .args(["--resync-seconds", "5"]);
    command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the operator starts")
}

fn ready(grant: &SessionAccess) -> bool {
    grant.status.as_ref().is_some_and(|s| {
        s.observed_generation == grant.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The policies under the operator's path whose names start with `prefix`, from every page of
/// the listing (moto holds the policies of every test of the run).
/// The operator's policies for this run's users: their sets, named after them.
async fn policies_of(iam: &aws_sdk_iam::Client, cluster: &str, users: &[String]) -> Vec<Policy> {
    let names: Vec<String> = (users.iter())
        .map(|user| naming::identity_policy_name(cluster, "user", user, ""))
        .collect();
    fleet_access_tests::moto::policies_under(iam, naming::POLICY_PATH)
        .await
        .expect("ListPolicies")
        .into_iter()
        .filter(|p| {
            p.policy_name()
                .is_some_and(|n| names.iter().any(|m| m == n))
        })
        .collect()
}

/// How many managed policies are attached to IAM user `user`.
async fn attached_to(iam: &aws_sdk_iam::Client, user: &str) -> usize {
    iam.list_attached_user_policies()
        .user_name(user)
        .send()
        .await
        .expect("attached")
        .attached_policies()
        .len()
}

/// A pseudo-random pause from 200 ms to 2 s (uuid's randomness; the order of kills matters,
/// not the exact times).
fn random_pause() -> Duration {
    let byte = uuid::Uuid::new_v4().as_bytes()[0];
    Duration::from_millis(200 + u64::from(byte) * 7)
}

#[tokio::test]
async fn killed_and_restarted_it_converges_without_orphans_or_duplicates() {
    let control_plane = ControlPlane::shared().await.expect("control plane");
    control_plane
        .install_fleet_access(&fleet_access_crds::crds_yaml())
        .await
        .expect("fleet-access's API");
    let namespace = control_plane.namespace("op-restart").await.expect("ns");
    let ns = namespace.name().to_owned();
    let moto = Moto::shared().await.expect("moto");
    let mut config = Config {
        mode: Mode::Fast,
        upstream: Some(moto.endpoint().to_owned()),
        ..Config::default()
    };
    config
        .instances
        .push(InstanceConfig::new("i-0000000000000000a").with_agent_version("3.3.0.0"));
    let emulator = Emulator::start(config).await.expect("emulator");
    let iam = aws_sdk_iam::Client::new(&moto.sdk_config());
    // One user per grant: IAM attaches at most 10 managed policies to one identity by default,
    // which the operator enforces.
    let users: Vec<String> = (0..GRANTS).map(|i| format!("restart{i}-{ns}")).collect();
    for user in &users {
        iam.create_user()
            .user_name(user)
            .send()
            .await
            .expect("user");
    }

    let grants: Api<SessionAccess> = namespace.api();
    let started = tokio::time::Instant::now();
    let mut child = operator(control_plane, moto, &emulator.endpoint_url(), &ns);
    for (i, user) in users.iter().enumerate() {
        let grant = GrantFixture::new(&ns, &format!("g{i}"))
            .users([user])
            .instance_ids(["i-0000000000000000a"])
            .ssh()
            .shell()
            .build();
        grants
            .create(&PostParams::default(), &grant)
            .await
            .expect("created");
    }
    // Kill it at random points while it works, restarting each time.
    for _ in 0..4 {
        tokio::time::sleep(random_pause()).await;
        child.kill().await.expect("killed");
        child = operator(control_plane, moto, &emulator.endpoint_url(), &ns);
    }
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let list = grants.list(&ListParams::default()).await.expect("list");
        if list.items.len() == GRANTS && list.items.iter().all(ready) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "grants did not converge"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{GRANTS} grants Ready {:.1} s after the first start (4 kills)",
        started.elapsed().as_secs_f64()
    );

    // Exactly one policy per user's set (one grant each), one version, attached once; one
    // shell document per grant.
    let ours = policies_of(&iam, &cluster_of(&ns), &users).await;
    assert_eq!(ours.len(), GRANTS, "one policy per grant");
    for policy in &ours {
        let arn = policy.arn().expect("arn");
        let versions = iam
            .list_policy_versions()
            .policy_arn(arn)
            .send()
            .await
            .expect("versions");
        assert_eq!(
            versions.versions().len(),
            1,
            "no duplicate versions of {arn}"
        );
    }
    // Each user has its grant's policy, attached once.
    for user in &users {
        assert_eq!(attached_to(&iam, user).await, 1, "{user}");
    }

    // Delete everything: nothing is left, even after the restarts.
    grants
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete all");
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !grants
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "grants not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for user in &users {
        assert_eq!(attached_to(&iam, user).await, 0, "{user}");
    }
    assert_eq!(
        policies_of(&iam, &cluster_of(&ns), &users).await,
        Vec::new(),
        "no policy of the grants is left"
    );
    child.kill().await.expect("stopped");
}
