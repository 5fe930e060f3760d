//! The driver conformance suite: the behaviour every driver must show,
//! as named rules, each run as its own test and each skipped when the
//! driver's capabilities do not declare what it needs (a driver without a
//! native scheduler skips the scheduler rules, and so on).
//!
//! Behind the crate's `conformance` feature: a driver's tests enable it,
//! the server does not contain it.
//!
//! A driver plugs in through a [`Harness`] that builds its driver, steers
//! the device behind it (a simulated device, an OEM emulator) and supplies
//! the time; [`conformance_suite!`](crate::conformance_suite) turns it into
//! one `#[tokio::test]` per rule of [`rules`]:
//!
//! ```text
//! switchyard_drivers::conformance_suite!(simulated, Sim::new());
//! switchyard_drivers::conformance_suite!(foxess, Fox::new().await);
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test suite fails loudly

pub mod rules;
mod scenario;

use std::sync::Arc;

use async_trait::async_trait;

use crate::driver::Driver;

/// Steers one driver's device for the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A driver for the device as it is now (steering may change what a
    /// driver is built with, so the suite asks again after each change).
    fn driver(&self) -> Arc<dyn Driver>;

    /// The time it is for the driver: the suite places every action from
    /// the next whole minute after it, for an hour. A driver that reads
    /// the time must read this one (e.g. a factory's pinned clock), so the
    /// suite never depends on the system clock.
    fn now(&self) -> jiff::Timestamp;

    /// Turns a foreign, enabled native schedule covering the test window
    /// on (or off). Only called when the driver declares a native
    /// scheduler.
    async fn set_foreign_schedule(&self, on: bool);

    /// Makes the next calls fail as a temporary OEM outage (or stops
    /// that).
    async fn set_outage(&self, on: bool);

    /// Makes the OEM refuse the next calls for good (or stops that).
    async fn set_refusal(&self, on: bool);

    /// A secret the driver holds, which must never show.
    fn secret(&self) -> Option<String>;

    /// Whether the device (or the OEM's emulator) checks dispatch fencing
    /// tokens ([`ApplyRequest::fence`](crate::ApplyRequest::fence)), so a
    /// stale one must be refused. By default it does not.
    fn checks_fences(&self) -> bool {
        false
    }

    /// What shows, where the device echoed the secret, once the driver
    /// redacted it (e.g. `(token <redacted>)`). When given, the secrets
    /// rule also checks that it did show: the device did echo the secret,
    /// so the check for it was not vacuous.
    fn redacted_echo(&self) -> Option<String> {
        None
    }
}

/// Expands into one `#[tokio::test]` per rule of
/// [`conformance::rules`](crate::conformance::rules), in a module `$suite`,
/// each named for its rule (e.g. `$suite::outage_is_retryable`).
///
/// `$harness` is evaluated afresh in each test, inside its async body (so
/// it may `.await`), and must give a value implementing
/// [`Harness`](crate::conformance::Harness); it is resolved from the
/// module where the macro is invoked. The invoking crate needs tokio with
/// the `macros` and `rt` features.
///
/// ```text
/// switchyard_drivers::conformance_suite!(foxess, Fox::new().await);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($suite:ident, $harness:expr $(,)?) => {
        $crate::__conformance_trials!(
            $suite, $harness;
            capabilities_are_coherent,
            apply_then_revert_twice_succeeds,
            reverted_actions_leave_no_rows_of_ours,
            read_state_shows_an_active_native_scheduler,
            native_scheduler_blocks_plain_apply,
            clearing_native_scheduler_lets_apply_through,
            outage_is_retryable,
            refusal_is_not_retryable,
            the_driver_works_again_once_faults_clear,
            a_stale_fencing_token_is_refused,
            secrets_never_show,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_trials {
    ($suite:ident, $harness:expr; $($rule:ident),+ $(,)?) => {
        mod $suite {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test]
                async fn $rule() {
                    let harness = $harness;
                    $crate::conformance::rules::$rule(&harness).await;
                }
            )+
        }
    };
}
