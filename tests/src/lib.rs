//! Fixtures that start real components for tests, on 127.0.0.1 only: a Kubernetes
//! control plane (etcd + kube-apiserver), moto (AWS APIs), OpenSSH's sshd, Prometheus,
//! the location of the official session-manager-plugin, the workspace's own binaries, and a
//! real terminal (tmux) to type into.
//!
//! Programs come from `tests/env/setup.sh` (see `tests/env/README.md`). Every process
//! a fixture starts runs under `tests/env/supervise.sh`, which stops it when the test
//! process ends, even on a panic, Ctrl-C or kill; owned fixtures also stop their
//! processes on drop. Shared fixtures ([`ControlPlane::shared`], [`Moto::shared`]) use
//! the services of `tests/env/with-services.sh` when its environment variables are set.

pub mod addresses;
pub mod binaries;
pub mod certificates;
pub mod control_plane;
pub mod error;
pub mod exposition;
pub mod iam_evaluator;
pub mod locations;
pub mod manifests;
pub mod moto;
pub mod operator_command;
pub mod process;
pub mod prometheus;
pub mod scratch;
pub mod service_proxy;
pub mod sshd;
pub mod targets;
pub mod terminal;

pub use addresses::{RefusingAddress, connect_from, own_loopback_address};
pub use binaries::{workspace_binary, workspace_root};
pub use control_plane::{ControlPlane, TestNamespace};
pub use error::{FixtureError, FixtureResult};
pub use exposition::ExposedSample;
pub use locations::{Locations, cache_dir, plugin_command_line, session_manager_plugin_path};
pub use moto::Moto;
pub use operator_command::{OperatorCommandLine, cluster_of};
pub use process::{SupervisedProcess, free_loopback_port, http_get, loopback};
pub use prometheus::{Prometheus, Sample};
pub use scratch::Scratch;
pub use service_proxy::ServiceProxy;
pub use sshd::Sshd;
pub use targets::GatedSink;
pub use terminal::Terminal;
