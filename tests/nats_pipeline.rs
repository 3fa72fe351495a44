//! The distributed pipeline over NATS JetStream: `tally capture` publishes,
//! three `tally apply` processes share one durable consumer, against a
//! private `nats-server -js`. Under concurrent writers an applier is killed
//! with SIGKILL and restarted, then the NATS server itself restarts; the
//! views still end equal to their SELECT on the source, with nothing
//! dead-lettered. And an applier pointed at a NATS server that is not there
//! says so, naming it, instead of waiting forever.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tally::natsserver::NatsServer;

fn applier(config: &str, parallel: usize) -> Spawned {
    spawn_tally(&[
        "apply",
        "--config",
        config,
        "--parallel",
        &parallel.to_string(),
    ])
}

/// Fails when a pipeline process has exited: they all run until SIGTERM, so
/// an early exit is the failure to report (not the views that then never
/// converge).
fn assert_running(capture: &mut Spawned, appliers: &mut [Spawned], when: &str) {
    if let Some(status) = capture.try_wait().unwrap() {
        panic!("capture exited {when}: {status}");
    }
    for (i, applier) in appliers.iter_mut().enumerate() {
        if let Some(status) = applier.try_wait().unwrap() {
            panic!("applier {i} exited {when}: {status}");
        }
    }
}

/// What JetStream holds, from the server's `/jsz`: (streams, consumers,
/// messages ever stored across streams).
fn jetstream_totals(nats: &NatsServer) -> (u64, u64, u64) {
    let body = nats
        .monitor_get("/jsz?streams=true")
        .unwrap_or_else(|e| panic!("{e}"));
    let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
    let stored = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
        .map(|stream| stream["state"]["last_seq"].as_u64().unwrap_or(0))
        .sum();
    (
        jsz["streams"].as_u64().unwrap_or(0),
        jsz["consumers"].as_u64().unwrap_or(0),
        stored,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_pipeline_survives_applier_and_server_restarts() {
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let mut nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    env.use_nats(&nats.url());
    let config = env.config_path();
    let config = config.to_str().unwrap();

    // Existing rows: bootstrap to a file, applied from the file.
    let boot = env.bootstrap();
    let status = tally_command(&[
        "apply",
        "--config",
        config,
        "--input",
        boot.to_str().unwrap(),
    ])
    .status()
    .unwrap();
    assert!(status.success(), "apply --input of the bootstrap: {status}");
    let model = env.model().await;
    assert!(
        env.verify(&model).await.is_empty(),
        "the bootstrap alone matches the source"
    );

    // The pipeline: one publisher, three appliers sharing the consumer.
    let mut capture = spawn_tally(&["capture", "--config", config]);
    let mut appliers: Vec<Spawned> = (0..3).map(|i| applier(config, 1 + i % 2)).collect();
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_running(&mut capture, &mut appliers, "while writers ran");

    // An applier crashes (its unacknowledged messages are redelivered) and
    // comes back.
    appliers[0].kill().unwrap();
    appliers[0].wait().unwrap();
    appliers[0] = applier(config, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_running(&mut capture, &mut appliers, "after an applier restarted");

    // The NATS server restarts under everyone: same port, same storage.
    let began = Instant::now();
    tokio::task::block_in_place(|| nats.restart()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nats-server restarted in {} ms",
        began.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    writers.stop().await;
    assert_running(
        &mut capture,
        &mut appliers,
        "after the NATS server restarted",
    );

    env.wait_until_converged(&model, Duration::from_secs(60))
        .await;
    assert_running(&mut capture, &mut appliers, "while the views caught up");
    let (streams, consumers, stored) = jetstream_totals(&nats);
    eprintln!("JetStream: {streams} streams, {consumers} consumers, {stored} messages stored");
    assert!(streams >= 1, "capture created no stream");
    assert!(consumers >= 1, "the appliers created no consumer");
    assert!(stored > 0, "nothing went through JetStream");

    for (name, process) in
        std::iter::once(("capture", &mut capture)).chain(appliers.iter_mut().map(|a| ("apply", a)))
    {
        let status = terminate(process);
        assert!(status.success(), "{name} exits 0 on SIGTERM, got {status}");
    }
    assert_eq!(env.dead_letters().await, 0);
    let status = tally_command(&["verify", "--config", config])
        .status()
        .unwrap();
    assert!(status.success(), "tally verify: {status}");
}

#[tokio::test]
async fn apply_names_an_unreachable_nats_server() {
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    // A port nothing listens on: bound, then released.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.use_nats(&format!("nats://127.0.0.1:{port}"));
    let config = env.config_path();

    let mut child = Spawned(
        tally_command(&["apply", "--config", config.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let began = Instant::now();
    let status = tokio::task::spawn_blocking(move || wait_for(&mut child, Duration::from_secs(15)))
        .await
        .unwrap();
    let stderr = reader.join().unwrap();
    eprintln!(
        "apply gave up after {} ms ({status}); its stderr:\n{stderr}",
        began.elapsed().as_millis()
    );
    assert!(!status.success(), "apply without a NATS server must fail");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr does not name the server: {stderr}"
    );
}
