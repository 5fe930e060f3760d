//! A stand-alone FoxESS Open API emulator for demos and manual tests:
//!
//! ```text
//! foxess-emulator --listen 127.0.0.1:8089 --api-key demo-key --device SN1 [--device SN2 ...]
//!     [--calls-per-day 1440] [--min-write-interval-ms 5000] [--max-slots 8]
//!     [--max-power-w 6000] [--read-order reversed|by-mode|as-written] [--no-padding]
//! ```
//!
//! Arguments are parsed by hand to keep the drivers crate free of a CLI
//! dependency.

use std::{process::ExitCode, time::Duration};

use switchyard_drivers::foxess::emulator::{Emulator, EmulatorConfig, ReadOrder};

const USAGE: &str =
    "usage: foxess-emulator --listen ADDR --api-key KEY --device SN [--device SN ...]
    [--calls-per-day N] [--min-write-interval-ms MS] [--max-slots N] [--max-power-w W]
    [--read-order reversed|by-mode|as-written] [--no-padding]";

fn parse(args: Vec<String>) -> Result<EmulatorConfig, String> {
    let mut config = EmulatorConfig::new("", &[]);
    config.listen = ([127, 0, 0, 1], 8089).into();
    let mut key = None;
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        if flag == "--no-padding" {
            config.pad_with_invalid = false;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what} must be a whole number"))
        };
        match flag.as_str() {
            "--listen" => {
                config.listen = value
                    .parse()
                    .map_err(|_| "--listen must be IP:PORT".to_owned())?;
            }
            "--api-key" => key = Some(value),
            "--device" => config.devices.push(value),
            "--calls-per-day" => config.calls_per_day = number("--calls-per-day")? as usize,
            "--min-write-interval-ms" => {
                config.min_write_interval =
                    Duration::from_millis(number("--min-write-interval-ms")?);
            }
            "--max-slots" => config.max_slots = number("--max-slots")? as usize,
            "--max-power-w" => config.max_power_w = number("--max-power-w")? as i64,
            "--read-order" => {
                config.read_order = match value.as_str() {
                    "reversed" => ReadOrder::Reversed,
                    "by-mode" => ReadOrder::ByMode,
                    "as-written" => ReadOrder::AsWritten,
                    _ => return Err("--read-order: reversed, by-mode or as-written".into()),
                };
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    config.api_key = key.ok_or("--api-key is required")?;
    if config.devices.is_empty() {
        return Err("give at least one --device SN".into());
    }
    Ok(config)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1).collect()) {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("foxess-emulator: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
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
    if tokio::signal::ctrl_c().await.is_err() {
        eprintln!("foxess-emulator: cannot wait for Ctrl-C; exiting");
    }
    ExitCode::SUCCESS
}
