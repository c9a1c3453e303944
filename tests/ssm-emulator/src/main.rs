//! `ssm-emulator --config FILE`: runs the SSM emulator and prints its endpoint URL.

use clap::Parser;

/// A strict local emulator of AWS SSM Session Manager (API, gateway, agent).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML configuration file (see tests/ssm-emulator/README.md).
    #[arg(long, env = "SSM_EMULATOR_CONFIG")]
    config: std::path::PathBuf,
    /// Override the listen address from the config.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = fleet_access_ssm_emulator::Config::from_file(&args.config)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let running = fleet_access_ssm_emulator::Emulator::start(config).await?;
    println!("{}", running.endpoint_url());
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
