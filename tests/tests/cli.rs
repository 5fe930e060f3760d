//! Every binary behaves like a CLI: `--help` exits 0 and documents each
//! flag with its default, and a usage error exits 2 with clap's message.
//! `switchyard-under-test` runs exactly `switchyard::cli::main`, so it
//! stands for the `switchyard` binary.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const SWITCHYARD: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
const BENCH: &str = env!("CARGO_BIN_EXE_switchyard-bench");

/// Runs `bin args` in an empty directory, with the environment that
/// would override flag defaults removed. A usage error must not start a
/// server; if one does, it is killed after a deadline and the test fails
/// instead of hanging. Output goes to files, not pipes, so a grandchild
/// holding them open cannot block the wait.
fn run(bin: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("output file");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SWITCHYARD_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} {args:?} still running after 30 s");
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

fn help(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The help of `flag`: its own line and the indented lines under it, up
/// to the next flag.
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

fn assert_flags(help: &str, expected: &[(&str, &str)]) {
    for (flag, default) in expected {
        let p = paragraph(help, flag);
        assert!(p.contains(default), "{flag} lacks {default:?}: {p}");
    }
}

fn assert_usage_error(bin: &str, args: &[&str]) {
    let out = run(bin, args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    // clap's message, or the help itself when a subcommand is missing.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("help"), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
}

#[test]
fn switchyard_help_lists_the_subcommands() {
    let h = help(SWITCHYARD, &["--help"]);
    for sub in ["serve", "migrate"] {
        assert!(h.lines().any(|l| l.trim_start().starts_with(sub)), "{h}");
    }
}

#[test]
fn switchyard_serve_help_gives_every_default() {
    let h = help(SWITCHYARD, &["serve", "--help"]);
    let horizon = format!("[default: {}]", switchyard::server::DEFAULT_HORIZON_DAYS);
    assert_flags(
        &h,
        &[
            ("--listen", "[default: 127.0.0.1:50051]"),
            ("--database", "[default: sqlite://switchyard.db]"),
            ("--log-format", "[default: text]"),
            ("--horizon-days", &horizon),
            ("--shutdown-grace-seconds", "[default: 10]"),
            ("--database-max-connections", "[default: 16]"),
            ("--database-write-lanes", "[default: 0]"),
            ("--analyze-every-seconds", "[default: 10]"),
            // A switch: its help says what happens without it.
            ("--no-demo", "Do not create the demo devices"),
        ],
    );
    let h = help(SWITCHYARD, &["migrate", "--help"]);
    assert_flags(&h, &[("--database", "[default: sqlite://switchyard.db]")]);
}

#[test]
fn switchyard_usage_errors_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["serve", "--no-such-flag"],
        &["serve", "--listen", "nowhere"],
        &["serve", "--horizon-days", "0"],
        &["serve", "--database-max-connections", "3"],
        &["serve", "--database-write-lanes", "501"],
        &["serve", "--analyze-every-seconds", "86401"],
        &["serve", "--analyze-every-seconds", "-1"],
        &["serve", "--log-format", "xml"],
        &["no-such-command"],
        &[],
    ] {
        assert_usage_error(SWITCHYARD, args);
    }
}

#[test]
fn bench_help_gives_every_default() {
    let h = help(BENCH, &["--help"]);
    for sub in ["push", "dispatch"] {
        assert!(h.lines().any(|l| l.trim_start().starts_with(sub)), "{h}");
    }
    let h = help(BENCH, &["push", "--help"]);
    assert_flags(
        &h,
        &[
            ("--n", "[default: 20000]"),
            ("--c", "[default: 32]"),
            ("--devices", "[default: 100]"),
            ("--addr", "default: spawn"),
            ("--server-bin", "default: `switchyard` next to"),
        ],
    );
    let h = help(BENCH, &["dispatch", "--help"]);
    assert_flags(
        &h,
        &[
            ("--n", "[default: 10000]"),
            ("--c", "[default: 32]"),
            ("--server-bin", "default: `switchyard` next to"),
        ],
    );
}

#[test]
fn bench_usage_errors_exit_2() {
    // Were a bad value accepted, the bench would stop at the missing
    // server binary rather than spawn a server this test cannot clean up.
    let nowhere = ["--server-bin", "/nonexistent/switchyard"];
    for args in [
        &["--no-such-flag"][..],
        &["push", "--no-such-flag"],
        &["push", "--n", "many"],
        &["push", "--devices", "0"],
        &["dispatch", "--c", "0"],
        &[],
    ] {
        let with_nowhere: Vec<&str> = match args.first() {
            Some(&"push" | &"dispatch") => args.iter().chain(&nowhere).copied().collect(),
            _ => args.to_vec(),
        };
        assert_usage_error(BENCH, &with_nowhere);
    }
}

/// A configuration the server cannot start with is named for what is
/// wrong with it (exit 1), before anything listens.
#[test]
fn a_wrong_operator_configuration_stops_the_server_at_start_with_its_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--secrets-dir", "/no/such/dir/here"], "--secrets-dir"),
        (
            &["--oem-url-allow", "ftp://127.0.0.1:21"],
            "--oem-url-allow",
        ),
        (
            &["--oem-url-allow", "http://127.0.0.1:8099/a/../b"],
            "--oem-url-allow",
        ),
        (
            &[
                "--oem-url-allow",
                "http://127.0.0.1:8099=SWITCHYARD_SECRET_X",
            ],
            "--oem-url-allow",
        ),
        (
            &["--database", "mysql://localhost/x"],
            "unsupported database",
        ),
        // Nothing listens on port 1: the database is named, its password
        // is not.
        (
            &["--database", "postgres://sy:hunter2@127.0.0.1:1/x"],
            "--database postgres://sy:<redacted>@127.0.0.1:1/x",
        ),
        (
            &["--database", "sqlite:///no/such/dir/switchyard.db"],
            "does not exist",
        ),
        (&["--listen", "no-such-host.invalid:50051"], "--listen"),
        (
            &["--database-write-lanes", "9"],
            "--database-write-lanes 9: at most half of --database-max-connections (16)",
        ),
    ];
    for (args, said) in cases {
        let mut all = vec!["serve", "--no-demo"];
        if !args.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        all.extend_from_slice(args);
        let out = run(SWITCHYARD, &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(said),
            "{args:?} should say {said:?}: {stderr}"
        );
        assert!(!stderr.contains("listening"), "{args:?} started: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "{args:?} echoed a password: {stderr}"
        );
    }
}
