//! The mock AI service as a process: `mock-ai --listen 127.0.0.1:9000`.
//! Faults at run time: `curl -XPOST localhost:9000/__mock/faults -d '{"error_rate":0.5}'`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use loadtests::mock::{tls_config, MockAi};

#[derive(Parser)]
#[command(about = "Mock AI service with run-time fault injection")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    #[arg(long, default_value = "v1")]
    model_version: String,
    /// Fixed added latency in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Worker threads (1 keeps the mock on one core in benchmarks).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some(
                tls_config(&std::fs::read_to_string(c)?, &std::fs::read_to_string(k)?)
                    .map_err(anyhow::Error::msg)?,
            ),
            _ => None,
        };
        let mock = MockAi::bind(args.listen, tls).await?;
        mock.set_model_version(&args.model_version);
        mock.set_delay(Duration::from_millis(args.delay_ms));
        eprintln!("mock-ai listening on {}", mock.url());
        tokio::signal::ctrl_c().await?;
        mock.shutdown().await;
        Ok(())
    })
}
