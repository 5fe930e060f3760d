//! A stand-alone FoxESS Open API emulator for demos and manual tests:
//!
//! ```text
//! foxess-emulator --api-key demo-key --device SN1 [--device SN2 ...]
//!     [--listen 127.0.0.1:8089] [--calls-per-day 1440]
//!     [--min-write-interval-ms 5000] [--query-interval-ms 1000]
//!     [--write-interval-ms 2000] [--max-clock-skew-ms 600000]
//!     [--require-user-agent true|false] [--max-slots 8] [--max-power-w 6000]
//!     [--read-order reversed|by-mode|as-written]
//!     [--placeholders invalid|empty-mode|disabled-self-use|none | --no-padding]
//!     [--plant-timezone ZONE] [--disable-passed true|false]
//!     [--null-min-soc-on-grid] [--max-soc N] [--result-null]
//!     [--app-only-group] [--concurrent-writer N]
//!     [--echo-token] [--redirect-to URL]
//! ```
//!
//! It serves the scheduler POSTs (`scheduler/get/flag`, `set/flag`,
//! `get`, `enable`) and the device and plant detail GETs, with the cloud's
//! checks: headers and signature (errno 40256), timestamp skew (41809),
//! daily budget (40402), per-path and per-device spacing (40400), group
//! invariants (40257) and overlaps with inclusive ends, disabled groups
//! included (42023). Reads pad unused slots (`--placeholders`), report
//! `maxGroupCount` and the `fdpwr` range, and report passed groups
//! disabled in the plant's time zone (`--disable-passed`,
//! `--plant-timezone`). The remaining switches reproduce odd answers of
//! the real cloud (`--null-min-soc-on-grid`, `--max-soc`, `--result-null`,
//! `--app-only-group`), another client racing ours
//! (`--concurrent-writer`), or test the client's hygiene (`--echo-token`,
//! `--redirect-to`).
//!
//! `foxess-emulator --help` describes every flag and its default. The
//! defaults are read from [`EmulatorConfig::new`], so the command line
//! and the library cannot drift apart. It prints the base URL to give a
//! device (never the key) and serves until Ctrl-C or SIGTERM.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use switchyard_drivers::foxess::emulator::{Emulator, EmulatorConfig, Placeholders, ReadOrder};

/// Emulates the FoxESS Open API scheduler endpoints, with the cloud's
/// limits and quirks, for demos and manual tests.
#[derive(Debug, Parser)]
#[command(name = "foxess-emulator", version)]
struct Cli {
    /// Address to listen on, IP:PORT (port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// The one API key accepted (required; from the environment it stays
    /// out of the process list).
    #[arg(
        long,
        value_name = "KEY",
        env = "FOXESS_EMULATOR_API_KEY",
        hide_env_values = true
    )]
    api_key: String,
    /// An inverter serial (deviceSN) to emulate; repeatable, at least one
    /// required.
    #[arg(long = "device", value_name = "SN", required = true)]
    devices: Vec<String>,
    /// Calls accepted per API key in any 24 h.
    #[arg(long, value_name = "N", default_value_t = defaults().calls_per_day)]
    calls_per_day: usize,
    /// Minimum time between two writes to one device, ms.
    #[arg(long, value_name = "MS", default_value_t = default_write_interval_ms())]
    min_write_interval_ms: u64,
    /// Minimum time between two calls to one query path (a read), ms; the
    /// cloud allows one a second per query interface. Faster: errno 40400.
    #[arg(long, value_name = "MS", default_value_t = millis(defaults().query_interval))]
    query_interval_ms: u64,
    /// Minimum time between two calls to one update path (a write), ms,
    /// whatever the device; the cloud allows one per 2 s per update
    /// interface. Faster: errno 40400.
    #[arg(long, value_name = "MS", default_value_t = millis(defaults().write_interval))]
    write_interval_ms: u64,
    /// Largest difference, either way, between a request's `timestamp`
    /// and the emulator's clock, ms. Beyond it: errno 41809.
    #[arg(long, value_name = "MS", default_value_t = millis(defaults().max_clock_skew))]
    max_clock_skew_ms: u64,
    /// Whether a request without a `User-Agent` header is refused with
    /// errno 40256, as FoxESS asks script callers to set their own.
    #[arg(long, value_name = "BOOL", default_value_t = defaults().require_user_agent,
          action = clap::ArgAction::Set)]
    require_user_agent: bool,
    /// Scheduler slots per device.
    #[arg(long, value_name = "N", default_value_t = defaults().max_slots)]
    max_slots: usize,
    /// Largest discharge power (`fdPwr`) accepted, W.
    #[arg(long, value_name = "W", default_value_t = defaults().max_power_w,
          value_parser = clap::value_parser!(i64).range(0..))]
    max_power_w: i64,
    /// Order of the groups on read (the real cloud reorders them).
    #[arg(long, value_enum, default_value_t = defaults().read_order.into())]
    read_order: ReadOrderArg,
    /// What reads pad the group list with, up to --max-slots (the real
    /// cloud has been seen answering each).
    #[arg(long, value_enum, default_value_t = defaults().placeholders.into())]
    placeholders: PlaceholdersArg,
    /// Reads return only the stored groups: the same as `--placeholders
    /// none` (default: off).
    #[arg(long, conflicts_with = "placeholders")]
    no_padding: bool,
    /// Padding slots read with `minSocOnGrid: null`, as the cloud sometimes
    /// answers (default: off).
    #[arg(long)]
    null_min_soc_on_grid: bool,
    /// Reads carry `maxSoc` on every group, as v1 answers do: the written
    /// value where a group was written with one, else N (default: none,
    /// only written `maxSoc` fields are read back).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..=100))]
    max_soc: Option<i64>,
    /// `scheduler/get` answers `result: null` while a device has no group,
    /// as the cloud does when the mode was set in the app (default: off).
    #[arg(long)]
    result_null: bool,
    /// Every device starts with a group set in the app that the write
    /// endpoint refuses: SelfUse 06:00-06:59, enabled, minSocOnGrid 10,
    /// fdSoc 10, fdPwr 0 (default: off).
    #[arg(long)]
    app_only_group: bool,
    /// Another read-modify-write client races the next N accepted group
    /// writes: right after each, the list is put back as it was before it,
    /// plus a Feedin 05:00-05:29 group (its own of the time before
    /// replaced, fdPwr one watt up each time) (0: no such client).
    #[arg(long, value_name = "N", default_value_t = defaults().concurrent_writer)]
    concurrent_writer: usize,
    /// Whether reads report an enabled group whose last minute has passed
    /// today (in the plant's time zone) with `enable: 0`, as the cloud
    /// does; the stored group is unchanged.
    #[arg(long, value_name = "BOOL", default_value_t = defaults().disable_passed,
          action = clap::ArgAction::Set)]
    disable_passed: bool,
    /// The plants' IANA time zone, e.g. Europe/London: reported as
    /// `ianaTimezone` by the plant detail, and the local time of
    /// --disable-passed (default: none, no `ianaTimezone`, and UTC).
    #[arg(long, value_name = "ZONE", value_parser = parse_zone)]
    plant_timezone: Option<String>,
    /// Test switch (default: off): every JSON answer carries the `token`
    /// header it received in its `msg`, like an OEM echoing the API key.
    #[arg(long)]
    echo_token: bool,
    /// Test switch (default: none): answer every request HTTP 307 with
    /// this `Location`, to check that clients do not follow redirects.
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    redirect_to: Option<String>,
}

/// `--read-order` values; a mirror of [`ReadOrder`] so the library does
/// not depend on clap.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReadOrderArg {
    /// Reversed from the written order.
    Reversed,
    /// Sorted by work mode, then start time.
    ByMode,
    /// As last written.
    AsWritten,
}

/// `--placeholders` values; a mirror of [`Placeholders`].
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PlaceholdersArg {
    /// Disabled 00:00-00:00 slots in mode `Invalid`.
    Invalid,
    /// The same with mode "".
    EmptyMode,
    /// Disabled zero-length 00:00-00:00 SelfUse slots.
    DisabledSelfUse,
    /// No padding.
    None,
}

impl From<Placeholders> for PlaceholdersArg {
    fn from(p: Placeholders) -> Self {
        match p {
            Placeholders::Invalid => Self::Invalid,
            Placeholders::EmptyMode => Self::EmptyMode,
            Placeholders::DisabledSelfUse => Self::DisabledSelfUse,
            Placeholders::None => Self::None,
        }
    }
}

impl From<PlaceholdersArg> for Placeholders {
    fn from(p: PlaceholdersArg) -> Self {
        match p {
            PlaceholdersArg::Invalid => Self::Invalid,
            PlaceholdersArg::EmptyMode => Self::EmptyMode,
            PlaceholdersArg::DisabledSelfUse => Self::DisabledSelfUse,
            PlaceholdersArg::None => Self::None,
        }
    }
}

impl From<ReadOrder> for ReadOrderArg {
    fn from(o: ReadOrder) -> Self {
        match o {
            ReadOrder::Reversed => Self::Reversed,
            ReadOrder::ByMode => Self::ByMode,
            ReadOrder::AsWritten => Self::AsWritten,
        }
    }
}

impl From<ReadOrderArg> for ReadOrder {
    fn from(o: ReadOrderArg) -> Self {
        match o {
            ReadOrderArg::Reversed => Self::Reversed,
            ReadOrderArg::ByMode => Self::ByMode,
            ReadOrderArg::AsWritten => Self::AsWritten,
        }
    }
}

fn defaults() -> EmulatorConfig {
    EmulatorConfig::new("", &[])
}

fn default_write_interval_ms() -> u64 {
    millis(defaults().min_write_interval)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses what could not go into a `Location` header, so a typo is a
/// usage error rather than a 307 without a target.
fn parse_url(s: &str) -> Result<String, String> {
    s.parse::<hyper::Uri>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a URL: {e}"))
}

/// Refuses a zone the time zone database does not know, so a typo is a
/// usage error rather than a silent UTC.
fn parse_zone(s: &str) -> Result<String, String> {
    jiff::tz::TimeZone::get(s)
        .map(|_| s.to_owned())
        .map_err(|_| "not an IANA time zone name (e.g. Europe/London)".to_owned())
}

impl Cli {
    fn into_config(self) -> EmulatorConfig {
        let mut config = EmulatorConfig::new(self.api_key, &[]);
        config.listen = self.listen;
        config.devices = self.devices;
        config.calls_per_day = self.calls_per_day;
        config.min_write_interval = Duration::from_millis(self.min_write_interval_ms);
        config.query_interval = Duration::from_millis(self.query_interval_ms);
        config.write_interval = Duration::from_millis(self.write_interval_ms);
        config.max_clock_skew = Duration::from_millis(self.max_clock_skew_ms);
        config.require_user_agent = self.require_user_agent;
        config.max_slots = self.max_slots;
        config.max_power_w = self.max_power_w;
        config.read_order = self.read_order.into();
        config.placeholders = if self.no_padding {
            Placeholders::None
        } else {
            self.placeholders.into()
        };
        config.null_min_soc_on_grid = self.null_min_soc_on_grid;
        config.max_soc = self.max_soc;
        config.result_null = self.result_null;
        config.app_only_group = self.app_only_group;
        config.concurrent_writer = self.concurrent_writer;
        config.disable_passed = self.disable_passed;
        config.plant_timezone = self.plant_timezone;
        config.echo_token = self.echo_token;
        config.redirect_to = self.redirect_to;
        config
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and service managers
/// send), so the emulator stops cleanly either way.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => {
                        if r.is_err() {
                            // Still stoppable by SIGTERM.
                            term.recv().await;
                        }
                    }
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                if tokio::signal::ctrl_c().await.is_err() {
                    eprintln!("foxess-emulator: cannot wait for a signal; exiting");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            eprintln!("foxess-emulator: cannot wait for Ctrl-C; exiting");
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 2 with clap's message; --help and --version exit 0.
    let config = Cli::parse().into_config();
    let devices = config.devices.join(", ");
    let handle = match Emulator::start(config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("foxess-emulator: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The key is the operator's own demo key; still, do not print it.
    println!(
        "foxess-emulator: serving {} for device(s) {devices}",
        handle.base_url()
    );
    shutdown_signal().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn config(args: &[&str]) -> EmulatorConfig {
        Cli::try_parse_from(std::iter::once("foxess-emulator").chain(args.iter().copied()))
            .expect("valid arguments")
            .into_config()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn only_the_required_flags_give_the_library_defaults() {
        let c = config(&["--api-key", "k", "--device", "SN"]);
        let d = defaults();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8089)));
        assert_eq!(
            (c.api_key.as_str(), c.devices),
            ("k", vec!["SN".to_owned()])
        );
        assert_eq!(c.calls_per_day, d.calls_per_day);
        assert_eq!(c.min_write_interval, d.min_write_interval);
        assert_eq!(c.query_interval, d.query_interval);
        assert_eq!(c.write_interval, d.write_interval);
        assert_eq!(c.max_clock_skew, d.max_clock_skew);
        assert_eq!(c.require_user_agent, d.require_user_agent);
        assert_eq!(c.max_slots, d.max_slots);
        assert_eq!(c.max_power_w, d.max_power_w);
        assert_eq!(c.read_order, d.read_order);
        assert_eq!(c.placeholders, d.placeholders);
        assert_eq!(c.null_min_soc_on_grid, d.null_min_soc_on_grid);
        assert_eq!(c.max_soc, d.max_soc);
        assert_eq!(c.result_null, d.result_null);
        assert_eq!(c.app_only_group, d.app_only_group);
        assert_eq!(c.concurrent_writer, d.concurrent_writer);
        assert_eq!(c.disable_passed, d.disable_passed);
        assert_eq!(c.plant_timezone, d.plant_timezone);
        assert_eq!(c.echo_token, d.echo_token);
        assert_eq!(c.redirect_to, d.redirect_to);
    }

    #[test]
    fn every_flag_reaches_the_config() {
        let c = config(&[
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            "k",
            "--device",
            "A",
            "--device",
            "B",
            "--calls-per-day",
            "3",
            "--min-write-interval-ms",
            "250",
            "--query-interval-ms",
            "10",
            "--write-interval-ms",
            "20",
            "--max-clock-skew-ms",
            "30",
            "--require-user-agent",
            "false",
            "--max-slots",
            "4",
            "--max-power-w",
            "1200",
            "--read-order",
            "by-mode",
            "--no-padding",
            "--null-min-soc-on-grid",
            "--max-soc",
            "95",
            "--result-null",
            "--app-only-group",
            "--concurrent-writer",
            "3",
            "--disable-passed",
            "false",
            "--plant-timezone",
            "Europe/London",
            "--echo-token",
            "--redirect-to",
            "http://127.0.0.1:9/x",
        ]);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(c.devices, ["A", "B"]);
        assert_eq!(c.calls_per_day, 3);
        assert_eq!(c.min_write_interval, Duration::from_millis(250));
        assert_eq!(c.query_interval, Duration::from_millis(10));
        assert_eq!(c.write_interval, Duration::from_millis(20));
        assert_eq!(c.max_clock_skew, Duration::from_millis(30));
        assert!(!c.require_user_agent);
        assert_eq!(c.max_slots, 4);
        assert_eq!(c.max_power_w, 1200);
        assert_eq!(c.read_order, ReadOrder::ByMode);
        assert_eq!(c.placeholders, Placeholders::None);
        assert!(c.null_min_soc_on_grid);
        assert_eq!(c.max_soc, Some(95));
        assert!(c.result_null);
        assert!(c.app_only_group);
        assert_eq!(c.concurrent_writer, 3);
        assert!(!c.disable_passed);
        assert_eq!(c.plant_timezone.as_deref(), Some("Europe/London"));
        assert!(c.echo_token);
        assert_eq!(c.redirect_to.as_deref(), Some("http://127.0.0.1:9/x"));
        assert_eq!(
            config(&[
                "--api-key",
                "k",
                "--device",
                "A",
                "--read-order",
                "as-written"
            ])
            .read_order,
            ReadOrder::AsWritten
        );
        for (value, p) in [
            ("invalid", Placeholders::Invalid),
            ("empty-mode", Placeholders::EmptyMode),
            ("disabled-self-use", Placeholders::DisabledSelfUse),
            ("none", Placeholders::None),
        ] {
            let c = config(&["--api-key", "k", "--device", "A", "--placeholders", value]);
            assert_eq!(c.placeholders, p, "{value}");
        }
    }

    #[test]
    fn no_padding_and_placeholders_do_not_mix() {
        let args = [
            "foxess-emulator",
            "--api-key",
            "k",
            "--device",
            "A",
            "--no-padding",
            "--placeholders",
            "invalid",
        ];
        assert!(Cli::try_parse_from(args).is_err());
    }
}
