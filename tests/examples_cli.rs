//! The examples' command lines: `--help` works, a bad flag is a plain
//! message with exit code 2, and the main demo runs on a data directory
//! of its own.
//!
//! Regression (issue 13, defect 9): `register_coupon --help` exited 1 with a
//! Debug-quoted `Error: "usage: ..."`.

mod support;

use std::process::Command;

use support::*;

fn run(example: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(example_binary(example))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running example {example}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_example_answers_help_and_refuses_a_bad_flag_plainly() {
    for example in ["register_coupon", "peak_shaving", "order_service"] {
        let (code, out, err) = run(example, &["--help"]);
        assert_eq!(code, 0, "{example} --help: {err}");
        assert!(out.contains("Usage:"), "{example} --help: {out}");
        let (code, out, err) = run(example, &["--no-such-flag"]);
        assert_eq!(code, 2, "{example} with a bad flag: {out} {err}");
        assert!(err.contains("--no-such-flag"), "{example}: {err}");
        assert!(
            !err.contains("Error: \""),
            "{example}: no Debug-quoted error: {err}"
        );
    }
}

#[test]
fn register_coupon_runs_on_a_data_directory_of_its_own() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    let (code, out, err) = run(
        "register_coupon",
        &["--data-dir", data.to_str().expect("utf-8 temp path")],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("done: coupons for users 1-4"), "{out}");
    assert!(
        data.join("weirmq.store").exists(),
        "the store is where it was asked to be"
    );
}
