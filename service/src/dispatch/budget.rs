//! Rate budgets: one token bucket per OEM account, shared by every action
//! (and every read) on that account, plus a minimum spacing between writes
//! to one device. Held in this process: replicas each keep their own (a
//! shared budget across replicas needs the database and is not done yet).

use std::{collections::HashMap, sync::Mutex};

use switchyard_drivers::RateBudget;

use crate::domain::Ts;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Ts,
}

#[derive(Debug, Default)]
pub struct Budgets {
    accounts: Mutex<HashMap<String, Bucket>>,
    last_write: Mutex<HashMap<String, Ts>>,
}

const DAY: f64 = 86_400.0;

impl Budgets {
    fn take_token(&self, account: &str, budget: &RateBudget, now: Ts) -> Result<(), Ts> {
        if budget.calls_per_day == 0 {
            return Ok(());
        }
        let per_sec = f64::from(budget.calls_per_day) / DAY;
        // Bursts of up to an hour's worth of calls.
        let capacity = (per_sec * 3600.0).max(1.0);
        let mut accounts = self.accounts.lock().map_err(|_| now)?;
        let b = accounts.entry(account.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = (now.0 - b.at.0).max(0) as f64 / Ts::SECOND as f64;
        b.tokens = (b.tokens + elapsed * per_sec).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / per_sec;
            Err(now.plus_nanos((wait * Ts::SECOND as f64) as i64))
        }
    }

    /// Takes one write call for `device` on `account`, or says when one is
    /// next available.
    pub fn take(
        &self,
        account: &str,
        device: &str,
        budget: &RateBudget,
        now: Ts,
    ) -> Result<(), Ts> {
        let spacing = i64::from(budget.min_write_interval_seconds) * Ts::SECOND;
        if spacing > 0 {
            let last = self.last_write.lock().map_err(|_| now)?;
            if let Some(prev) = last.get(device)
                && now.0 < prev.0 + spacing
            {
                return Err(Ts(prev.0 + spacing));
            }
        }
        self.take_token(account, budget, now)?;
        if spacing > 0
            && let Ok(mut last) = self.last_write.lock()
        {
            last.insert(device.to_owned(), now);
        }
        Ok(())
    }

    /// Takes one read call on `account`.
    pub fn take_read(&self, account: &str, budget: &RateBudget, now: Ts) -> Result<(), Ts> {
        self.take_token(account, budget, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daily_budget_runs_out_and_refills() {
        let b = Budgets::default();
        let budget = RateBudget {
            calls_per_day: 24,
            min_write_interval_seconds: 0,
        };
        let t0 = Ts(0);
        // 24/day = 1 per hour; a burst of one hour's worth = 1 call.
        assert!(b.take_read("acct", &budget, t0).is_ok());
        let next = b.take_read("acct", &budget, t0).unwrap_err();
        assert_eq!(next.0 / Ts::SECOND, 3600);
        assert!(b.take_read("acct", &budget, next).is_ok());
        assert!(
            b.take_read("other", &budget, t0).is_ok(),
            "accounts are separate"
        );
    }

    #[test]
    fn writes_to_one_device_are_spaced() {
        let b = Budgets::default();
        let budget = RateBudget {
            calls_per_day: 0,
            min_write_interval_seconds: 5,
        };
        assert!(b.take("a", "dev", &budget, Ts(0)).is_ok());
        assert_eq!(
            b.take("a", "dev", &budget, Ts(Ts::SECOND)),
            Err(Ts(5 * Ts::SECOND))
        );
        assert!(b.take("a", "dev2", &budget, Ts(Ts::SECOND)).is_ok());
        assert!(b.take("a", "dev", &budget, Ts(5 * Ts::SECOND)).is_ok());
    }
}
