//! The command line as a user meets it.

use std::process::Command;

fn xtask(args: &[&str], runs: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("SIMTRANS_RUNS", runs)
        .output()
        .unwrap()
}

#[test]
fn no_arguments_prints_help_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(&[], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "reproduce",
        "stage",
        "eval",
        "report",
        "bench",
        "fetch",
        "ci",
    ] {
        assert!(text.contains(cmd), "help lacks {cmd}: {text}");
    }
}

#[test]
fn bad_names_fail_with_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(&["stage", "nosuch"], dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data, backbone, simnet, denoise, classifier, eval"),
        "{err}"
    );

    let out = xtask(&["config", "--preset", "fast"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo, paper"));

    let out = xtask(&["config", "--set", "simnet.head=\"four\""], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("simnet.head"));
}

#[test]
fn unreadable_config_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[simnet]\nbeta = \"high\"\n").unwrap();
    let out = xtask(&["config", "--config", bad.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn config_round_trips_through_a_file_with_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(
        &[
            "config",
            "--preset",
            "paper",
            "--set",
            "simnet.beta=0.0",
            "--seed",
            "5",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path().join("c.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let out2 = xtask(&["config", "--config", file.to_str().unwrap()], dir.path());
    assert!(out2.status.success());
    assert_eq!(out.stdout, out2.stdout);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("beta = 0.0") && text.contains("seed = 5"),
        "{text}"
    );
}
