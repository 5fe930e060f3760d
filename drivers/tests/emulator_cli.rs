//! The `foxess-emulator` binary behaves like a CLI: `--help` documents
//! every flag and its default, and a usage error exits 2.

use std::process::{Command, Output};

use switchyard_drivers::foxess::emulator::{EmulatorConfig, ReadOrder};

fn emulator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_foxess-emulator"))
        .args(args)
        .output()
        .expect("run foxess-emulator")
}

/// The help of `flag` in `--help` output: its own line and the indented
/// lines under it, up to the next flag.
fn paragraph(help: &str, flag: &str) -> String {
    let is_flag_line = |l: &str| {
        let t = l.trim_start();
        t.starts_with('-') && l.len() - t.len() <= 6
    };
    let mut lines = help
        .lines()
        .skip_while(|l| !(is_flag_line(l) && l.trim_start().split([' ', ',']).any(|w| w == flag)));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
    let rest = lines.take_while(|l| !is_flag_line(l));
    std::iter::once(first)
        .chain(rest)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let out = emulator(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    // The library's defaults, plus the CLI's own fixed listen address.
    let lib = EmulatorConfig::new("", &[]);
    assert!(lib.pad_with_invalid && !lib.echo_token && lib.redirect_to.is_none());
    let read_order = match lib.read_order {
        ReadOrder::Reversed => "reversed",
        ReadOrder::ByMode => "by-mode",
        ReadOrder::AsWritten => "as-written",
    };
    for (flag, default) in [
        ("--listen", "[default: 127.0.0.1:8089]".to_owned()),
        (
            "--calls-per-day",
            format!("[default: {}]", lib.calls_per_day),
        ),
        (
            "--min-write-interval-ms",
            format!("[default: {}]", lib.min_write_interval.as_millis()),
        ),
        ("--max-slots", format!("[default: {}]", lib.max_slots)),
        ("--max-power-w", format!("[default: {}]", lib.max_power_w)),
        ("--read-order", format!("[default: {read_order}]")),
        ("--no-padding", "default: off".to_owned()),
        ("--echo-token", "default: off".to_owned()),
        ("--redirect-to", "default: none".to_owned()),
        ("--api-key", "required".to_owned()),
        ("--device", "repeatable".to_owned()),
    ] {
        let p = paragraph(&help, flag);
        assert!(p.contains(&default), "{flag} lacks {default:?}: {p}");
    }
    for value in ["reversed", "by-mode", "as-written"] {
        assert!(
            paragraph(&help, "--read-order").contains(value),
            "{value}: {help}"
        );
    }
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    for args in [
        &["--no-such-flag"][..],
        &["--api-key", "k", "--device", "SN", "--max-slots", "many"],
        &[
            "--api-key",
            "k",
            "--device",
            "SN",
            "--read-order",
            "sideways",
        ],
        &["--api-key", "k", "--device", "SN", "--listen", "localhost"],
        &[
            "--api-key",
            "k",
            "--device",
            "SN",
            "--redirect-to",
            "not a url",
        ],
        &["--api-key", "k"],
        &["--device", "SN"],
    ] {
        let out = emulator(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
}
