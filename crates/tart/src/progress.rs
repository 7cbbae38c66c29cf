//! Transfer progress: a bar with bytes, rate and ETA on a terminal; Tart's plain percentage
//! lines otherwise (when `CI` is set or output is not a terminal), which CI logs keep readable.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub enum CliProgress {
    Bar(Mutex<Option<ProgressBar>>),
    Lines(LineProgress),
}

pub struct LineProgress {
    total: AtomicU64,
    done: AtomicU64,
    last: Mutex<(Option<u64>, Option<Instant>)>,
}

impl CliProgress {
    pub fn new() -> Self {
        let interactive = std::env::var_os("CI").is_none() && std::io::stdout().is_terminal();
        if interactive {
            CliProgress::Bar(Mutex::new(None))
        } else {
            CliProgress::Lines(LineProgress {
                total: AtomicU64::new(0),
                done: AtomicU64::new(0),
                last: Mutex::new((None, None)),
            })
        }
    }
}

impl tart_oci::progress::Progress for CliProgress {
    fn line(&self, text: &str) {
        match self {
            CliProgress::Bar(bar) => match &*bar.lock().unwrap() {
                Some(bar) => bar.println(text),
                None => println!("{text}"),
            },
            CliProgress::Lines(_) => println!("{text}"),
        }
    }

    fn begin(&self, total: u64) {
        match self {
            CliProgress::Bar(bar) => {
                let new = ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{bar:40.cyan/blue} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("the template is valid"),
                );
                *bar.lock().unwrap() = Some(new);
            }
            CliProgress::Lines(lines) => {
                lines.total.store(total, Ordering::Relaxed);
                lines.done.store(0, Ordering::Relaxed);
                *lines.last.lock().unwrap() = (None, None);
            }
        }
    }

    fn advance(&self, bytes: u64) {
        match self {
            CliProgress::Bar(bar) => {
                if let Some(bar) = &*bar.lock().unwrap() {
                    bar.inc(bytes);
                }
            }
            CliProgress::Lines(lines) => lines.advance(bytes),
        }
    }

    fn end(&self) {
        match self {
            CliProgress::Bar(bar) => {
                if let Some(bar) = bar.lock().unwrap().take() {
                    bar.finish_and_clear();
                }
            }
            CliProgress::Lines(lines) => lines.print(100, true),
        }
    }
}

impl LineProgress {
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total = self.total.load(Ordering::Relaxed).max(1);
        self.print((done.min(total) * 100 / total).min(99), false);
    }

    /// One line per new percentage, at most once a second, as Tart prints under CI.
    fn print(&self, percent: u64, force: bool) {
        let mut last = self.last.lock().unwrap();
        if last.0 == Some(percent) {
            return;
        }
        if !force && last.1.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = (Some(percent), Some(Instant::now()));
        println!("{percent}%");
    }
}
