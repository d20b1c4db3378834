//! The `chorus` binary: parse flags, resolve the model, serve until ctrl-c or SIGTERM.

use std::io::{IsTerminal, Write};

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use chorus_server::config::{Command, Config, LogFormat, ModelsAction};
use chorus_server::models_cmd;
use chorus_server::resolve::resolve_at;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    init_logging(config.log_format);
    match serve(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chorus: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let (model, dir, revision) = (
        config.model.clone(),
        config.models_dir.clone(),
        config.revision.clone(),
    );
    if let Some(Command::Models { action }) = &config.command {
        match action {
            None | Some(ModelsAction::List) => models_cmd::list(&dir)?,
            Some(ModelsAction::Pull { name }) => models_cmd::pull(name, &dir, &revision)?,
        }
        return Ok(());
    }
    if !config.download_only {
        config.check()?;
    }
    let resolved =
        tokio::task::spawn_blocking(move || resolve_at(&model, &dir, &revision)).await??;
    if config.download_only {
        models_cmd::emit(&format!("{}\n", resolved.path.display()));
        return Ok(());
    }
    let name = config.served_model_name.clone().unwrap_or(resolved.name);
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| format!("--host {} --port {}: {e}", config.host, config.port))?;
    tracing::info!(
        address = %listener.local_addr()?,
        model = %name,
        api_key = if config.api_key.is_some() { "required" } else { "off" },
        "chorus listening"
    );
    chorus_server::run(listener, config, resolved.path, name, shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: not in files, pipes, journald or kubectl logs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log that cannot be written (a closed pipe, a full disk) is dropped: the
        // default reports it with `eprintln!`, which panics on the same stderr in
        // whichever thread logged, the inference thread included.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on ctrl-c or SIGTERM, which start the drain; a second one, during the drain,
/// exits at once (as uvicorn and vLLM do), for whoever cannot wait for the grace period.
async fn shutdown_signal() {
    signal().await;
    tokio::spawn(async {
        signal().await;
        tracing::warn!("a second signal during the drain: exiting now");
        std::process::exit(130);
    });
}

/// Resolves on the next ctrl-c or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
