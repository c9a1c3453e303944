//! `fleet-access-bench run`: the parts the options ask for, one after another, each into the
//! report; then BENCHMARKS.md (or `--out`).

use anyhow::Context as _;

use crate::{
    report::Report,
    roles::Target,
    scenarios::{Options, scale, setup, throughput},
    support::Workspace,
};

/// `run`: every benchmark, then BENCHMARKS.md.
pub async fn run(args: &[String]) -> anyhow::Result<()> {
    let options = Options::parse(args)?;
    let ws = Workspace::discover()?;
    eprintln!(
        "bench: logs in {} (removed if every part runs)",
        ws.scratch.display()
    );
    let mut report = Report::new(&ws, &options, args);
    let target = Target::start().await?;
    if options.wants("throughput") {
        for &mode in &options.modes {
            match throughput(&ws, &options, &target, mode).await {
                Ok((figures, profiles)) => {
                    report.throughput.extend(figures);
                    report.profiles.extend(profiles);
                }
                Err(error) => report
                    .missing
                    .push(format!("throughput ({}): {error:#}", mode.name())),
            }
        }
    }
    if options.wants("slow-reader") {
        let part = crate::slow_reader::run(&ws, &options, &target).await;
        report.slow_reader = kept(part, &mut report.missing, "slow reader");
    }
    if options.wants("parallel") {
        let part = crate::parallel::run(&ws, &options, &target).await;
        report.parallel = kept(part, &mut report.missing, "parallel downloads");
    }
    if options.wants("setup") {
        let part = setup(&ws, &options, &target).await;
        report.setup = kept(part, &mut report.missing, "setup");
    }
    if options.wants("shell-paste") {
        let part = crate::shell_paste::run(&ws, &options).await;
        report.shell_paste = kept(part, &mut report.missing, "shell paste");
    }
    if options.wants("scale") {
        let part = scale(&ws, &options, &target).await;
        report.scale = kept(part, &mut report.missing, "scale");
    }
    if options.wants("memory") {
        let part = crate::memory::run(&ws, &options, &target).await;
        report.memory = kept(part, &mut report.missing, "memory");
    }
    if options.wants("client-checks") {
        let part = crate::client_checks::run(&options);
        report.client_checks = kept(part, &mut report.missing, "client checks");
    }
    if options.wants("operator") {
        let part = crate::operator::run(&ws, &options).await;
        report.operator = kept(part, &mut report.missing, "operator");
    }
    let text = report.render();
    std::fs::write(&options.out, &text)
        .with_context(|| format!("writing {}", options.out.display()))?;
    println!("{text}");
    eprintln!("bench: wrote {}", options.out.display());
    if report.missing.is_empty() {
        let _ = std::fs::remove_dir_all(&ws.scratch);
    } else {
        eprintln!(
            "bench: a part failed; its logs stay in {}",
            ws.scratch.display()
        );
    }
    Ok(())
}

/// A part's figures; a part that failed is listed in `missing` as `what: why` instead.
fn kept<T>(part: anyhow::Result<T>, missing: &mut Vec<String>, what: &str) -> Option<T> {
    part.map_err(|error| missing.push(format!("{what}: {error:#}")))
        .ok()
}
