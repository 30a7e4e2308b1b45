//! `fetch` reads HF_HOME and HF_HUB_OFFLINE from the environment. Environment variables are
//! process-wide, so this file holds a single test (each integration-test file is its own process).

use simtrans_backbone::{fetch, Arch};

#[test]
fn fetch_honours_hf_home_and_offline_mode() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hub/models--timm--resnet50.tv_in1k");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/local")).unwrap();
    std::fs::write(repo.join("refs/main"), "local").unwrap();
    std::fs::write(repo.join("snapshots/local/model.safetensors"), b"fake").unwrap();
    std::env::set_var("HF_HOME", dir.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(
        fetch(Arch::Resnet50).unwrap(),
        repo.join("snapshots/local/model.safetensors")
    );
    let msg = fetch(Arch::Resnet18).unwrap_err().to_string();
    assert!(
        msg.contains("timm/resnet18.tv_in1k")
            && msg.contains(&dir.path().join("hub").display().to_string()),
        "{msg}"
    );
}
