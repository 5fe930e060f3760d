//! Rate budgets: one token bucket per OEM account, shared by every action
//! (and every read) on that account, plus a minimum spacing between writes
//! to one device. Kept in the database ([`Store::spend_budget`]), so every
//! replica on it spends from the same buckets: two replicas together never
//! spend more of an account's budget than one would. An account without a
//! budget (the simulated driver's) costs no database work.

use switchyard_drivers::RateBudget;

use crate::{
    domain::Ts,
    store::{Bucket, Spend, Store},
};

#[derive(Clone, Debug)]
pub struct Budgets {
    store: Store,
}

const DAY: f64 = 86_400.0;

/// How long to wait when the budget cannot be read (the database is
/// unreachable): the call waits rather than spend blindly.
const UNKNOWN_WAIT_NANOS: i64 = 5 * Ts::SECOND;

/// The token-bucket rule: `calls_per_day` spread evenly, bursts of up to an
/// hour's worth (at least one call). Takes one token from `bucket` at
/// `now` (a bucket never used is full), or says when one is next there.
pub fn take_token(
    bucket: Option<Bucket>,
    budget: &RateBudget,
    now: Ts,
) -> (Result<(), Ts>, Bucket) {
    let per_sec = f64::from(budget.calls_per_day) / DAY;
    let capacity = (per_sec * 3600.0).max(1.0);
    let b = bucket.unwrap_or(Bucket {
        tokens: capacity,
        at: now,
    });
    // Counted up to the later of the two: a replica whose clock is behind
    // neither moves the count back nor earns the difference again later.
    let at = Ts(now.0.max(b.at.0));
    let elapsed = (at.0 - b.at.0) as f64 / Ts::SECOND as f64;
    let tokens = (b.tokens + elapsed * per_sec).min(capacity);
    if tokens >= 1.0 {
        (
            Ok(()),
            Bucket {
                tokens: tokens - 1.0,
                at,
            },
        )
    } else {
        let wait = (1.0 - tokens) / per_sec;
        (
            Err(at.plus_nanos((wait * Ts::SECOND as f64) as i64)),
            Bucket { tokens, at },
        )
    }
}

/// The write-spacing rule: not before `last` + the spacing.
fn spaced(last: Option<Ts>, budget: &RateBudget, now: Ts) -> Result<(), Ts> {
    let spacing = i64::from(budget.min_write_interval_seconds) * Ts::SECOND;
    match last {
        Some(prev) if spacing > 0 && now.0 < prev.0 + spacing => Err(Ts(prev.0 + spacing)),
        _ => Ok(()),
    }
}

impl Budgets {
    /// Budgets kept in `store`'s database.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Takes one write call for `device` on `account`, or says when one is
    /// next available.
    pub async fn take(
        &self,
        account: &str,
        device: &str,
        budget: &RateBudget,
        now: Ts,
    ) -> Result<(), Ts> {
        let spacing = budget.min_write_interval_seconds > 0;
        if budget.calls_per_day == 0 && !spacing {
            return Ok(());
        }
        // The device within its account: one physical device, whichever
        // replica or tenant writes to it.
        let key = format!("{account}\u{1f}{device}");
        // What the take left, recorded once its transaction committed (the
        // closure may run again on a retry).
        let left = std::sync::Mutex::new(None);
        let decided = self
            .store
            .spend_budget(account, spacing.then_some(key.as_str()), |bucket, last| {
                if let Err(at) = spaced(last, budget, now) {
                    return Spend {
                        verdict: Err(at),
                        bucket: None,
                        wrote: None,
                    };
                }
                if budget.calls_per_day == 0 {
                    return Spend {
                        verdict: Ok(()),
                        bucket: None,
                        wrote: Some(now),
                    };
                }
                let (verdict, bucket) = take_token(bucket, budget, now);
                let capacity = (f64::from(budget.calls_per_day) / DAY * 3600.0).max(1.0);
                if let Ok(mut l) = left.lock() {
                    *l = verdict.is_ok().then_some(bucket.tokens / capacity);
                }
                Spend {
                    verdict,
                    bucket: Some(bucket),
                    wrote: verdict.is_ok().then_some(now),
                }
            })
            .await;
        let ratio = left.lock().ok().and_then(|l| *l);
        if let (Ok(Ok(())), Some(ratio)) = (&decided, ratio) {
            crate::metrics::oem_budget(account, ratio);
        }
        self.settle(account, decided, now)
    }

    /// Takes one read call on `account`.
    pub async fn take_read(&self, account: &str, budget: &RateBudget, now: Ts) -> Result<(), Ts> {
        if budget.calls_per_day == 0 {
            return Ok(());
        }
        let decided = self
            .store
            .spend_budget(account, None, |bucket, _| {
                let (verdict, bucket) = take_token(bucket, budget, now);
                Spend {
                    verdict,
                    bucket: Some(bucket),
                    wrote: None,
                }
            })
            .await;
        self.settle(account, decided, now)
    }

    fn settle(
        &self,
        account: &str,
        decided: Result<Result<(), Ts>, crate::domain::Error>,
        now: Ts,
    ) -> Result<(), Ts> {
        decided.unwrap_or_else(|e| {
            tracing::warn!(%account, error = %e, "the rate budget cannot be read; waiting");
            Err(now.plus_nanos(UNKNOWN_WAIT_NANOS))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::ManualClock;

    async fn budgets() -> Budgets {
        let store = Store::open("sqlite::memory:", Arc::new(ManualClock::new(Ts(0))))
            .await
            .unwrap();
        Budgets::new(store)
    }

    #[tokio::test]
    async fn a_daily_budget_runs_out_and_refills() {
        let b = budgets().await;
        let budget = RateBudget {
            calls_per_day: 24,
            min_write_interval_seconds: 0,
        };
        let t0 = Ts(0);
        // 24/day = 1 per hour; a burst of one hour's worth = 1 call.
        assert!(b.take_read("acct", &budget, t0).await.is_ok());
        let next = b.take_read("acct", &budget, t0).await.unwrap_err();
        assert_eq!(next.0 / Ts::SECOND, 3600);
        assert!(b.take_read("acct", &budget, next).await.is_ok());
        assert!(
            b.take_read("other", &budget, t0).await.is_ok(),
            "accounts are separate"
        );
    }

    #[tokio::test]
    async fn writes_to_one_device_are_spaced() {
        let b = budgets().await;
        let budget = RateBudget {
            calls_per_day: 0,
            min_write_interval_seconds: 5,
        };
        assert!(b.take("a", "dev", &budget, Ts(0)).await.is_ok());
        assert_eq!(
            b.take("a", "dev", &budget, Ts(Ts::SECOND)).await,
            Err(Ts(5 * Ts::SECOND))
        );
        assert!(b.take("a", "dev2", &budget, Ts(Ts::SECOND)).await.is_ok());
        assert!(
            b.take("a", "dev", &budget, Ts(5 * Ts::SECOND))
                .await
                .is_ok()
        );
    }

    /// A refused write spends nothing: neither a token nor the device's
    /// spacing.
    #[tokio::test]
    async fn a_refused_write_spends_nothing() {
        let b = budgets().await;
        let budget = RateBudget {
            calls_per_day: 24,
            min_write_interval_seconds: 5,
        };
        assert!(b.take("a", "dev", &budget, Ts(0)).await.is_ok());
        // Spaced out, then out of tokens: both refused.
        assert!(b.take("a", "dev", &budget, Ts(Ts::SECOND)).await.is_err());
        let next = b
            .take("a", "dev2", &budget, Ts(Ts::SECOND))
            .await
            .unwrap_err();
        // One token an hour, the refusals took none.
        assert_eq!(next.0 / Ts::SECOND, 3600);
        assert!(b.take("a", "dev2", &budget, next).await.is_ok());
    }

    /// A replica whose clock is behind does not refill the bucket: the
    /// count never goes back in time.
    #[test]
    fn a_clock_behind_earns_nothing() {
        let budget = RateBudget {
            calls_per_day: 24,
            min_write_interval_seconds: 0,
        };
        let h = 3600 * Ts::SECOND;
        let (ok, b) = take_token(None, &budget, Ts(10 * h));
        assert!(ok.is_ok());
        // Another replica, an hour behind, is refused and moves nothing.
        let (refused, b) = take_token(Some(b), &budget, Ts(9 * h));
        assert_eq!(refused, Err(Ts(11 * h)));
        assert_eq!(b.at, Ts(10 * h));
        // Back on time, still nothing until an hour has passed.
        assert!(take_token(Some(b), &budget, Ts(10 * h + h / 2)).0.is_err());
        assert!(take_token(Some(b), &budget, Ts(11 * h)).0.is_ok());
    }

    /// Two replicas' budgets on one database spend from one bucket.
    #[tokio::test]
    async fn replicas_share_one_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("b.db").display());
        let clock = Arc::new(ManualClock::new(Ts(0)));
        let one = Budgets::new(Store::open(&url, clock.clone()).await.unwrap());
        let two = Budgets::new(Store::open(&url, clock).await.unwrap());
        let budget = RateBudget {
            calls_per_day: 48,
            min_write_interval_seconds: 0,
        };
        // 48/day: a burst of 2.
        assert!(one.take_read("acct", &budget, Ts(0)).await.is_ok());
        assert!(two.take_read("acct", &budget, Ts(0)).await.is_ok());
        assert!(one.take_read("acct", &budget, Ts(0)).await.is_err());
        assert!(two.take_read("acct", &budget, Ts(0)).await.is_err());
    }
}
