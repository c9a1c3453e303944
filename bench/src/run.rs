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
    eprintln!("bench: logs in {}", ws.scratch.display());
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
        match crate::slow_reader::run(&ws, &options, &target).await {
            Ok(part) => report.slow_reader = Some(part),
            Err(error) => report.missing.push(format!("slow reader: {error:#}")),
        }
    }
    if options.wants("parallel") {
        match crate::parallel::run(&ws, &options, &target).await {
            Ok(part) => report.parallel = Some(part),
            Err(error) => report
                .missing
                .push(format!("parallel downloads: {error:#}")),
        }
    }
    if options.wants("setup") {
        match setup(&ws, &options, &target).await {
            Ok(setup) => report.setup = Some(setup),
            Err(error) => report.missing.push(format!("setup: {error:#}")),
        }
    }
    if options.wants("shell-paste") {
        match crate::shell_paste::run(&ws, &options).await {
            Ok(part) => report.shell_paste = Some(part),
            Err(error) => report.missing.push(format!("shell paste: {error:#}")),
        }
    }
    if options.wants("scale") {
        match scale(&ws, &options, &target).await {
            Ok(scale) => report.scale = Some(scale),
            Err(error) => report.missing.push(format!("scale: {error:#}")),
        }
    }
    if options.wants("memory") {
        match crate::memory::run(&ws, &options, &target).await {
            Ok(part) => report.memory = Some(part),
            Err(error) => report.missing.push(format!("memory: {error:#}")),
        }
    }
    if options.wants("operator") {
        match crate::operator::run(&ws, &options).await {
            Ok(operator) => report.operator = Some(operator),
            Err(error) => report.missing.push(format!("operator: {error:#}")),
        }
    }
    let text = report.render();
    std::fs::write(&options.out, &text)
        .with_context(|| format!("writing {}", options.out.display()))?;
    println!("{text}");
    eprintln!("bench: wrote {}", options.out.display());
    Ok(())
}
