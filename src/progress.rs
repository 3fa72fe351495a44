//! Progress of long work: a live line (count, rate, ETA) on a terminal,
//! plain log lines every ten seconds otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A counter the worker bumps and a reporter reads.
#[derive(Debug, Default, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Reports `counter` until dropped. `total` enables a bar with an ETA.
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn start(what: &'static str, counter: Counter, total: Option<u64>) -> Reporter {
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{bar:30} {human_pos}/{human_len} {msg} ({per_sec}, ETA {eta})",
                    )
                    .expect("valid template"),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {human_pos} {msg} ({per_sec})")
                        .expect("valid template"),
                ),
            };
            bar.set_message(what);
            let shown = bar.clone();
            let task = tokio::spawn(async move {
                loop {
                    shown.set_position(counter.get());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Reporter {
                task,
                bar: Some(bar),
            }
        } else {
            let task = tokio::spawn(async move {
                let started = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    let done = counter.get();
                    let rate = done as f64 / started.elapsed().as_secs_f64();
                    match total {
                        Some(total) => tracing::info!("{what}: {done}/{total} ({rate:.0}/s)"),
                        None => tracing::info!("{what}: {done} ({rate:.0}/s)"),
                    }
                }
            });
            Reporter { task, bar: None }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
