//! A private, throwaway PostgreSQL cluster for integration tests and `tally demo`.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory and
//! starts a postmaster on a free loopback port, set up for logical decoding
//! (`wal_level = logical`, 20 replication slots and WAL senders) with trust
//! authentication for the superuser [`SUPERUSER`] on 127.0.0.1, for normal and
//! replication connections alike. Everything is blocking (`std::process`), so
//! it works from sync tests and from async ones; [`connect`] is the one async
//! helper.
//!
//! # Binaries
//!
//! `initdb` and `postgres` are looked up in, first to last: the directory named
//! by `TALLY_PG_BINDIR` (when set, nothing else is tried); `pg_config
//! --bindir`; the highest version under `/usr/lib/postgresql/*/bin`; `PATH`.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When this process's effective uid is 0,
//! `initdb` and the server run as the `postgres` system user (Debian's package
//! creates it), else as `nobody`, through [`CommandExt::uid`]/[`CommandExt::gid`]
//! (no shell, no `runuser`). The temporary directory is chowned to that user
//! and is created under a parent it can traverse (`$TMPDIR`, else `/tmp`).
//!
//! # Layout
//!
//! `ROOT/` (mode 0700) holds `data/` (the data directory), `server.log`
//! (the postmaster's stdout and stderr, appended to across restarts), the
//! server's Unix socket, and a marker naming the owning process. Our settings
//! live in `data/tally.conf`, included from `postgresql.conf`.
//!
//! # Process lifetime
//!
//! The postmaster is spawned directly (not through `pg_ctl`, which would
//! daemonize it), so it is a child of this process, and this process reaps it.
//! That matters beyond tidiness: a daemonized postmaster that is killed is
//! reparented to PID 1, and where PID 1 does not reap (as in some sandboxes)
//! its zombie keeps `postmaster.pid` "alive" and blocks every restart.
//! [`PgCluster::stop`] is `pg_ctl stop -m fast -w` done by hand: SIGINT (fast
//! shutdown), then wait.
//!
//! What keeps a postmaster from outliving the process that started it:
//! - `Drop` stops the server (also while a panicking test unwinds) and removes
//!   the directory (unless [`ClusterOptions::keep_dir`]).
//! - An `atexit` hook stops every cluster still alive when the process exits
//!   normally (e.g. one kept in a `static` and shared by tests, which is never
//!   dropped) and removes their directories.
//! - The postmaster (and initdb) get `PR_SET_PDEATHSIG(SIGKILL)`, so the
//!   kernel kills them when this process dies in any way, `SIGKILL` included;
//!   the backends then exit by themselves on postmaster death. Linux sends
//!   that signal when the *thread* that forked dies, so they are all spawned
//!   from one dedicated thread that lives as long as the process.
//! - Directories left behind by processes that died that way (their marker
//!   names a dead pid) are removed by the next process that starts a cluster.
//!
//! The postmaster is put in its own process group, so a terminal's Ctrl-C
//! reaches only this process: one that handles it (like `tally demo`) can
//! stop the server in order, one that dies of it takes the server along
//! through the death signal.
//!
//! Linux only (`prctl`, `/proc`).
//!
//! # Settings
//!
//! With `fsync = false` (the default) the cluster runs with `fsync = off` and
//! `full_page_writes = off`, which only lose data when the *machine* crashes.
//! `synchronous_commit` is deliberately left `on`: without fsync it costs only
//! one `write()` per commit, while `off` loses recently committed transactions
//! when the server is killed ([`PgCluster::kill`]), which would make crash
//! tests flaky, and it delays logical decoding of each commit until the WAL
//! writer runs. Set it through [`ClusterOptions::extra_settings`] if wanted.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsString};
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock, PoisonError, TryLockError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use thiserror::Error;

/// The superuser that `initdb` creates; URLs connect as this user, no password.
pub const SUPERUSER: &str = "tally";

/// Environment variable naming the directory that holds `initdb` and `postgres`.
pub const BINDIR_ENV: &str = "TALLY_PG_BINDIR";

const DIR_PREFIX: &str = "tally-pg-";
const OWNER_FILE: &str = "tally-owner.pid";
const SETTINGS_FILE: &str = "tally.conf";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: u32 = 5;
const LOG_TAIL_LINES: usize = 20;
/// `sun_path` holds 108 bytes, NUL included; the socket is `DIR/.s.PGSQL.PORT`.
const MAX_SOCKET_DIR_LEN: usize = 107 - ".s.PGSQL.65535".len() - 1;

/// What went wrong starting, using or stopping a cluster.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; searched {searched}. \
         Install Debian's `postgresql` package (apt-get install -y postgresql), \
         or set {BINDIR_ENV} to the directory that holds them"
    )]
    BinariesNotFound { searched: String },
    #[error(
        "running as root, which PostgreSQL refuses, and neither the `postgres` \
         nor the `nobody` user exists to run it as"
    )]
    NoUnprivilegedUser,
    #[error("no temporary directory that user `{user}` can reach: {detail}")]
    NoUsableTempDir { user: String, detail: String },
    #[error("initdb failed ({status}); its output:\n{output}")]
    InitDb { status: String, output: String },
    #[error("PostgreSQL failed to start: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    Start {
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("PostgreSQL did not stop cleanly: {reason}")]
    Stop { reason: String },
    #[error("the server of this cluster is not running")]
    NotRunning,
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{context}: {source}")]
    Postgres {
        context: String,
        source: tokio_postgres::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Connect(#[from] crate::db::ConnectError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// How to set up a cluster. `ClusterOptions::default()` is what tests want.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `fsync`, and `full_page_writes` with it. Off by default (fast, and safe
    /// against process crashes); benchmarks set it on.
    pub fsync: bool,
    /// More `postgresql.conf` settings, applied after (so over) ours. Values
    /// are written quoted, so `("work_mem", "64MB")` is fine.
    pub extra_settings: Vec<(String, String)>,
    /// Leave the directory in place when the cluster is dropped (to look at
    /// the log or data afterwards). The server is stopped all the same.
    pub keep_dir: bool,
    /// The CPUs the server's processes may run on (empty: any). Benchmarks
    /// give the source and the target different cores, as two machines.
    pub cpus: Vec<usize>,
}

/// A private PostgreSQL cluster in a temporary directory, on its own port.
///
/// Dropping it stops the server and removes the directory.
#[derive(Debug)]
pub struct PgCluster {
    id: u64,
    /// `None` once the directory is kept (`keep_dir`).
    dir: Option<TempDir>,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    bins: PgBinaries,
    run_as: Option<RunAs>,
    options: ClusterOptions,
    child: Option<Child>,
    initdb_time: Duration,
    server_start_time: Duration,
}

impl PgCluster {
    /// Starts a cluster with the default options (see [`ClusterOptions`]).
    pub fn start() -> Result<PgCluster, ClusterError> {
        PgCluster::start_with(ClusterOptions::default())
    }

    /// Creates and starts a cluster. Blocks until it accepts connections.
    pub fn start_with(options: ClusterOptions) -> Result<PgCluster, ClusterError> {
        for (name, value) in &options.extra_settings {
            validate_setting(name, value)?;
        }
        let began = Instant::now();
        let bins = find_binaries()?;
        let run_as = unprivileged_user()?;
        let parent = temp_parent(run_as.as_ref())?;
        install_exit_hook();
        static STALE_SWEEP: Once = Once::new();
        STALE_SWEEP.call_once(|| remove_stale_dirs(&parent));

        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&parent)
            .map_err(io_err(format!(
                "creating a temporary directory in {}",
                parent.display()
            )))?;
        let root = dir.path().to_path_buf();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&LIVE).insert(
            id,
            Live {
                pid: None,
                root: root.clone(),
                keep: options.keep_dir,
            },
        );
        let keep_dir = options.keep_dir;
        // From here on, Drop cleans up whatever fails.
        let mut cluster = PgCluster {
            id,
            dir: Some(dir),
            data: root.join("data"),
            log: root.join("server.log"),
            root,
            port: 0,
            bins,
            run_as,
            options,
            child: None,
            initdb_time: Duration::ZERO,
            server_start_time: Duration::ZERO,
        };
        if keep_dir {
            if let Some(dir) = cluster.dir.take() {
                let _ = dir.keep();
            }
        } else {
            let marker = cluster.root.join(OWNER_FILE);
            fs::write(&marker, std::process::id().to_string())
                .map_err(io_err(format!("writing {}", marker.display())))?;
        }
        fs::set_permissions(&cluster.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", cluster.root.display())))?;
        cluster.give_to_server_user(&cluster.root)?;

        let initdb_began = Instant::now();
        cluster.initdb()?;
        cluster.initdb_time = initdb_began.elapsed();
        let server_began = Instant::now();
        cluster.start_server(true)?;
        cluster.server_start_time = server_began.elapsed();
        tracing::info!(
            port = cluster.port,
            dir = %cluster.root.display(),
            total_ms = began.elapsed().as_millis() as u64,
            initdb_ms = cluster.initdb_time.as_millis() as u64,
            start_ms = cluster.server_start_time.as_millis() as u64,
            "started private PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// The TCP port the server listens on (127.0.0.1). Stays the same across
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://tally@127.0.0.1:PORT/DATABASE` (trust auth, no password).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Creates a database and returns its URL. Any name PostgreSQL accepts
    /// (1 to 63 bytes, no NUL) works; it is quoted, so case and spaces stay.
    ///
    /// Blocking; safe to call from inside a tokio runtime (it runs its own on
    /// a helper thread).
    pub fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        validate_database_name(name)?;
        if self.child.is_none() {
            return Err(ClusterError::NotRunning);
        }
        let sql = format!("CREATE DATABASE {}", quote_ident(name));
        execute_blocking(&self.url("postgres"), &sql)?;
        Ok(self.url(name))
    }

    /// Stops the server with a fast shutdown (as `pg_ctl stop -m fast -w`):
    /// open transactions are rolled back, a checkpoint is written. Does
    /// nothing when it is not running.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let result = shutdown(&mut child);
        self.set_live_pid(None);
        result
    }

    /// Stops the server if it runs, then starts it again on the same data
    /// directory and port. After [`kill`](Self::kill) this runs crash recovery.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop()?;
        self.start_server(false)
    }

    /// Crash simulation: SIGKILLs the postmaster and, at the same instant,
    /// all its children (backends, WAL writer, ...), as a machine crash would,
    /// minus the loss of the OS page cache. Committed transactions survive;
    /// [`restart`](Self::restart) brings the server back through recovery.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill_server_processes(child.id());
        let _ = child.wait();
        self.set_live_pid(None);
    }

    /// The postmaster's pid while the server runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU seconds the server has used so far: the postmaster, its running
    /// processes and those that have exited. Benchmarks take the difference
    /// over a run to see what a workload cost this server.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let postmaster = self.postmaster_pid()?;
        Some(
            crate::cpu::process_cpu_seconds(postmaster, true)?
                + self.running_cpu_seconds(|_| true)?,
        )
    }

    /// CPU seconds of the server's running processes whose title holds
    /// `title` (`walsender`, `checkpointer`, a database's name): the part of
    /// [`cpu_seconds`](Self::cpu_seconds) one kind of process used.
    pub fn cpu_seconds_of(&self, title: &str) -> Option<f64> {
        self.running_cpu_seconds(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(title))
        })
    }

    /// CPU seconds of the postmaster's running children that `keep` picks.
    fn running_cpu_seconds(&self, keep: impl Fn(u32) -> bool) -> Option<f64> {
        Some(
            child_pids(self.postmaster_pid()?)
                .into_iter()
                .filter(|&pid| keep(pid))
                .filter_map(|pid| crate::cpu::process_cpu_seconds(pid, false))
                .sum(),
        )
    }

    fn set_live_pid(&self, pid: Option<u32>) {
        if let Some(live) = lock(&LIVE).get_mut(&self.id) {
            live.pid = pid;
        }
    }

    /// A command that runs as the server's user, in the cluster's directory.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA");
        if let Some(user) = &self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    fn give_to_server_user(&self, path: &Path) -> Result<(), ClusterError> {
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(io_err(format!("chown {} to {}", path.display(), user.name)))?;
        }
        Ok(())
    }

    fn initdb(&mut self) -> Result<(), ClusterError> {
        let mut command = self.command(&self.bins.initdb);
        command
            .arg("-D")
            .arg(&self.data)
            .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = spawn_tied(command)
            .and_then(Child::wait_with_output)
            .map_err(io_err(format!("running {}", self.bins.initdb.display())))?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            return Err(ClusterError::InitDb {
                status: output.status.to_string(),
                output: text,
            });
        }

        let hba = self.data.join("pg_hba.conf");
        fs::write(
            &hba,
            "# Written by tally's PgCluster: trust on loopback only.\n\
             local all         all                trust\n\
             host  all         all  127.0.0.1/32  trust\n\
             host  all         all  ::1/128       trust\n\
             local replication all                trust\n\
             host  replication all  127.0.0.1/32  trust\n\
             host  replication all  ::1/128       trust\n",
        )
        .map_err(io_err(format!("writing {}", hba.display())))?;

        let conf = self.data.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(format!("opening {}", conf.display())))?;
        io::Write::write_all(
            &mut file,
            format!("\n# Added by tally's PgCluster.\ninclude = '{SETTINGS_FILE}'\n").as_bytes(),
        )
        .map_err(io_err(format!("writing {}", conf.display())))?;
        Ok(())
    }

    fn settings_text(&self) -> String {
        let on_off = |on: bool| if on { "on" } else { "off" };
        let socket_dir = self.root.to_string_lossy();
        let socket_dir = if socket_dir.len() <= MAX_SOCKET_DIR_LEN {
            socket_dir.into_owned()
        } else {
            String::new() // Too long for a Unix socket path: TCP only.
        };
        let port = self.port.to_string();
        let ours: [(&str, &str); 13] = [
            ("listen_addresses", "127.0.0.1"),
            ("port", &port),
            ("unix_socket_directories", &socket_dir),
            ("wal_level", "logical"),
            ("max_replication_slots", "20"),
            ("max_wal_senders", "20"),
            ("max_connections", "200"),
            ("shared_buffers", "128MB"),
            ("fsync", on_off(self.options.fsync)),
            ("full_page_writes", on_off(self.options.fsync)),
            ("logging_collector", "off"),
            ("log_destination", "stderr"),
            ("lc_messages", "C"),
        ];
        let mut text = String::from("# Written by tally's PgCluster; rewritten at each start.\n");
        let extra = self
            .options
            .extra_settings
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()));
        for (name, value) in ours.into_iter().chain(extra) {
            let _ = writeln!(text, "{name} = {}", quote_setting(value));
        }
        text
    }

    /// Starts the postmaster and waits until it accepts connections. Retries
    /// when the port is taken (picking another one if `may_change_port`) or
    /// the remains of a killed server are still going away.
    fn start_server(&mut self, may_change_port: bool) -> Result<(), ClusterError> {
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS {
            if self.port == 0 || (attempt > 0 && may_change_port) {
                let port = pick_port()?;
                release_port(std::mem::replace(&mut self.port, port));
            } else if attempt > 0 {
                thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            let settings = self.data.join(SETTINGS_FILE);
            fs::write(&settings, self.settings_text())
                .map_err(io_err(format!("writing {}", settings.display())))?;
            self.give_to_server_user(&settings)?;
            match self.start_once() {
                Ok(()) => return Ok(()),
                Err(Failure::Retry(error)) => {
                    tracing::debug!(attempt, %error, "PostgreSQL start failed; retrying");
                    last_error = Some(error);
                }
                Err(Failure::Fatal(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or(ClusterError::NotRunning))
    }

    fn start_once(&mut self) -> Result<(), Failure> {
        let log_offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        self.give_to_server_user(&self.log)?;
        let log_too = log
            .try_clone()
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let mut command = self.command(&self.bins.postgres);
        crate::cpu::pin_command(&mut command, &self.options.cpus).map_err(io_err(format!(
            "pinning the server to CPUs {:?}",
            self.options.cpus
        )))?;
        command
            .arg("-D")
            .arg(&self.data)
            .stdout(log)
            .stderr(log_too)
            .process_group(0);
        let mut child = spawn_tied(command)
            .map_err(io_err(format!("running {}", self.bins.postgres.display())))?;
        let pid = child.id();
        self.set_live_pid(Some(pid));

        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(2);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.set_live_pid(None);
                    let tail = log_tail(&self.log, log_offset);
                    let error = self.start_error(format!("postgres exited ({status})"), &tail);
                    return Err(if is_retryable(&tail) {
                        Failure::Retry(error)
                    } else {
                        Failure::Fatal(error)
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    kill_server_processes(pid);
                    let _ = child.wait();
                    self.set_live_pid(None);
                    return Err(io_err("waiting for postgres")(e).into());
                }
            }
            if pid_file_says_ready(&self.data, pid) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_server_processes(pid);
                let _ = child.wait();
                self.set_live_pid(None);
                let tail = log_tail(&self.log, log_offset);
                let reason = format!("not ready after {} s", START_TIMEOUT.as_secs());
                return Err(Failure::Fatal(self.start_error(reason, &tail)));
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn start_error(&self, reason: String, log_tail: &str) -> ClusterError {
        ClusterError::Start {
            reason: format!(
                "{reason} (port {}, data {})",
                self.port,
                self.data.display()
            ),
            log: self.log.clone(),
            log_tail: log_tail.to_string(),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(%error, dir = %self.root.display(), "stopping PostgreSQL cluster");
        }
        lock(&LIVE).remove(&self.id);
        release_port(self.port);
        // `self.dir` (a TempDir) removes the directory when dropped, ignoring
        // errors; a kept directory has no TempDir any more.
    }
}

/// Runs `sql` on a fresh connection from a helper thread with its own
/// runtime, so that it works inside and outside a tokio runtime alike.
fn execute_blocking(url: &str, sql: &str) -> Result<(), ClusterError> {
    let run = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("building a tokio runtime"))?;
        runtime.block_on(async {
            let client = crate::db::connect(url).await?;
            client
                .batch_execute(sql)
                .await
                .map_err(|source| ClusterError::Postgres {
                    context: format!("running `{sql}`"),
                    source,
                })
        })
    };
    thread::scope(|scope| {
        scope.spawn(run).join().unwrap_or_else(|_| {
            Err(ClusterError::Io {
                context: format!("running `{sql}`"),
                source: io::Error::other("helper thread panicked"),
            })
        })
    })
}

enum Failure {
    Retry(ClusterError),
    Fatal(ClusterError),
}

impl From<ClusterError> for Failure {
    fn from(error: ClusterError) -> Self {
        Failure::Fatal(error)
    }
}

/// Log lines of a start that may succeed if tried again: the port was taken
/// between picking and binding it, or a killed server's processes still hold
/// its shared memory or lock files.
fn is_retryable(log_tail: &str) -> bool {
    [
        "could not bind",
        "Address already in use",
        "could not create any TCP/IP sockets",
        "is still in use",
        "lock file",
    ]
    .iter()
    .any(|needle| log_tail.contains(needle))
}

/// Whether `postmaster.pid` names `pid` and says "ready" (line 8), which the
/// postmaster writes once it accepts connections; `pg_ctl -w` checks the same.
fn pid_file_says_ready(data: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
        && lines.get(7).map(|l| l.trim()) == Some("ready")
}

/// The last [`LOG_TAIL_LINES`] lines written to the log after `offset`.
pub(crate) fn log_tail(log: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(log)?;
        let len = file.metadata()?.len();
        let from = offset.max(len.saturating_sub(64 * 1024));
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(server log unreadable: {error})"),
    }
}

/// Fast shutdown (SIGINT) and wait; escalates to immediate (SIGQUIT), then
/// SIGKILL, if the server does not go.
fn shutdown(child: &mut Child) -> Result<(), ClusterError> {
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(()); // It had died already (crash or external kill).
    }
    let pid = child.id();
    send_signal(pid, libc::SIGINT);
    if wait_child(child, STOP_TIMEOUT) {
        return Ok(());
    }
    send_signal(pid, libc::SIGQUIT);
    let reason = if wait_child(child, Duration::from_secs(5)) {
        format!(
            "fast shutdown took over {} s; used immediate shutdown",
            STOP_TIMEOUT.as_secs()
        )
    } else {
        kill_server_processes(pid);
        let _ = child.wait();
        "fast and immediate shutdown timed out; killed the server".to_string()
    };
    Err(ClusterError::Stop { reason })
}

/// Waits up to `timeout` for the child to exit; true when it has.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => {}
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
    }
}

/// SIGKILLs the postmaster and its children at once. The postmaster is
/// stopped first so that it cannot fork while its children are listed.
/// Waits (briefly) until the children are gone or zombies, so that a restart
/// does not find the shared memory still attached. Backends make their own
/// process groups, so killing the postmaster's group would not reach them.
fn kill_server_processes(postmaster: u32) {
    send_signal(postmaster, libc::SIGSTOP);
    let children = child_pids(postmaster);
    send_signal(postmaster, libc::SIGKILL);
    for &child in &children {
        send_signal(child, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.iter().any(|&pid| process_running(pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Pids whose parent is `parent`, from `/proc`.
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// State letter and parent pid from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let fields = crate::cpu::proc_stat_fields(pid)?;
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` exists and is not a zombie (a zombie has released its
/// memory, shared memory included).
pub(crate) fn process_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Whether a process with this pid exists (of any user; zombies included).
#[cfg(test)]
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

// ---------------------------------------------------------------------------
// Spawning server processes with a parent-death signal.

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns a server process (initdb, the postmaster; `nats-server` for
/// [`crate::natsserver`]) from the long-lived spawner thread, with
/// `PR_SET_PDEATHSIG(SIGKILL)` so that it dies with this process.
pub(crate) fn spawn_tied(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("tally-pg-spawner".into())
            .spawn(move || {
                for SpawnRequest { mut command, reply } in requests {
                    set_parent_death_signal(&mut command);
                    let _ = reply.send(command.spawn());
                }
            })
            .ok()
            .map(|_| sender)
    });
    let Some(spawner) = spawner else {
        // No spawner thread: spawn without the death signal, which would fire
        // when *this* thread ends.
        let mut command = command;
        return command.spawn();
    };
    let (reply, answer) = mpsc::channel();
    if let Err(mpsc::SendError(request)) = spawner.send(SpawnRequest { command, reply }) {
        let mut command = request.command;
        return command.spawn();
    }
    answer
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
}

fn set_parent_death_signal(command: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls, without allocating. It runs after the
    // uid change, which would otherwise clear the death signal.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died before the signal was armed.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// Clusters alive in this process, for the exit hook; ports handed out.

struct Live {
    pid: Option<u32>,
    root: PathBuf,
    keep: bool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static LIVE: Mutex<BTreeMap<u64, Live>> = Mutex::new(BTreeMap::new());
static PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn install_exit_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a function without arguments that never unwinds.
        unsafe { libc::atexit(stop_all_at_exit) };
    });
}

/// At process exit: fast-stops every cluster not dropped (e.g. one kept in a
/// `static`), then removes their directories.
extern "C" fn stop_all_at_exit() {
    let mut live = match LIVE.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    let clusters = std::mem::take(&mut *live);
    drop(live);
    let pids: Vec<u32> = clusters.values().filter_map(|c| c.pid).collect();
    for &pid in &pids {
        send_signal(pid, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in &pids {
        if !reap_by_pid(pid, deadline) {
            kill_server_processes(pid);
            reap_by_pid(pid, Instant::now() + Duration::from_secs(1));
        }
    }
    for cluster in clusters.values().filter(|c| !c.keep) {
        let _ = fs::remove_dir_all(&cluster.root);
    }
}

/// Waits for a child process by pid until `deadline`; true once it is gone.
fn reap_by_pid(pid: u32, deadline: Instant) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes only to `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid || rc < 0 {
            return true; // Reaped now, or not our child / reaped already.
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A free port on 127.0.0.1 that no other cluster (or NATS server) of this
/// process holds. Another process may still take it before the server binds
/// it; the start then fails and is retried with another port.
pub(crate) fn pick_port() -> Result<u16, ClusterError> {
    for _ in 0..50 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding a port on 127.0.0.1"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading a bound port"))?
            .port();
        drop(listener);
        if lock(&PORTS).insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::Io {
        context: "picking a free port".into(),
        source: io::Error::other("no free port found in 50 tries"),
    })
}

pub(crate) fn release_port(port: u16) {
    if port != 0 {
        lock(&PORTS).remove(&port);
    }
}

/// Removes `tally-pg-*` directories whose owning process is gone and whose
/// server (if any) is not running: leftovers of processes that were killed.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX)
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_ours {
            continue;
        }
        let pid_in = |file: PathBuf| -> Option<u32> {
            fs::read_to_string(file)
                .ok()?
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()
        };
        let Some(owner) = pid_in(path.join(OWNER_FILE)) else {
            continue; // Being set up, kept on purpose, or not ours.
        };
        if process_running(owner) {
            continue;
        }
        if pid_in(path.join("data/postmaster.pid")).is_some_and(process_running) {
            continue;
        }
        tracing::debug!(dir = %path.display(), owner, "removing stale PostgreSQL cluster directory");
        let _ = fs::remove_dir_all(&path);
    }
}

// ---------------------------------------------------------------------------
// Binaries and users.

#[derive(Debug, Clone)]
struct PgBinaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

fn find_binaries() -> Result<PgBinaries, ClusterError> {
    find_binaries_in(
        std::env::var_os(BINDIR_ENV),
        Path::new("/usr/lib/postgresql"),
        std::env::var_os("PATH"),
    )
}

fn find_binaries_in(
    bindir_override: Option<OsString>,
    versions_root: &Path,
    path_var: Option<OsString>,
) -> Result<PgBinaries, ClusterError> {
    if let Some(dir) = bindir_override.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return binaries_in(&dir).ok_or_else(|| ClusterError::BinariesNotFound {
            searched: format!("{BINDIR_ENV}={}", dir.display()),
        });
    }
    let mut searched = Vec::new();

    match find_in_path(path_var.as_deref(), "pg_config") {
        Some(pg_config) => {
            let output = Command::new(&pg_config)
                .arg("--bindir")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            match output {
                Ok(output) if output.status.success() => {
                    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
                    if let Some(found) = binaries_in(&dir) {
                        return Ok(found);
                    }
                    searched.push(format!("`pg_config --bindir` ({})", dir.display()));
                }
                _ => searched.push(format!("`{} --bindir` (failed)", pg_config.display())),
            }
        }
        None => searched.push("pg_config (not on PATH)".to_string()),
    }

    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    if let Some(found) = versions.iter().find_map(|(_, dir)| binaries_in(dir)) {
        return Ok(found);
    }
    searched.push(format!("{}/*/bin", versions_root.display()));

    if let (Some(initdb), Some(postgres)) = (
        find_in_path(path_var.as_deref(), "initdb"),
        find_in_path(path_var.as_deref(), "postgres"),
    ) {
        return Ok(PgBinaries { initdb, postgres });
    }
    searched.push("PATH".to_string());
    Err(ClusterError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn binaries_in(dir: &Path) -> Option<PgBinaries> {
    let initdb = dir.join("initdb");
    let postgres = dir.join("postgres");
    (is_executable(&initdb) && is_executable(&postgres)).then_some(PgBinaries { initdb, postgres })
}

pub(crate) fn find_in_path(path_var: Option<&std::ffi::OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user to run initdb and postgres as: `None` (ourselves) unless root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

fn unprivileged_user() -> Result<Option<RunAs>, ClusterError> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    ["postgres", "nobody"]
        .into_iter()
        .find_map(lookup_user)
        .map(Some)
        .ok_or(ClusterError::NoUnprivilegedUser)
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let c_name = CString::new(name).ok()?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain data; an all-zero value is valid to overwrite.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, the buffer length is its
    // real length, and the strings it fills in are not used afterwards.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null() && entry.pw_uid != 0).then(|| RunAs {
        name: name.to_string(),
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// Where to create the cluster's directory: the system temp dir, or `/tmp`
/// if the server's user could not reach the former.
fn temp_parent(run_as: Option<&RunAs>) -> Result<PathBuf, ClusterError> {
    let preferred = std::env::temp_dir();
    let Some(user) = run_as else {
        return Ok(preferred);
    };
    let mut tried = Vec::new();
    for candidate in [preferred, PathBuf::from("/tmp")] {
        match traversable_by(&candidate, user) {
            Ok(()) => return Ok(candidate),
            Err(why) => tried.push(why),
        }
    }
    Err(ClusterError::NoUsableTempDir {
        user: user.name.clone(),
        detail: tried.join("; "),
    })
}

/// Whether `user` (with its primary group only) can search every directory
/// from `/` down to `dir`.
fn traversable_by(dir: &Path, user: &RunAs) -> Result<(), String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    for ancestor in dir.ancestors() {
        let meta = fs::metadata(ancestor).map_err(|e| format!("{}: {e}", ancestor.display()))?;
        let mode = meta.mode();
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(format!("{} is not searchable", ancestor.display()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Quoting and validation.

fn validate_setting(name: &str, value: &str) -> Result<(), ClusterError> {
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !name_ok {
        return Err(ClusterError::Invalid {
            what: "setting name",
            value: name.to_string(),
            reason: "expected letters, digits, `_` and `.`",
        });
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(ClusterError::Invalid {
            what: "setting value",
            value: value.to_string(),
            reason: "line breaks and NUL are not allowed",
        });
    }
    Ok(())
}

/// A `postgresql.conf` string literal: any setting's value may be quoted.
fn quote_setting(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn validate_database_name(name: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 63 {
        "longer than 63 bytes"
    } else if name.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(ClusterError::Invalid {
        what: "database name",
        value: name.to_string(),
        reason,
    })
}

/// An SQL identifier in double quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(options: ClusterOptions) -> PgCluster {
        let began = Instant::now();
        let cluster = PgCluster::start_with(options).expect("start a cluster");
        eprintln!(
            "pgcluster: port {} ready in {} ms (initdb {} ms, server start {} ms)",
            cluster.port(),
            began.elapsed().as_millis(),
            cluster.initdb_time.as_millis(),
            cluster.server_start_time.as_millis(),
        );
        cluster
    }

    async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        let sql = format!("SHOW {setting}");
        client.query_one(&sql, &[]).await.expect(&sql).get(0)
    }

    #[tokio::test]
    async fn starts_with_logical_decoding_settings() {
        let cluster = started(ClusterOptions::default());
        let url = cluster.url("postgres");
        assert_eq!(
            url,
            format!("postgres://tally@127.0.0.1:{}/postgres", cluster.port())
        );
        let client = crate::db::connect(&url).await.unwrap();
        assert_eq!(show(&client, "wal_level").await, "logical");
        assert_eq!(show(&client, "max_replication_slots").await, "20");
        assert_eq!(show(&client, "max_wal_senders").await, "20");
        assert_eq!(show(&client, "max_connections").await, "200");
        assert_eq!(show(&client, "shared_buffers").await, "128MB");
        assert_eq!(show(&client, "fsync").await, "off");
        assert_eq!(show(&client, "full_page_writes").await, "off");
        assert_eq!(show(&client, "synchronous_commit").await, "on");
        assert_eq!(show(&client, "server_encoding").await, "UTF8");
        assert_eq!(show(&client, "lc_collate").await, "C");
        let row = client
            .query_one(
                "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), SUPERUSER);
        assert!(row.get::<_, bool>(1));
    }

    #[tokio::test]
    async fn creates_databases_and_logical_slots() {
        let cluster = started(ClusterOptions::default());
        let url = cluster.create_database("app").unwrap();
        assert_eq!(url, cluster.url("app"));
        let client = crate::db::connect(&url).await.unwrap();
        assert_eq!(show(&client, "wal_level").await, "logical");
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(database, "app");
        client
            .batch_execute(
                "CREATE TABLE t (id int PRIMARY KEY, v text);
                 CREATE PUBLICATION p FOR TABLE t;",
            )
            .await
            .unwrap();
        let slot: String = client
            .query_one(
                "SELECT slot_name::text FROM pg_create_logical_replication_slot('s', 'pgoutput')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(slot, "s");
        client
            .batch_execute("INSERT INTO t VALUES (1, 'one')")
            .await
            .unwrap();
        let changes = count(
            &client,
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL,
                 'proto_version', '1', 'publication_names', 'p')",
        )
        .await;
        assert!(changes >= 3, "BEGIN, INSERT, COMMIT; got {changes}");

        // Odd names are quoted, in SQL and in the URL.
        let odd = "Odd \"name\"/with spaces";
        let odd_url = cluster.create_database(odd).unwrap();
        let client = crate::db::connect(&odd_url).await.unwrap();
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(database, odd);

        assert!(matches!(
            cluster.create_database(""),
            Err(ClusterError::Invalid { .. })
        ));
        assert!(matches!(
            cluster.create_database(&"x".repeat(64)),
            Err(ClusterError::Invalid { .. })
        ));
        assert!(matches!(
            cluster.create_database("app"),
            Err(ClusterError::Postgres { .. })
        ));
    }

    #[tokio::test]
    async fn restart_keeps_data_and_port() {
        let mut cluster = started(ClusterOptions::default());
        let port = cluster.port();
        let url = cluster.create_database("keep").unwrap();
        let client = crate::db::connect(&url).await.unwrap();
        client
            .batch_execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 100)")
            .await
            .unwrap();
        drop(client);

        let began = Instant::now();
        cluster.restart().unwrap();
        eprintln!("pgcluster: restart took {} ms", began.elapsed().as_millis());
        assert_eq!(cluster.port(), port);
        let client = crate::db::connect(&url).await.unwrap();
        assert_eq!(count(&client, "SELECT count(*) FROM t").await, 100);
        drop(client);

        // stop is idempotent, and restart also starts a stopped server.
        cluster.stop().unwrap();
        cluster.stop().unwrap();
        assert!(crate::db::connect(&url).await.is_err());
        assert!(matches!(
            cluster.create_database("x"),
            Err(ClusterError::NotRunning)
        ));
        cluster.restart().unwrap();
        let client = crate::db::connect(&url).await.unwrap();
        assert_eq!(count(&client, "SELECT count(*) FROM t").await, 100);
    }

    #[tokio::test]
    async fn kill_then_restart_recovers_committed_data() {
        let mut cluster = started(ClusterOptions::default());
        let url = cluster.url("postgres");
        let client = crate::db::connect(&url).await.unwrap();
        client
            .batch_execute("CREATE TABLE t (i int)")
            .await
            .unwrap();
        // Many small commits right before the crash: none may be lost.
        for i in 0..200 {
            client
                .execute("INSERT INTO t VALUES ($1)", &[&i])
                .await
                .unwrap();
        }
        let postmaster = cluster.postmaster_pid().unwrap();
        let children = child_pids(postmaster);
        assert!(!children.is_empty());

        cluster.kill();
        cluster.kill(); // Nothing to kill: no-op.
        assert!(!process_running(postmaster));
        for child in children {
            assert!(!process_running(child), "child {child} survived the kill");
        }
        assert!(client.simple_query("SELECT 1").await.is_err());

        let began = Instant::now();
        cluster.restart().unwrap();
        eprintln!(
            "pgcluster: restart after kill (crash recovery) took {} ms",
            began.elapsed().as_millis()
        );
        let client = crate::db::connect(&url).await.unwrap();
        assert_eq!(count(&client, "SELECT count(*) FROM t").await, 200);
        let log = fs::read_to_string(&cluster.log).unwrap();
        assert!(
            log.contains("not properly shut down"),
            "no crash recovery in log"
        );
    }

    #[test]
    fn clusters_run_side_by_side_and_drop_cleans_up() {
        let (a, b) = thread::scope(|s| {
            let a = s.spawn(|| started(ClusterOptions::default()));
            let b = s.spawn(|| started(ClusterOptions::default()));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_ne!(a.port(), b.port());
        assert_ne!(a.data_dir(), b.data_dir());
        assert!(a.data_dir().join("PG_VERSION").is_file());
        // Each answers on its own port (plain sync caller: runtime of our own).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for cluster in [&a, &b] {
                let client = crate::db::connect(&cluster.url("postgres")).await.unwrap();
                let port: String = show(&client, "port").await;
                assert_eq!(port, cluster.port().to_string());
            }
        });

        let (root, pid) = (a.root.clone(), a.postmaster_pid().unwrap());
        drop(a);
        assert!(!root.exists(), "{} still exists", root.display());
        assert!(!process_exists(pid), "postmaster {pid} still exists");
        assert!(b.data_dir().exists());
    }

    #[test]
    fn a_panicking_test_still_stops_its_server() {
        let mut seen = None;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let cluster = started(ClusterOptions::default());
            seen = Some((cluster.root.clone(), cluster.postmaster_pid().unwrap()));
            panic!("simulated test failure (expected by this test)");
        }));
        assert!(outcome.is_err());
        let (root, pid) = seen.unwrap();
        assert!(!root.exists());
        assert!(!process_exists(pid));
    }

    #[tokio::test]
    async fn options_fsync_extra_settings_keep_dir_and_cpus() {
        let last_cpu = *crate::cpu::allowed_cpus().unwrap().last().unwrap();
        let cluster = started(ClusterOptions {
            fsync: true,
            extra_settings: vec![
                ("work_mem".into(), "8MB".into()),
                ("application_name".into(), "it's \\ fine".into()),
            ],
            keep_dir: true,
            cpus: vec![last_cpu],
        });
        let client = crate::db::connect(&cluster.url("postgres")).await.unwrap();
        assert_eq!(show(&client, "fsync").await, "on");
        assert_eq!(show(&client, "full_page_writes").await, "on");
        assert_eq!(show(&client, "work_mem").await, "8MB");
        // The postmaster and the backends it forks run on the given CPU only.
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        for pid in [cluster.postmaster_pid().unwrap(), backend as u32] {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap();
            assert_eq!(allowed.trim(), last_cpu.to_string(), "pid {pid}");
        }
        // Its CPU time counts the work of its backends.
        let before = cluster.cpu_seconds().unwrap();
        client
            .batch_execute("SELECT count(*) FROM generate_series(1, 3000000)")
            .await
            .unwrap();
        let after = cluster.cpu_seconds().unwrap();
        assert!(after - before >= 0.05, "{before} -> {after}");
        // The backend's title names its user and database.
        assert!(
            cluster
                .cpu_seconds_of(&format!("{SUPERUSER} postgres"))
                .unwrap()
                >= 0.05
        );
        assert_eq!(cluster.cpu_seconds_of("walsender"), Some(0.0));
        drop(client);
        let root = cluster.root.clone();
        let pid = cluster.postmaster_pid().unwrap();
        drop(cluster);
        assert!(!process_exists(pid));
        assert!(root.join("server.log").is_file(), "kept dir lost its log");
        fs::remove_dir_all(&root).unwrap();

        let bad = PgCluster::start_with(ClusterOptions {
            extra_settings: vec![("work_mem = 1; x".into(), "1".into())],
            ..ClusterOptions::default()
        });
        assert!(matches!(bad, Err(ClusterError::Invalid { .. })));
    }

    #[test]
    fn a_taken_port_is_retried() {
        let mut cluster = started(ClusterOptions::default());
        cluster.stop().unwrap();
        let old_port = cluster.port();
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, old_port)).unwrap();

        // restart keeps its port, so it retries, then reports the log.
        let error = cluster.restart().unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, ClusterError::Start { .. }), "{text}");
        assert!(text.contains("could not bind"), "{text}");

        // A first start moves on to another port.
        cluster.start_server(true).unwrap();
        assert_ne!(cluster.port(), old_port);
        assert!(cluster.postmaster_pid().is_some());
        drop(squatter);
    }

    #[test]
    fn bad_settings_fail_with_the_log_tail() {
        let error = PgCluster::start_with(ClusterOptions {
            extra_settings: vec![("shared_buffers".into(), "lots".into())],
            ..ClusterOptions::default()
        })
        .unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, ClusterError::Start { .. }), "{text}");
        assert!(text.contains("shared_buffers"), "{text}");
    }

    #[test]
    fn binary_lookup_order_and_error() {
        let empty = tempfile::tempdir().unwrap();
        let error = find_binaries_in(
            Some(empty.path().as_os_str().to_owned()),
            Path::new("/usr/lib/postgresql"),
            std::env::var_os("PATH"),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains(BINDIR_ENV), "{text}");
        assert!(text.contains("apt-get install -y postgresql"), "{text}");

        let error = find_binaries_in(None, empty.path(), Some(OsString::new())).unwrap_err();
        assert!(matches!(error, ClusterError::BinariesNotFound { .. }));

        // A fake versions tree: the highest version wins.
        for version in ["9.6", "15", "16"] {
            let bin = empty.path().join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for name in ["initdb", "postgres"] {
                fs::write(bin.join(name), "").unwrap();
                fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let found = find_binaries_in(None, empty.path(), Some(OsString::new())).unwrap();
        assert_eq!(found.initdb, empty.path().join("16/bin/initdb"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_setting("it's"), "'it''s'");
        assert_eq!(quote_setting("a\\b"), "'a\\\\b'");
        assert_eq!(percent_encode("ab_C-1.~"), "ab_C-1.~");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
        assert!(validate_setting("auto_explain.log_min_duration", "0").is_ok());
        assert!(validate_setting("1x", "0").is_err());
        assert!(validate_setting("x", "a\nb").is_err());
    }
}
