//! The fault-injection suite: the failures production sees, injected into
//! real `tally` processes under continuous writes, each scenario ending with
//! `tally verify` exiting 0 and nothing in the dead-letter table (every
//! event the writers caused is valid, so any dead letter is a valid event
//! lost to the fault).
//!
//! * SIGKILL of `tally run` (embedded transport) at random points;
//! * SIGKILL of `tally capture` and of `tally apply` processes over NATS at
//!   random points (with the embedded scenario, more than 20 kills);
//! * the target PostgreSQL restarted under load;
//! * the NATS server restarted, and SIGSTOPped for longer than the ack wait;
//! * an applier SIGSTOPped for longer than the ack wait, so its messages are
//!   redelivered to another applier (checked through the consumer's
//!   redelivery count) and its own late commit is dropped by the guard;
//! * the target refusing connections for 10 seconds.
//!
//! Kill schedules come from a seeded generator: `TALLY_FAULT_SEED` (default
//! 20261126) reproduces a run; each scenario prints its schedule. Each
//! scenario prints one `fault-scenario:` line with what was injected, how
//! often, and the outcome, and appends it to the file named by
//! `TALLY_RELIABILITY_LOG` when set (RELIABILITY.md is built from it).

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::apply::Model;
use tally::natsserver::NatsServer;

/// SIGKILLs of `tally run` in the embedded scenario.
const EMBEDDED_KILLS: usize = 10;
/// SIGKILLs of capture and appliers in the NATS scenario.
const NATS_KILLS: usize = 12;
/// The NATS tests' ack wait (`TestEnv::use_nats`): a pause must outlast it.
const ACK_WAIT: Duration = Duration::from_secs(3);

fn seed(scenario: u64) -> u64 {
    let base = std::env::var("TALLY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_126u64);
    base ^ scenario.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One scenario's record: what was injected, then the outcome line.
struct Scenario {
    name: &'static str,
    started: Instant,
    injected: Vec<String>,
}

impl Scenario {
    fn new(name: &'static str) -> Scenario {
        eprintln!("scenario {name}: starting");
        Scenario {
            name,
            started: Instant::now(),
            injected: Vec::new(),
        }
    }

    fn inject(&mut self, what: String) {
        eprintln!(
            "scenario {}: {:>6.1} s  {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        self.injected.push(what);
    }

    /// Prints (and logs, with `TALLY_RELIABILITY_LOG`) the outcome.
    fn finish(self, summary: &str, outcome: &str) {
        let line = format!(
            "fault-scenario: {} | {} | {} faults | {} | {:.1} s",
            self.name,
            summary,
            self.injected.len(),
            outcome,
            self.started.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        if let Ok(path) = std::env::var("TALLY_RELIABILITY_LOG") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(file, "{line}").unwrap();
        }
    }
}

/// The end of every scenario: the views converge, `tally verify` (the CLI)
/// exits 0 and no event was dead-lettered. Returns how long convergence
/// took after the writers stopped.
async fn assert_exact(env: &TestEnv, model: &Model) -> Duration {
    let began = Instant::now();
    env.wait_until_converged(model, Duration::from_secs(90))
        .await;
    let took = began.elapsed();
    let config = env.config_path();
    let status = tally_command(&["verify", "--config", config.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "tally verify: {status}");
    assert_eq!(
        env.dead_letters().await,
        0,
        "valid events were dead-lettered"
    );
    took
}

fn assert_alive(process: &mut Spawned, what: &str, when: &str) {
    if let Some(status) = process.try_wait().unwrap() {
        panic!("{what} exited ({status}) {when}; it must retry and keep running");
    }
}

fn run(config: &str) -> Spawned {
    spawn_tally(&["run", "--config", config, "--parallel", "2"])
}

fn applier(config: &str) -> Spawned {
    spawn_tally(&["apply", "--config", config, "--parallel", "2"])
}

fn capture(config: &str) -> Spawned {
    spawn_tally(&["capture", "--config", config])
}

async fn start_nats() -> NatsServer {
    tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The NATS consumer's redelivery count, from the server's `/jsz`.
fn redelivered(nats: &NatsServer) -> u64 {
    let body = nats
        .monitor_get("/jsz?consumers=true")
        .unwrap_or_else(|e| panic!("{e}"));
    let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
        .flat_map(|stream| stream["consumer_detail"].as_array().into_iter().flatten())
        .map(|consumer| consumer["num_redelivered"].as_u64().unwrap_or(0))
        .sum()
}

fn send_signal(process: &Spawned, signal: i32) {
    // SAFETY: kill(2) on a child we own; no memory is touched.
    let rc = unsafe { libc::kill(process.id() as i32, signal) };
    assert_eq!(rc, 0, "kill({}, {signal})", process.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_run_survives_random_sigkills() {
    let mut scenario = Scenario::new("embedded: SIGKILL `tally run` at random points");
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;
    let mut rng = StdRng::seed_from_u64(seed(1));

    let mut process = run(config);
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    for kill in 1..=EMBEDDED_KILLS {
        // Anywhere from mid-start-up (slot not yet taken) to steady apply.
        let after = Duration::from_millis(rng.random_range(100..1500));
        let down = Duration::from_millis(rng.random_range(0..400));
        tokio::time::sleep(after).await;
        assert_alive(&mut process, "tally run", "between kills");
        process.kill().unwrap();
        process.wait().unwrap();
        scenario.inject(format!(
            "SIGKILL {kill}/{EMBEDDED_KILLS} of tally run after {} ms, down {} ms",
            after.as_millis(),
            down.as_millis()
        ));
        tokio::time::sleep(down).await;
        process = run(config);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    writers.stop().await;
    let took = assert_exact(&env, &model).await;
    assert!(terminate(&mut process).success(), "run exits 0 on SIGTERM");
    scenario.finish(
        &format!("{EMBEDDED_KILLS} SIGKILLs of `tally run --parallel 2`, 3 writers"),
        &format!(
            "verify exit 0, 0 dead letters, converged {} ms after writers stopped",
            took.as_millis()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_pipeline_survives_random_sigkills_of_capture_and_appliers() {
    let mut scenario = Scenario::new("NATS: SIGKILL capture and appliers at random points");
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let nats = start_nats().await;
    env.use_nats(&nats.url());
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;
    let mut rng = StdRng::seed_from_u64(seed(2));

    let mut capture_process = capture(config);
    let mut appliers: Vec<Spawned> = (0..3).map(|_| applier(config)).collect();
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    let (mut capture_kills, mut apply_kills) = (0, 0);
    for kill in 1..=NATS_KILLS {
        let after = Duration::from_millis(rng.random_range(100..1200));
        let down = Duration::from_millis(rng.random_range(0..400));
        tokio::time::sleep(after).await;
        // One in four kills hits capture, the rest an applier.
        let victim = rng.random_range(0..4usize);
        let (name, process) = if victim == 3 {
            capture_kills += 1;
            ("tally capture", &mut capture_process)
        } else {
            apply_kills += 1;
            ("tally apply", &mut appliers[victim])
        };
        assert_alive(process, name, "between kills");
        process.kill().unwrap();
        process.wait().unwrap();
        scenario.inject(format!(
            "SIGKILL {kill}/{NATS_KILLS} of {name}{} after {} ms, down {} ms",
            if victim == 3 {
                String::new()
            } else {
                format!(" #{victim}")
            },
            after.as_millis(),
            down.as_millis()
        ));
        tokio::time::sleep(down).await;
        *process = if victim == 3 {
            capture(config)
        } else {
            applier(config)
        };
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    writers.stop().await;
    let took = assert_exact(&env, &model).await;
    for process in std::iter::once(&mut capture_process).chain(appliers.iter_mut()) {
        assert!(terminate(process).success(), "exit 0 on SIGTERM");
    }
    scenario.finish(
        &format!(
            "{capture_kills} SIGKILLs of `tally capture`, {apply_kills} of the 3 `tally apply`, 3 writers"
        ),
        &format!(
            "verify exit 0, 0 dead letters, converged {} ms after writers stopped",
            took.as_millis()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_restart_under_load() {
    let mut scenario = Scenario::new("embedded: target PostgreSQL restarted under load");
    let (env, mut target_cluster) =
        TestEnv::with_separate_target(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;

    let mut process = run(config);
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let began = Instant::now();
        // Round 1: a clean fast shutdown; round 2: a crash (every server
        // process SIGKILLed), then recovery.
        let how = if round == 1 {
            "fast shutdown, start"
        } else {
            target_cluster.kill();
            "SIGKILL of every server process, crash recovery"
        };
        tokio::task::block_in_place(|| target_cluster.restart()).expect("restart the target");
        scenario.inject(format!(
            "target restart {round}/2 ({how}) took {} ms",
            began.elapsed().as_millis()
        ));
        assert_alive(&mut process, "tally run", "after the target restarted");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    writers.stop().await;
    let took = assert_exact(&env, &model).await;
    assert!(terminate(&mut process).success(), "run exits 0 on SIGTERM");
    drop(target_cluster);
    scenario.finish(
        "2 restarts of the target's cluster (1 clean, 1 crash), `tally run --parallel 2`, 3 writers",
        &format!(
            "verify exit 0, 0 dead letters, converged {} ms after writers stopped",
            took.as_millis()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_restart_and_sigstop_longer_than_ack_wait() {
    let mut scenario = Scenario::new("NATS: server restarted, then SIGSTOPped past the ack wait");
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let mut nats = start_nats().await;
    env.use_nats(&nats.url());
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;

    let mut capture_process = capture(config);
    let mut appliers: Vec<Spawned> = (0..2).map(|_| applier(config)).collect();
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let began = Instant::now();
    tokio::task::block_in_place(|| nats.restart()).unwrap_or_else(|e| panic!("{e}"));
    scenario.inject(format!(
        "nats-server restarted (same port and storage) in {} ms",
        began.elapsed().as_millis()
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let pause = ACK_WAIT + Duration::from_secs(2);
    tokio::task::block_in_place(|| nats.pause()).unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(pause).await;
    tokio::task::block_in_place(|| nats.resume()).unwrap_or_else(|e| panic!("{e}"));
    scenario.inject(format!(
        "nats-server SIGSTOPped for {} ms (ack wait {} ms), then SIGCONT",
        pause.as_millis(),
        ACK_WAIT.as_millis()
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_alive(
        &mut capture_process,
        "tally capture",
        "after the NATS faults",
    );
    for a in &mut appliers {
        assert_alive(a, "tally apply", "after the NATS faults");
    }
    writers.stop().await;
    let took = assert_exact(&env, &model).await;
    for process in std::iter::once(&mut capture_process).chain(appliers.iter_mut()) {
        assert!(terminate(process).success(), "exit 0 on SIGTERM");
    }
    scenario.finish(
        "1 restart and 1 SIGSTOP of nats-server, capture + 2 appliers, 3 writers",
        &format!(
            "verify exit 0, 0 dead letters, {} redeliveries, converged {} ms after writers stopped",
            redelivered(&nats),
            took.as_millis()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn applier_sigstopped_past_ack_wait_is_covered_by_another() {
    let mut scenario = Scenario::new("NATS: an applier SIGSTOPped past the ack wait");
    let env = TestEnv::new(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let nats = start_nats().await;
    env.use_nats(&nats.url());
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;

    let mut capture_process = capture(config);
    let mut appliers: Vec<Spawned> = (0..2).map(|_| applier(config)).collect();
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    tokio::time::sleep(Duration::from_millis(2000)).await;

    let before = redelivered(&nats);
    let pause = ACK_WAIT * 2;
    send_signal(&appliers[0], libc::SIGSTOP);
    tokio::time::sleep(pause).await;
    let during = redelivered(&nats);
    send_signal(&appliers[0], libc::SIGCONT);
    scenario.inject(format!(
        "applier #0 SIGSTOPped for {} ms (ack wait {} ms), then SIGCONT",
        pause.as_millis(),
        ACK_WAIT.as_millis()
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writers.stop().await;
    for a in &mut appliers {
        assert_alive(a, "tally apply", "after the pause");
    }
    let took = assert_exact(&env, &model).await;
    assert!(
        during > before,
        "nothing the paused applier held was redelivered ({before} → {during})"
    );
    for process in std::iter::once(&mut capture_process).chain(appliers.iter_mut()) {
        assert!(terminate(process).success(), "exit 0 on SIGTERM");
    }
    scenario.finish(
        "1 SIGSTOP of one of 2 appliers, capture, 3 writers",
        &format!(
            "{} messages redelivered to the other applier while paused; verify exit 0, 0 dead letters, converged {} ms after writers stopped",
            during - before,
            took.as_millis()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_appliers_wait_out_a_target_refusing_connections_for_10_s() {
    let mut scenario = Scenario::new("NATS: the target refuses connections for 10 s");
    let (env, mut target_cluster) =
        TestEnv::with_separate_target(ORDERS_SCHEMA, ORDERS_VIEWS).await;
    let nats = start_nats().await;
    env.use_nats(&nats.url());
    let config = env.config_path();
    let config = config.to_str().unwrap();
    let model = env.bootstrap_and_apply(2, 1000).await;

    let mut capture_process = capture(config);
    let mut appliers: Vec<Spawned> = (0..2).map(|_| applier(config)).collect();
    let writers = Writers::start(&env.source_url, ORDERS_WRITES, 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    tokio::task::block_in_place(|| target_cluster.stop()).expect("stop the target");
    tokio::time::sleep(Duration::from_secs(10)).await;
    for a in &mut appliers {
        assert_alive(a, "tally apply", "while the target was down");
    }
    tokio::task::block_in_place(|| target_cluster.restart()).expect("start the target again");
    scenario.inject("target cluster stopped 10 s (connections refused), then started".into());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writers.stop().await;
    let took = assert_exact(&env, &model).await;
    for process in std::iter::once(&mut capture_process).chain(appliers.iter_mut()) {
        assert!(terminate(process).success(), "exit 0 on SIGTERM");
    }
    scenario.finish(
        "target down 10 s under 3 writers, capture + 2 appliers over NATS",
        &format!(
            "verify exit 0, 0 dead letters, converged {} ms after writers stopped",
            took.as_millis()
        ),
    );
}
