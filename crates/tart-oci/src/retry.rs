//! When a failed registry request is tried again. A transfer that keeps making progress is
//! never abandoned (a flaky link still gets a large image through); one that stops making
//! progress is given up after a few attempts in a row, or once a deadline has passed.

use std::time::Duration;

use anyhow::{bail, Result};
use oci_client::errors::OciDistributionError;
use tokio::time::Instant;

/// `TART_RETRY_STALLS`: attempts in a row that brought no new bytes before a transfer fails.
const STALLS_VAR: &str = "TART_RETRY_STALLS";
/// `TART_RETRY_DEADLINE`: seconds after its first attempt when a failing transfer is not tried again.
const DEADLINE_VAR: &str = "TART_RETRY_DEADLINE";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub stalls: u32,
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            stalls: 5,
            deadline: Duration::from_secs(30 * 60),
        }
    }
}

impl RetryPolicy {
    /// The defaults, changed by `TART_RETRY_STALLS` and `TART_RETRY_DEADLINE` where set.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut policy = RetryPolicy::default();
        let number = |name: &str| -> Result<Option<u64>> {
            match var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(value) => match value.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => bail!("{name} must be a whole number greater than 0, not {value:?}"),
                },
            }
        };
        if let Some(stalls) = number(STALLS_VAR)? {
            policy.stalls = u32::try_from(stalls).unwrap_or(u32::MAX);
        }
        if let Some(seconds) = number(DEADLINE_VAR)? {
            policy.deadline = Duration::from_secs(seconds);
        }
        Ok(policy)
    }
}

/// The retry state of one transfer.
pub(crate) struct Retries {
    policy: RetryPolicy,
    started: Instant,
    stalls: u32,
}

impl Retries {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        Retries {
            policy,
            started: Instant::now(),
            stalls: 0,
        }
    }

    /// Called after a failed attempt of `what` that did (`progressed`) or did not bring new
    /// bytes: backs off and returns `Ok` when another attempt is due, else the error to report,
    /// with why it is final.
    pub(crate) async fn after_failure(&mut self, what: &str, err: anyhow::Error, progressed: bool) -> Result<()> {
        if !is_transient(&err) {
            return Err(err);
        }
        self.stalls = if progressed { 0 } else { self.stalls + 1 };
        if self.stalls >= self.policy.stalls {
            return Err(err.context(format!(
                "{what}: gave up after {} attempts in a row that brought no new data ({STALLS_VAR}={})",
                self.stalls, self.policy.stalls
            )));
        }
        let elapsed = self.started.elapsed();
        if elapsed >= self.policy.deadline {
            return Err(err.context(format!(
                "{what}: gave up after {} s of failed attempts ({DEADLINE_VAR}={})",
                elapsed.as_secs(),
                self.policy.deadline.as_secs()
            )));
        }
        eprintln!("Error {what}: \"{err:#}\", attempting to re-try...");
        tokio::time::sleep(back_off(self.stalls)).await;
        Ok(())
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `policy` gives up; every failure counts
/// as an attempt without progress (the request is made again from the start).
pub(crate) async fn with_retries<T, F, Fut>(policy: RetryPolicy, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut retries = Retries::new(policy);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => retries.after_failure(what, err, false).await?,
        }
    }
}

/// Full jitter, as Tart's swift-retry does: exponential in the failures without progress (base
/// 1 s, at most 20 s). A connection that broke after delivering data is tried again almost at
/// once: the registry answered, waiting would only slow the transfer down.
fn back_off(stalls: u32) -> Duration {
    let ceiling = if stalls == 0 {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1u64 << stalls.min(5)).min(Duration::from_secs(20))
    };
    ceiling.mul_f64(rand::random::<f64>())
}

/// Transport failures are worth another attempt; answers from the registry are not.
fn is_transient(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(oci) = cause.downcast_ref::<OciDistributionError>() {
            return match oci {
                OciDistributionError::RequestError(e) => {
                    e.is_timeout() || e.is_connect() || e.is_request() || e.is_body()
                }
                OciDistributionError::IoError(_) => true,
                OciDistributionError::ServerError { code, .. } => *code >= 500,
                _ => false,
            };
        }
        cause.downcast_ref::<reqwest::Error>().is_some_and(|e| !e.is_status())
            || cause.downcast_ref::<std::io::Error>().is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

    fn transient() -> anyhow::Error {
        anyhow!(std::io::Error::other("connection reset"))
    }

    fn vars(pairs: Vec<(&'static str, &'static str)>) -> impl Fn(&str) -> Option<String> {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn environment_changes_the_policy_and_nonsense_is_refused() {
        assert_eq!(RetryPolicy::from_vars(vars(vec![])).unwrap(), RetryPolicy::default());
        let policy = RetryPolicy::from_vars(vars(vec![(STALLS_VAR, "2"), (DEADLINE_VAR, " 90 ")])).unwrap();
        assert_eq!(policy.stalls, 2);
        assert_eq!(policy.deadline, Duration::from_secs(90));
        for bad in ["0", "-1", "five"] {
            let err = RetryPolicy::from_vars(vars(vec![(STALLS_VAR, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(STALLS_VAR) && err.contains(bad), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_count_and_stalls_end_it() {
        let policy = RetryPolicy {
            stalls: 3,
            deadline: Duration::from_secs(3600),
        };
        let mut retries = Retries::new(policy);
        for _ in 0..50 {
            retries.after_failure("pulling", transient(), true).await.unwrap();
        }
        retries.after_failure("pulling", transient(), false).await.unwrap();
        retries.after_failure("pulling", transient(), false).await.unwrap();
        let err = retries.after_failure("pulling", transient(), false).await.unwrap_err();
        let line = format!("{err:#}");
        assert!(
            line.contains("3 attempts in a row") && line.contains(STALLS_VAR),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");

        let final_at_once = Retries::new(policy)
            .after_failure("pulling", anyhow!("HTTP 404"), true)
            .await
            .unwrap_err();
        assert_eq!(final_at_once.to_string(), "HTTP 404");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_even_a_progressing_transfer() {
        let mut retries = Retries::new(RetryPolicy {
            stalls: 5,
            deadline: Duration::from_secs(10),
        });
        retries.after_failure("pulling", transient(), true).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        let err = retries.after_failure("pulling", transient(), true).await.unwrap_err();
        assert!(format!("{err:#}").contains(DEADLINE_VAR), "{err:#}");
    }
}
