//! The workspace's own programs (`agent-bridge`, `fleet-access-operator`, ...) for tests that run
//! them as processes: one `cargo build` of every binary of the workspace, once per test process,
//! into the target folder and profile the running test was built in.
//!
//! Why one invocation with a fixed selection: cargo unifies features over the packages and
//! targets it is asked for, so `cargo build -p X --bin Y` per binary gives a different feature
//! set per call, and the crates below them (tokio, hyper, the AWS SDK) are rebuilt for each.
//! `--workspace --bins --examples` resolves features as `cargo test --workspace` does: asking for
//! examples (the workspace has none, so none are built) activates the dev-dependencies' features,
//! such as tokio's `test-util`. After `cargo test --workspace` has compiled, the build below is
//! therefore fresh and takes about a second, provided it does not inherit the variables cargo
//! sets for the test process (see [`is_set_by_cargo_for_this_process`]).
//!
//! A package's integration tests can use `env!("CARGO_BIN_EXE_<name>")` for that package's own
//! binaries instead: cargo builds those with the test itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::{FixtureError, FixtureResult};

/// The folder the workspace's binaries are in (`<target>/debug` or `<target>/<profile>`), once
/// they are built; or why they could not be.
static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The path of the workspace binary `name`, built (with every other workspace binary) the first
/// time any test of this process asks. Blocks while cargo runs.
pub fn workspace_binary(name: &str) -> FixtureResult<PathBuf> {
    let folder = BUILT
        .get_or_init(|| build_workspace_binaries().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| FixtureError::WorkspaceBuild(message.clone()))?;
    let path = folder.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(FixtureError::MissingProgram {
            program: name.to_owned(),
            path,
            hint: "not a binary of this workspace".into(),
        })
    }
}

/// The workspace's root folder (where `Cargo.toml` declares the members).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// Runs the one `cargo build` and returns the folder the binaries are in.
fn build_workspace_binaries() -> FixtureResult<PathBuf> {
    let profile_folder = running_profile_folder()?;
    let (target_dir, profile) = target_dir_and_profile(&profile_folder)?;
    // `CARGO` is set by cargo for the processes it runs; a test binary started by hand falls
    // back to the cargo that compiled this crate.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut command = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_set_by_cargo_for_this_process) {
            command.env_remove(name);
        }
    }
    command
        .args(["build", "--quiet", "--workspace", "--bins", "--examples"])
        .args(["--profile", &profile])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(workspace_root());
    let rendered = format!("{command:?}");
    let output = command
        .output()
        .map_err(FixtureError::io(format!("running {rendered}")))?;
    if output.status.success() {
        Ok(profile_folder)
    } else {
        Err(FixtureError::CommandFailed {
            command: rendered,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Whether `name` is a variable cargo sets for the process it runs (`cargo test`, `cargo run`):
/// the package's name, version, manifest folder, ..., rather than the user's configuration. A
/// cargo started from such a process must not inherit them: build scripts such as ring's declare
/// `rerun-if-env-changed=CARGO_PKG_NAME` and others, so a cargo that sees them reruns those
/// scripts and rebuilds everything above them (rustls, kube, the AWS SDK), and the next plain
/// `cargo test` rebuilds it all back.
pub fn is_set_by_cargo_for_this_process(name: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "CARGO_PKG_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
        "CARGO_MANIFEST_",
        "CARGO_TARGET_TMPDIR",
    ];
    matches!(
        name,
        "CARGO" | "OUT_DIR" | "CARGO_PRIMARY_PACKAGE" | "CARGO_RUSTC_CURRENT_DIR"
    ) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// `<target>/<profile folder>` of the running test binary (which lives in its `deps/`).
fn running_profile_folder() -> FixtureResult<PathBuf> {
    let exe = std::env::current_exe().map_err(FixtureError::io("locating the test binary"))?;
    exe.parent()
        .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| FixtureError::UnexpectedAnswer {
            component: "cargo".into(),
            detail: format!("{} is not in a cargo target folder's deps/", exe.display()),
        })
}

/// The target folder and the cargo profile name for a profile folder: `debug` is the folder of
/// the `dev` (and `test`) profile; every other profile's folder is its name.
fn target_dir_and_profile(profile_folder: &Path) -> FixtureResult<(PathBuf, String)> {
    let (Some(target_dir), Some(folder)) = (
        profile_folder.parent(),
        profile_folder.file_name().and_then(|n| n.to_str()),
    ) else {
        return Err(FixtureError::UnexpectedAnswer {
            component: "cargo".into(),
            detail: format!("{} is not a profile folder", profile_folder.display()),
        });
    };
    let profile = if folder == "debug" { "dev" } else { folder };
    Ok((target_dir.to_path_buf(), profile.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_folders_name_their_profile() {
        let (target, profile) = target_dir_and_profile(Path::new("/t/debug")).unwrap();
        assert_eq!(
            (target.as_path(), profile.as_str()),
            (Path::new("/t"), "dev")
        );
        let (_, profile) = target_dir_and_profile(Path::new("/t/release")).unwrap();
        assert_eq!(profile, "release");
        let (target, _) =
            target_dir_and_profile(Path::new("/t/x86_64-unknown-linux-gnu/debug")).unwrap();
        assert_eq!(target, Path::new("/t/x86_64-unknown-linux-gnu"));
    }

    #[test]
    fn the_test_package_variables_are_not_passed_on_but_the_configuration_is() {
        for set_by_cargo in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO", "OUT_DIR"] {
            assert!(
                is_set_by_cargo_for_this_process(set_by_cargo),
                "{set_by_cargo}"
            );
        }
        for configuration in ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_PROFILE_DEV_DEBUG"] {
            assert!(
                !is_set_by_cargo_for_this_process(configuration),
                "{configuration}"
            );
        }
    }

    #[test]
    fn the_workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
