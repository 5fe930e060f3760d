//! The `foxess-emulator` binary behaves like a CLI: `--help` documents
//! every flag and its default, and a usage error exits 2.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use switchyard_drivers::foxess::emulator::{EmulatorConfig, Placeholders, ReadOrder};

/// Runs the emulator. Were a usage error accepted, it would serve until
/// killed: after a deadline it is, and the test fails instead of hanging.
fn emulator(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("output file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_foxess-emulator"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .expect("run foxess-emulator");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("foxess-emulator {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |name: &str| std::fs::read(dir.path().join(name)).expect("read output");
    Output {
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

/// The help of `flag` in `--help` output: its own line and the indented
/// lines under it, up to the next flag.
fn paragraph(help: &str, flag: &str) -> String {
    // A flag line is indented at most 6 columns and starts with the flag
    // names; the words after the names are help text and may name flags.
    let names = |l: &str| -> Vec<String> {
        let t = l.trim_start();
        if l.len() - t.len() > 6 {
            return Vec::new();
        }
        t.split([' ', ','])
            .filter(|w| !w.is_empty())
            .take_while(|w| w.starts_with('-'))
            .map(str::to_owned)
            .collect()
    };
    let mut lines = help
        .lines()
        .skip_while(|l| !names(l).iter().any(|n| n == flag));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{flag} missing from help:\n{help}"));
    let rest = lines.take_while(|l| names(l).is_empty());
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
    // The switches documented as off or none are so in the library.
    assert!(!lib.echo_token && lib.redirect_to.is_none());
    assert!(!lib.null_min_soc_on_grid && !lib.result_null && !lib.app_only_group);
    assert!(lib.max_soc.is_none() && lib.plant_timezone.is_none());
    let placeholders = match lib.placeholders {
        Placeholders::Invalid => "invalid",
        Placeholders::EmptyMode => "empty-mode",
        Placeholders::DisabledSelfUse => "disabled-self-use",
        Placeholders::None => "none",
    };
    let ms = |d: Duration| format!("[default: {}]", d.as_millis());
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
        ("--query-interval-ms", ms(lib.query_interval)),
        ("--write-interval-ms", ms(lib.write_interval)),
        ("--max-clock-skew-ms", ms(lib.max_clock_skew)),
        (
            "--require-user-agent",
            format!("[default: {}]", lib.require_user_agent),
        ),
        ("--max-slots", format!("[default: {}]", lib.max_slots)),
        ("--max-power-w", format!("[default: {}]", lib.max_power_w)),
        ("--read-order", format!("[default: {read_order}]")),
        ("--placeholders", format!("[default: {placeholders}]")),
        ("--no-padding", "default: off".to_owned()),
        ("--null-min-soc-on-grid", "default: off".to_owned()),
        ("--max-soc", "default: none".to_owned()),
        ("--result-null", "default: off".to_owned()),
        ("--app-only-group", "default: off".to_owned()),
        (
            "--concurrent-writer",
            format!("[default: {}]", lib.concurrent_writer),
        ),
        (
            "--disable-passed",
            format!("[default: {}]", lib.disable_passed),
        ),
        ("--plant-timezone", "default: none".to_owned()),
        ("--echo-token", "default: off".to_owned()),
        ("--redirect-to", "default: none".to_owned()),
        ("--api-key", "required".to_owned()),
        ("--device", "repeatable".to_owned()),
    ] {
        let p = paragraph(&help, flag);
        assert!(p.contains(&default), "{flag} lacks {default:?}: {p}");
    }
    for (flag, value) in [
        ("--read-order", "reversed"),
        ("--read-order", "by-mode"),
        ("--read-order", "as-written"),
        ("--placeholders", "invalid"),
        ("--placeholders", "empty-mode"),
        ("--placeholders", "disabled-self-use"),
        ("--placeholders", "none"),
        ("--no-padding", "--placeholders none"),
    ] {
        assert!(
            paragraph(&help, flag).contains(value),
            "{flag} {value}: {help}"
        );
    }
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    // Valid apart from the one fault, which clap's message must name; a
    // free port should the fault go unnoticed.
    let ok = ["--api-key", "k", "--device", "SN"];
    for (extra, named) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["--max-slots", "many"], "many"),
        (&["--max-power-w", "-1"], "-1"),
        (&["--read-order", "sideways"], "sideways"),
        (&["--listen", "localhost"], "localhost"),
        (&["--redirect-to", "not a url"], "not a url"),
        (&["--require-user-agent", "maybe"], "maybe"),
        (&["--query-interval-ms", "-5"], "-5"),
        (&["--placeholders", "sometimes"], "sometimes"),
        (
            &["--no-padding", "--placeholders", "none"],
            "--placeholders",
        ),
        (&["--max-soc", "101"], "101"),
        (&["--max-soc", "lots"], "lots"),
        (&["--concurrent-writer", "two"], "two"),
        (&["--concurrent-writer", "-1"], "-1"),
        (&["--disable-passed", "maybe"], "maybe"),
        (
            &["--plant-timezone", "Mars/Olympus_Mons"],
            "Mars/Olympus_Mons",
        ),
    ] {
        let port: &[&str] = match extra {
            ["--listen", ..] => &[],
            _ => &["--listen", "127.0.0.1:0"],
        };
        let args: Vec<&str> = ok.iter().chain(port).chain(extra).copied().collect();
        let out = emulator(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error:") && err.contains(named),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    for (args, missing) in [
        (&["--api-key", "k"][..], "--device"),
        (&["--device", "SN"], "--api-key"),
    ] {
        let out = emulator(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("required") && err.contains(missing),
            "{args:?}: {err}"
        );
    }
}
