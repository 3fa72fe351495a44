//! `tally run`: capture and apply in one process with the embedded
//! transport, under concurrent writers, killed with SIGKILL once and
//! restarted. Afterwards every view equals its SELECT on the source.

mod common;

use std::time::Duration;

use common::*;

fn run(config: &str) -> Spawned {
    spawn_tally(&["run", "--config", config, "--parallel", "3"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_survives_sigkill_and_converges() {
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    // Existing rows come in through bootstrap, then `run` streams.
    let model = env.bootstrap_and_apply(2, 1000).await;

    let mut process = run(config);
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    process.kill().unwrap();
    process.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    process = run(config);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    writers.stop().await;

    // The pipeline catches up on its own.
    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;
    assert!(terminate(&mut process).success(), "run exits 0 on SIGTERM");
    assert_eq!(env.dead_letters().await, 0);
}
